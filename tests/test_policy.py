"""kv_merge's one default policy: True is the calibrated selection of the model and its KV cache
type (shipped or cached, re-scored for other settings), never the paper's uncalibrated merge
unless it is named; a model with no calibration is refused in one line that says what
calibrating costs on this machine and how to start it; no test calibrates without asking; the
quantized cache that calibrate simulates holds what the engine's cache holds."""

import os
import re
import shutil
import warnings

import numpy as np
import pytest

from minicache_gguf import Llama, MergeConfig, _internals, cli
from minicache_gguf.alignment import CacheSim
from minicache_gguf.calfile import SHIPPED_DIR
from minicache_gguf.calibrate import FORBID_ENV, CalibrationMissing, PaperMergeWarning, default_merge
from minicache_gguf.llama import CalibrationTypeWarning


@pytest.fixture(scope="module")
def other_model(model_path, tmp_path_factory):
    """The default model's file with bytes appended: the same weights under another sha256, so no
    calibration of it is shipped or cached."""
    p = tmp_path_factory.mktemp("other") / "other-model.gguf"
    shutil.copyfile(model_path, p)
    with open(p, "ab") as f:
        f.write(b"\0" * 64)
    return p


@pytest.mark.parametrize("types", [("f16", "f16"), ("q4_0", "q4_0")])
def test_kv_merge_true_is_the_calibration_of_the_cache_type(model_path, types):
    """The shipped selection scored on this cache type: no warning, no calibration, aligned pools."""
    kw = dict(type_k=types[0], type_v=types[1], flash_attn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationTypeWarning)
        llm = Llama(model_path, n_ctx=512, verbose=False, kv_merge=True, **kw)
    assert llm.calibration.path.parent == SHIPPED_DIR and llm.calibration.types() == types
    assert llm.kv_stats().aligned_pools == len(llm.calibration.pairs) > 0
    llm.close()


def test_other_settings_rescore_never_fall_back(model_path, tmp_path, monkeypatch):
    """A cache type or window with no shipped selection starts a re-scoring (refused here: the
    suite forbids unasked calibrations), not the paper's merge. An empty cache directory: a
    selection a developer has cached for these settings would be picked instead."""
    assert os.environ.get(FORBID_ENV)
    monkeypatch.setenv("MINICACHE_GGUF_CACHE", str(tmp_path))
    for kw in (dict(kv_merge=MergeConfig(window=32)), dict(kv_merge=True, type_k="q8_0", type_v="q8_0", flash_attn=True)):
        with pytest.raises(RuntimeError, match="allow_calibration"):
            Llama(model_path, n_ctx=512, verbose=False, **kw)


