"""Interleaved sliding-window models (llama.cpp's iSWA cache), on the real Gemma 3 270M Q4_K_M
(assembled from its sha256-pinned part wheels): the state of its two caches is read and written
back byte for byte; analyze pairs layers of the same cache; the sliding-window layers keep a
window-sized cache by default, and a prompt that rewinds past what that cache still holds is
evaluated from scratch (same logits as a new context; stock llama-cpp-python reuses the prefix and
gets other logits); kv_merge and calibrate refuse the model in one line."""

import numpy as np
import pytest

from minicache_gguf import ConfigError, Llama, MergeConfig, _internals, analyze, kvstate
from minicache_gguf.model import ModelInfo, gemma3_model_path

FULL = [5, 11, 17]
SWA = [il for il in range(18) if il not in FULL]
N_SWA = 512


@pytest.fixture(scope="module")
def gemma():
    return str(gemma3_model_path())


def test_layers_of_each_cache(gemma):
    info = ModelInfo.of(gemma)
    assert (info.arch, info.n_layer, info.n_head_kv, info.n_embd_k) == ("gemma3", 18, 1, 256)
    assert info.cache_layers() == [FULL, SWA]


def _tokens(n, seed=0):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(1000, 20000, size=n)]


def test_iswa_state_round_trip(gemma):
    llm = Llama(gemma, n_ctx=2048, verbose=False)
    try:
        llm.eval(_tokens(1200))
        blob = _internals.seq_state(llm)
    finally:
        llm.close()
    st = kvstate.parse_seq_state(blob, ModelInfo.of(gemma).cache_layers())
    assert st.layers == FULL and st.next.layers == SWA and st.next.next is None
    assert st.n_cells == 1200 and list(st.pos) == list(range(1200))
    # the sliding-window cache writes the cells inside the window of the last position (in cell order:
    # it reuses the cells that left the window)
    assert sorted(st.next.pos) == list(range(1200 - N_SWA, 1200))
    assert len(st.k) == len(st.v) == 3 and len(st.next.k) == 15
    assert kvstate.serialize_seq_state(st) == blob
    with pytest.raises(kvstate.KvStateError, match="trailing bytes.*layer_groups"):
        kvstate.parse_seq_state(blob)
    with pytest.raises(kvstate.KvStateError, match="holds 3 layers"):
        kvstate.parse_seq_state(blob, [SWA, FULL])
    with pytest.raises(kvstate.KvStateError, match="not a state"):
        st.truncated(100)


def test_analyze_pairs_layers_of_the_same_cache(gemma):
    res = analyze.analyze(gemma, tokens=256, progress=False)
    pairs = {(r["cache"], tuple(r["pair"])) for r in res["pairs"] if r["kind"] == "k"}
    assert pairs == {("full attention", (5, 11)), ("full attention", (11, 17))} | {
        ("sliding window", (a, b)) for a, b in zip(SWA, SWA[1:])}
    for r in res["pairs"]:
        for c in ("row_raw", "row_aligned"):
            assert -1.0 <= r[c]["mean"] <= 1.0
    table = analyze.to_markdown(res)
    assert "| full attention | 5-11 |" in table and "| sliding window | 4-6 |" in table


def test_sliding_window_cache_is_window_sized_by_default(gemma):
    """kv_bytes of both caches, in closed form: 2 (K, V) x 256 values x 2 bytes per layer and cell;
    the sliding-window cache holds n_swa + n_ubatch cells rounded up to 256 (llama.cpp's iSWA cache)."""
    n_ctx, n_ubatch = 8192, 512
    per_cell = 2 * 256 * 2
    sizes = {}
    for full in (None, True):
        kw = {} if full is None else {"swa_full": full}
        llm = Llama(gemma, n_ctx=n_ctx, n_ubatch=n_ubatch, verbose=False, **kw)
        try:
            sizes[full] = llm.kv_stats().kv_bytes
        finally:
            llm.close()
    swa_cells = -(-(N_SWA + n_ubatch) // 256) * 256
    assert sizes[None] == per_cell * (len(FULL) * n_ctx + len(SWA) * swa_cells)
    assert sizes[True] == per_cell * 18 * n_ctx


def _first_logits(llm, prompt):
    gen = llm.generate(prompt, temp=0.0)
    tok = next(gen)
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
    gen.close()
    return tok, logits


def test_a_rewind_past_the_window_is_evaluated_from_scratch(gemma):
    import llama_cpp

    first = _tokens(1500, seed=1)
    deep = first[:600] + _tokens(40, seed=2)      # rewinds 900 tokens: past the window
    shallow = first[:1400] + _tokens(40, seed=3)  # rewinds 100: the window before it is still cached
    fresh = {}
    for name, prompt in (("deep", deep), ("shallow", shallow)):
        llm = Llama(gemma, n_ctx=2048, verbose=False)
        try:
            fresh[name] = _first_logits(llm, prompt)
        finally:
            llm.close()

    llm = Llama(gemma, n_ctx=2048, verbose=False)
    try:
        _first_logits(llm, first)
        assert llm.reusable_prefix(deep) == 0
        tok, logits = _first_logits(llm, deep)
        assert tok == fresh["deep"][0] and np.array_equal(logits, fresh["deep"][1])

        _first_logits(llm, first)
        assert llm.reusable_prefix(shallow) == 1400
        tok, logits = _first_logits(llm, shallow)
        assert tok == fresh["shallow"][0]
        assert np.abs(logits - fresh["shallow"][1]).max() < 1e-3 * np.abs(fresh["shallow"][1]).max()
    finally:
        llm.close()

    # what the check prevents: stock llama-cpp-python with the same cache reuses the deep prefix
    stock = llama_cpp.Llama(gemma, n_ctx=2048, swa_full=False, verbose=False)
    try:
        _first_logits(stock, first)
        _, logits = _first_logits(stock, deep)
        assert np.abs(logits - fresh["deep"][1]).max() > 1.0
    finally:
        stock.close()


def test_kv_merge_and_calibrate_refuse_an_iswa_model(gemma, allow_calibration):
    with pytest.raises(ConfigError, match=r"interleaved sliding-window layers.*\[5, 11, 17\].*not adjacent"):
        Llama(gemma, kv_merge=True, verbose=False)
    with pytest.raises(ConfigError, match="interleaved sliding-window layers"):
        Llama(gemma, kv_merge=MergeConfig(calibration="paper"), verbose=False)
    from minicache_gguf import calibrate

    with pytest.raises(ConfigError, match="calibrate: .*interleaved sliding-window layers"):
        calibrate.calibrate(gemma, progress=False)
