"""The Llama wrapper on the real patched engine and the real default model."""

import pytest

from minicache_gguf import ConfigError, Llama, MergeConfig, _engine
from minicache_gguf.calfile import SHIPPED_DIR


@pytest.fixture(scope="module")
def llm(model_path):
    from minicache_gguf import Llama

    return Llama(model_path, n_ctx=256, verbose=False)


def test_public_imports():
    from minicache_gguf import Llama, MergeConfig, default_model_path  # noqa: F401
    import llama_cpp

    assert issubclass(Llama, llama_cpp.Llama)


def test_llama_cpp_runs_on_the_patched_engine(llm):
    import llama_cpp.llama_cpp as lc

    assert lc._base_path.resolve() == _engine.lib_dir("patched").resolve()
    assert hasattr(lc._lib, "minicache_version")  # the native core is in the loaded libllama


def test_generates_text(llm):
    out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
    text = out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] >= 1 and text.strip()


def test_default_model_when_no_path():
    from minicache_gguf import Llama, default_model_path

    llm = Llama(n_ctx=64, verbose=False)
    assert llm.model_path == str(default_model_path())


def test_unknown_keyword_is_an_error(model_path):
    from minicache_gguf import Llama

    with pytest.raises(TypeError, match=r"'n_ctxx' \(did you mean 'n_ctx'\?\)"):
        Llama(model_path, n_ctxx=1024, verbose=False)
    with pytest.raises(TypeError, match=r"'kv_mrege' \(did you mean 'kv_merge'\?\)"):
        Llama(model_path, kv_mrege=True, verbose=False)


def test_kv_merge_options(model_path):
    from minicache_gguf import Llama

    llm = Llama(model_path, n_ctx=256, kv_merge=True, verbose=False)
    assert llm.merge_config == MergeConfig()
    # True is the shipped calibration of the default model (never the paper's uncalibrated merge)
    assert llm.calibration.path.parent == SHIPPED_DIR
    assert llm.kv_stats().aligned_pools == len(llm.calibration.pairs) > 0
    paper = Llama(model_path, n_ctx=256, kv_merge=MergeConfig(calibration="paper"), verbose=False)
    assert paper.kv_stats().merged_layer_pairs == 7 and paper.kv_stats().aligned_pools == 0
    with pytest.raises(TypeError, match="kv_merge='yes' is not valid"):
        Llama(model_path, kv_merge="yes", verbose=False)
    with pytest.raises(ConfigError, match="gamma=3"):
        Llama(model_path, kv_merge=MergeConfig(gamma=3), verbose=False)
    off = Llama(model_path, n_ctx=256, verbose=False)
    assert off.merge_config is None and off.kv_stats().start_layer == -1 and off.kv_stats().ratio == 1.0


def test_missing_model_is_a_clear_error(tmp_path):
    from minicache_gguf import Llama

    with pytest.raises(ValueError, match="does not exist"):
        Llama(str(tmp_path / "nope.gguf"), verbose=False)


def test_every_problem_of_a_config_in_one_message(model_path):
    with pytest.raises(ConfigError) as e:
        Llama(model_path, n_ctx=256, verbose=False, kv_merge=MergeConfig(start_layer=40), type_v=8, embedding=True)
    msg = str(e.value)
    assert msg.startswith("kv_merge: ") and msg.count("\n") == 0
    for part in ("start_layer=40 is not valid for this model (30 layers)", "type_v=q8_0 needs flash_attn=True",
                 "embedding=True is not supported"):
        assert part in msg, msg