def test_a_model_without_calibration_is_refused_with_its_cost(other_model, capsys):
    with pytest.raises(CalibrationMissing) as e:
        Llama(other_model, n_ctx=512, verbose=False, kv_merge=True)
    msg = str(e.value)
    assert msg.count("\n") == 0 and msg.startswith("kv_merge: no calibration of ")
    assert re.search(r"calibrating takes about \d+ (s|min|h) on this machine", msg), msg
    assert f"minicache-gguf calibrate -m {other_model}`" in msg and "calibration='paper'" in msg
    # the same on the command line (one line, exit 1), with the cache type in the command
    assert cli.main(["generate", "-m", str(other_model), "--kv-merge", "-ctk", "q4_0", "-ctv", "q4_0", "-p", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "calibrating takes about" in err and "-ctk q4_0 -ctv q4_0" in err
    # chat and serve: merging stays off by default, saying why in the same words
    kv, why = default_merge(other_model, MergeConfig())
    assert kv is False and why.startswith("merging off: no calibration of ") and "calibrating takes about" in why
    # a cache type calibrate cannot simulate: said, with what to do instead
    with pytest.raises(CalibrationMissing, match="calibrate scores only f16, f32, q8_0, q4_0 caches: use one of those"):
        Llama(other_model, n_ctx=512, verbose=False, kv_merge=True, type_k="q5_0", type_v="q5_0", flash_attn=True)


def test_the_papers_merge_is_named_and_warns_with_the_measured_figure(model_path):
    """On the default model adjacent layers are nearly orthogonal: asking for the paper's merge
    says so with the measured mean cosine similarity."""
    with pytest.warns(PaperMergeWarning, match=r"mean cosine similarity is K [+-]\d\.\d\d, V [+-]\d\.\d\d"):
        llm = Llama(model_path, n_ctx=256, verbose=False, kv_merge=MergeConfig(calibration="paper"))
    assert llm.calibration is None and llm.kv_stats().merged_layer_pairs == 7
    llm.close()


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_cache_simulation_holds_what_the_engine_holds(model_path, qtype):
    """calibrate scores a quantized cache on float32 rows made by CacheSim: quantized in llama.cpp's
    Hadamard basis with the CPU backend's rounding. Layer 0's K and V do not depend on the cache
    (they come from the embeddings alone): captured from a float32 cache and simulated, they equal
    the rows a q8_0/q4_0 engine stores (read from a merged pool whose window holds every token),
    up to a value on a rounding boundary landing on the neighbouring level."""
    n, d = 96, 192
    f32 = Llama(model_path, n_ctx=256, flash_attn=True, verbose=False, type_k="f32", type_v="f32")
    toks = f32.tokenize(b"The quick brown fox jumps over the lazy dog. " * 12)[:n]
    st = _internals.capture_kv(f32, toks)
    f32.close()
    sim = CacheSim(qtype, qtype, 64, 64)
    mc = Llama(model_path, n_ctx=256, flash_attn=True, verbose=False, type_k=qtype, type_v=qtype,
               kv_merge=MergeConfig(calibration="paper", start_layer=0, window=256))
    mc.eval(toks)
    for kind, rows in (("k", st.k), ("v", st.v)):
        want = sim._basis(kind, sim.stored(kind, rows[0]).astype(np.float64))  # the engine's rows are in its basis
        got = _internals.get_rows(mc._ctx.ctx, 0, kind, 0, n, d)
        scale = np.abs(want).max()
        off = np.abs(got - want) > 1e-4 * scale
        assert off.mean() < 0.01, f"{qtype} {kind}: {off.mean():.2%} of values differ"
        assert np.abs(got - want).max() <= 0.2 * scale
    mc.close()


def test_a_quantized_selection_is_scored_by_what_it_adds_to_the_type(model_path):
    """On a simulated q4_0 cache the selection's KLD is measured against the unquantized model and
    the stock q4_0 cache's own KLD is subtracted: the stock state adds 0, the unquantized state
    takes the type's whole error away, and an edit that is worse than q4_0 adds a positive amount."""
    from minicache_gguf import corpus, metrics
    from minicache_gguf.alignment import CacheSim

    n, e = 160, 24
    f32 = _internals.plain_llama(model_path, n_ctx=512, n_batch=512, flash_attn=True, verbose=False,
                                 type_k=0, type_v=0)  # GGML_TYPE_F32, as calibrate scores a simulated cache
    toks = corpus.tokens_for(f32, corpus.builtin_text("eval"), n + e, "eval")
    sim = CacheSim("q4_0", "q4_0", 64, 64)
    sc = metrics.KldScorer(f32, toks[:n], toks[n:n + e], stock=sim.stock)
    assert sc.base["next"] > 0
    assert sc.klds_added(sc.state)["next"] == pytest.approx(0.0, abs=1e-9)
    assert sc.klds_added(sc.exact_state)["next"] == pytest.approx(-sc.base["next"], abs=1e-9)
    # every layer's V rows of the first half zeroed: far worse than q4_0
    st = sc.state
    worse = type(st)(st.seq_id, st.pos, st.seq_ids, st.v_trans, list(st.k), [x.copy() for x in st.v])
    for x in worse.v:
        x[: n // 2] = 0
    assert sc.klds_added(worse)["next"] > sc.base["next"]
    f32.close()
