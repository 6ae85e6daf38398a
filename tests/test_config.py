from pathlib import Path

import pytest

from minicache_gguf import ConfigError, MergeConfig


def test_defaults():
    """The paper's t, gamma and layout start; calibration "auto": the paper's uncalibrated merge
    only when named ("paper")."""
    c = MergeConfig()
    assert (c.start_layer, c.t, c.gamma, c.window, c.merge_k, c.merge_v, c.calibration, c.retention) == \
        (None, 0.6, 0.05, 256, True, True, "auto", "topk")
    assert not c.paper and MergeConfig(calibration="paper").paper
    assert c.resolve_start(30) == 15
    assert c.pairs(30) == [(15, 16), (17, 18), (19, 20), (21, 22), (23, 24), (25, 26), (27, 28)]
    assert MergeConfig(start_layer=27).pairs(30) == [(27, 28)]
    assert MergeConfig(start_layer=0).pairs(4) == [(0, 1), (2, 3)]


@pytest.mark.parametrize("kwargs, field", [
    (dict(t=1.2), "t=1.2"),
    (dict(t=-0.1), "t=-0.1"),
    (dict(t=float("nan")), "t=nan"),
    (dict(t=True), "t=True"),
    (dict(t="0.5"), "t='0.5'"),
    (dict(gamma=2), "gamma=2"),
    (dict(gamma=float("inf")), "gamma=inf"),
    (dict(window=0), "window=0"),
    (dict(window=2.5), "window=2.5"),
    (dict(start_layer=-1), "start_layer=-1"),
    (dict(start_layer=3.0), "start_layer=3.0"),
    (dict(merge_k=1), "merge_k=1"),
    (dict(merge_v="yes"), "merge_v='yes'"),
    (dict(merge_k=False, merge_v=False), "merges nothing"),
    (dict(retention="bottom"), "retention='bottom'"),
    (dict(calibration=42), "calibration=42"),
    (dict(calibration=None), "calibration=None is not valid: expected 'auto', 'paper'"),
    (dict(calibration="/nonexistent/cal.gguf"), "no such file"),
    (dict(calibration_ctx=100), "calibration_ctx=100"),
    (dict(calibration_ctx=4096.0), "calibration_ctx=4096.0"),
])
def test_invalid_values_name_the_field_and_range(kwargs, field):
    with pytest.raises(ConfigError) as e:
        MergeConfig(**kwargs)
    assert field in str(e.value)
    assert "expected" in str(e.value) or "enable at least one" in str(e.value)


def test_start_layer_beyond_the_model():
    with pytest.raises(ConfigError, match=r"start_layer=29 is not valid for this model \(30 layers\).*<= 28"):
        MergeConfig(start_layer=29).resolve_start(30)
    with pytest.raises(ConfigError, match="no adjacent layer pair"):
        MergeConfig().resolve_start(1)


def test_calibration_values(tmp_path: Path):
    f = tmp_path / "cal.gguf"
    f.write_bytes(b"x")
    assert MergeConfig(calibration=f).to_dict()["calibration"] == str(f)
    assert MergeConfig(calibration="auto").calibration == "auto"


def test_frozen_and_ints_accepted_as_floats():
    c = MergeConfig(t=1, gamma=0)
    assert isinstance(c.t, float) and c.t == 1.0 and c.gamma == 0.0
    with pytest.raises(AttributeError):
        c.t = 0.5


def test_kv_modes_stack_merges_on_cache_types(tmp_path):
    from minicache_gguf.config import kv_modes

    cal = tmp_path / "cal.gguf"
    cal.write_bytes(b"")  # only the name is used here
    modes = {m.name: m for m in kv_modes(256, {"head": cal}, ["q8_0/q4_0", "q4_0+aligned-head-w256",
                                                                     "q8_0+aligned-head-v-w256", "paper-w0"],
                                         type_k="q8_0", type_v="q8_0")}
    assert list(modes) == ["f16", "q8_0/q4_0", "q4_0+aligned-head-w256", "q8_0+aligned-head-v-w256", "paper-w0"]
    assert (modes["q8_0/q4_0"].type_k, modes["q8_0/q4_0"].type_v, modes["q8_0/q4_0"].merge) == ("q8_0", "q4_0", None)
    m = modes["q4_0+aligned-head-w256"]
    assert (m.type_k, m.type_v, m.merge.calibration) == ("q4_0", "q4_0", cal)
    assert modes["q8_0+aligned-head-v-w256"].merge.merge_k is False
    # a merge that names no type runs on type_k/type_v; f16 stays the f16 reference
    assert (modes["paper-w0"].type_k, modes["f16"].type_k) == ("q8_0", "f16")
    for bad in ("q4_0+nope", "q9_0", "q8_0+q4_0"):
        with pytest.raises(ValueError, match="not valid"):
            kv_modes(256, {}, [bad])


def test_n_gpu_layers_from_the_environment(monkeypatch):
    from minicache_gguf.config import N_GPU_LAYERS_ENV, default_n_gpu_layers

    monkeypatch.delenv(N_GPU_LAYERS_ENV, raising=False)
    assert default_n_gpu_layers() is None
    monkeypatch.setenv(N_GPU_LAYERS_ENV, "-1")
    assert default_n_gpu_layers() == -1
    for bad in ("all", "-3", "1.5"):
        monkeypatch.setenv(N_GPU_LAYERS_ENV, bad)
        with pytest.raises(ConfigError, match=f"{N_GPU_LAYERS_ENV}='{bad}' is not valid"):
            default_n_gpu_layers()
