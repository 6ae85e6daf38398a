"""The merged cache on the layouts users run (random-weight GGUFs written by tests/synth.py):
Llama 3 GQA (8 KV heads x 128), Llama 2 MHA (32 x 128), Qwen2 (q/k/v biases, 128), Phi-3 (96).
Engine == the NumPy reference after a merge step, f16 / q8_0 / q4_0, flash attention on and off;
the state round trip; seq_rm and continue."""

import warnings

import numpy as np
import pytest

import synth
from minicache_gguf import ConfigError, Llama, MergeConfig, _internals, reference
from minicache_gguf.config import GGML_TYPES
from minicache_gguf.llama import PaperMergeWarning

MATRIX = ("llama-gqa", "llama-mha", "qwen2", "phi3")
# (K type, V type, flash attention): with flash attention off llama.cpp keeps V transposed and f16
CASES = {"f16": ("f16", "f16", True), "f16-flash-off": ("f16", "f16", False), "q8_0": ("q8_0", "q8_0", True),
         "q8_0-k-flash-off": ("q8_0", "f16", False), "q4_0": ("q4_0", "q4_0", True)}
N, W, GAMMA = 300, 64, 0.05


class _Models(dict):
    """Layout name -> a random-weight GGUF of it, written on first use."""

    def __init__(self, d, tokenizer_from):
        super().__init__()
        self.d, self.tokenizer_from = d, tokenizer_from

    def __missing__(self, name):
        self[name] = synth.write(self.d / f"{name}.gguf", synth.LAYOUTS[name], self.tokenizer_from)
        return self[name]


@pytest.fixture(scope="session")
def synth_models(tmp_path_factory, model_path):
    return _Models(tmp_path_factory.mktemp("synth"), model_path)


@pytest.fixture(scope="module")
def tokens(model_path):
    import pydoc_data.topics
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    llm = Llama(model_path, n_ctx=64, vocab_only=True, verbose=False)
    return llm.tokenize(text[:8000].encode())


def make(path, case, merge=None, **kw):
    tk, tv, flash = CASES[case]
    opts = dict(n_ctx=512, n_ubatch=512, flash_attn=flash, type_k=GGML_TYPES[tk], type_v=GGML_TYPES[tv],
                logits_all=True, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PaperMergeWarning)  # random weights: the premise fails, on purpose
        return Llama(path, **(opts | kw), kv_merge=merge)


def paper(case, **kw):
    return MergeConfig(calibration="paper", window=W, gamma=GAMMA, start_layer=0, merge_v=CASES[case][2], **kw)


def expected_rows(rows_a, rows_b, qtype, n_embd):
    """The reference merge of one pool's first N - W cells: (retained mask, restored a, restored b)."""
    n_m = N - W
    if qtype == "f16":
        ref = reference.merge(rows_a[:n_m], rows_b[:n_m], 0.6, out_dtype=np.float16)
        d = ref.dir
    else:
        ref = reference.merge(rows_a[:n_m], rows_b[:n_m], 0.6)
        d = reference.dequantize(reference.quantize(ref.dir, qtype), qtype, n_embd)
    keep = reference.retain_select(ref.dist, GAMMA)
    out = []
    for rows, norm in ((rows_a, ref.norm0), (rows_b, ref.norm1)):
        want = reference.restore(d, norm, out_dtype=np.float16 if qtype == "f16" else np.float32).astype(np.float32)
        want[keep] = rows[:n_m][keep]
        out.append(want)
    return keep, ref.dist, out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", MATRIX)
def test_layout_merge_oracle(synth_models, tokens, layout, case):
    """Restored K/V of every merged pool == the reference merge of the rows llama.cpp wrote (to one
    rounding of the cache type, as on the default model: test_engine / test_quantized); the
    retained set == the reference's; before anything merges, the prompt's logits are the stock
    cache's of the same type, bit for bit."""
    L = synth.LAYOUTS[layout]
    E = L.n_embd_kv
    path = synth_models[layout]
    tk, tv, flash = CASES[case]
    mc = make(path, case, paper(case))
    stock = make(path, case)
    mc.eval(tokens[:N])
    stock.eval(tokens[:N])
    # merged layers restore their rows to the cache's own type: the prompt runs as on the stock cache
    assert np.array_equal(mc.scores[:N], stock.scores[:N]), "nothing merged yet: the prompt's logits are stock's"
    pools = _internals.get_pairs(mc._ctx.ctx)
    assert {(p.kind, p.layer) for p in pools} == {(k, a) for a in (0, 2) for k in ("kv" if flash else "k")}
    rows = {(p.kind, l): _internals.get_rows(mc._ctx.ctx, l, p.kind, 0, N, E) for p in pools for l in (p.layer, p.layer + 1)}
    mc.eval(tokens[N:N + 1])
    n_m = N - W
    assert mc.kv_stats().tokens_merged == n_m
    for p in pools:
        a, b = p.layer, p.layer + 1
        qtype = tk if p.kind == "k" else tv
        keep, dist, want = expected_rows(rows[p.kind, a], rows[p.kind, b], qtype, E)
        state, got_dist = _internals.get_cells(mc._ctx.ctx, a, p.kind, 0, N)
        assert np.array_equal(state[:n_m] == 3, keep), f"{layout} {case}: retained set of {p.kind}{a}"
        np.testing.assert_allclose(got_dist[:n_m], dist, atol=2e-6)
        for layer, w in ((a, want[0]), (b, want[1])):
            got = _internals.get_rows(mc._ctx.ctx, layer, p.kind, 0, N, E)
            what = f"{layout} {case} {p.kind}{layer}"
            assert np.array_equal(got[:n_m][keep], w[keep]), f"{what}: retained rows are exact"
            assert np.array_equal(got[n_m:], rows[p.kind, layer][n_m:]), f"{what}: the window is exact"
            scale = np.linalg.norm(w, axis=1, keepdims=True)
            if qtype == "f16":  # one f16 rounding of the row's scale
                np.testing.assert_allclose(got[:n_m], w, rtol=1e-3, atol=1e-3 * np.abs(w).max(), err_msg=what)
            else:  # f32 ops vs f64: a value on a rounding boundary of the type may land on the next level
                # counted per 32-value block: a block whose largest value moves changes its scale, so all its values
                off = (np.abs(got[:n_m] - w) > 1e-5 * scale).reshape(n_m, -1, 32).any(axis=2)
                assert off.sum() <= max(4, off.size // 1000), f"{what}: {off.sum()} of {off.size} blocks differ beyond f32 rounding"
                # and such a row is off by about one level of the type (a q4_0 level is 1/8 of its block's largest value)
                rel = (np.linalg.norm(got[:n_m] - w, axis=1) / scale[:, 0]).max()
                assert rel <= {"q8_0": 1e-2, "q4_0": 5e-2}[qtype], f"{what}: a row differs by {rel:.3g} of its norm"
    assert np.isfinite(mc.scores[N]).all()


@pytest.mark.parametrize("case", ["f16", "q4_0"])
@pytest.mark.parametrize("layout", MATRIX)
def test_layout_state_round_trip_and_seq_rm(synth_models, tokens, layout, case):
    """After merging: a saved state continues identically in a fresh context, and removing the
    last cells (seq_rm, as llama-cpp-python does for a shared prefix) then re-evaluating them gives
    the same logits as the first time."""
    path = synth_models[layout]
    cfg = paper(case)
    llm = make(path, case, cfg, logits_all=False)  # the state then carries one row of logits
    llm.eval(tokens[:N])
    llm.eval(tokens[N:N + 1])
    assert llm.kv_stats().tokens_merged == N - W
    state = llm.save_state()
    stats = llm.kv_stats()
    cont = tokens[N + 1:N + 21]
    # the logits llama.cpp returns (Llama.scores holds none without logits_all)
    first = _internals.eval_logits(llm, cont)[-1]
    assert np.isfinite(first).all()

    llm.n_tokens = N + 1  # seq_rm of the 20 cells just written (staged: nothing merged since)
    assert np.array_equal(_internals.eval_logits(llm, cont)[-1], first)

    other = make(path, case, cfg, logits_all=False)
    other.load_state(state)
    assert other.kv_stats() == stats
    assert np.array_equal(_internals.eval_logits(other, cont)[-1], first)


def test_a_head_width_that_does_not_fit_a_block(synth_models, tokens):
    """Heads of 80 values (Phi-2's width) do not hold whole 32-value q8_0/q4_0 blocks: merging on
    such a cache is refused before llama.cpp runs, naming the type and the width; f16 merges."""
    path = synth_models["llama-h80"]
    for case in ("q8_0", "q4_0", "q8_0-k-flash-off"):
        tk = CASES[case][0]
        with pytest.raises(ConfigError, match=f"type_k={tk} needs heads that hold whole 32-value blocks; "
                                              "this model's K heads have 80 values"):
            make(path, case, paper(case))
    llm = make(path, "f16", paper("f16"), logits_all=False)
    llm.eval(tokens[:N])
    last = _internals.eval_logits(llm, tokens[N:N + 1])
    assert llm.kv_stats().tokens_merged == N - W and np.isfinite(last).all()
