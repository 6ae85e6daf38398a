"""Merging stacked on quantized KV caches (q8_0, q4_0, ...): real engine, real default model,
the NumPy reference (dequantize -> merge -> quantize) as the oracle."""

import warnings

import numpy as np
import pydoc_data.topics
import pytest

from minicache_gguf import ConfigError, Llama, MergeConfig, _internals, reference
from minicache_gguf.calfile import SHIPPED_DIR, find_auto, load_calibration
from minicache_gguf.config import GGML_TYPES
from minicache_gguf.llama import CalibrationTypeWarning
from minicache_gguf.model import ModelInfo

N_LAYER, N_EMBD, N_HEAD_KV, HEAD = 30, 192, 3, 64


@pytest.fixture(scope="module")
def tokens(model_path):
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    llm = Llama(model_path, n_ctx=64, vocab_only=True, verbose=False)
    return llm.tokenize(text[:30000].encode())


@pytest.fixture(scope="module")
def shipped(model_path):
    path = find_auto(ModelInfo.of(model_path), MergeConfig())  # the f16 selection: scored on another type than these tests' caches
    assert path is not None and path.parent == SHIPPED_DIR, "no shipped f16 calibration"
    return path


def hadamard(n: int) -> np.ndarray:
    """llama.cpp's orthonormal Walsh-Hadamard matrix (Sylvester order, symmetric)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def full_rotation(spec) -> np.ndarray:
    if spec.form == "full":
        return spec.r.astype(np.float64)
    r = np.zeros((N_EMBD, N_EMBD))
    for h in range(N_HEAD_KV):
        r[h * HEAD:(h + 1) * HEAD, h * HEAD:(h + 1) * HEAD] = spec.r[h]
    return r


def assert_merged_rows(got, want, what):
    """The engine merges on the cache's backend in f32 ggml ops, the reference in f64: norms and
    directions agree to f32 rounding, and a direction value on a rounding boundary of the cache
    type can land on the neighbouring level (measured on this test: at most 2 rows of 236 per
    layer, within 0.15% of the row's norm)."""
    scale = np.linalg.norm(want, axis=1, keepdims=True)
    off = (np.abs(got - want) > 1e-5 * scale).any(axis=1)
    assert off.sum() <= max(2, len(want) // 50), f"{what}: {off.sum()} of {len(want)} rows differ beyond f32 rounding"
    rel = np.linalg.norm(got - want, axis=1) / scale[:, 0]
    assert rel.max() <= 1e-2, f"{what}: a row differs by {rel.max():.3g} of its norm"


def quant_llama(model_path, qtype, **kw):
    t = GGML_TYPES[qtype]
    opts = dict(n_ctx=512, flash_attn=True, logits_all=True, verbose=False, type_k=t, type_v=t)
    return Llama(model_path, **(opts | kw))


@pytest.mark.parametrize("aligned", [False, True], ids=["paper", "aligned"])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q8_0-k-flash-off"])
def test_quantized_merge_oracle(model_path, tokens, shipped, qtype, aligned):
    """Restored K/V of every merged pool == the reference: the exact rows llama.cpp wrote,
    dequantized, merged by reference.merge, the direction quantized with the CPU
    backend's rounding, dequantized and scaled by the norm (to f32 rounding, see
    assert_merged_rows; exact cells bit for bit); retained set == the reference's. Aligned pools
    run in llama.cpp's Hadamard basis: the engine's rotation is H R H."""
    n, w, gamma = 300, 64, 0.05
    # flash attention off: only K can be quantized (llama.cpp stores V transposed): K pools only
    flash = not qtype.endswith("flash-off")
    qtype = qtype.split("-")[0]
    cfg = MergeConfig(window=w, gamma=gamma, calibration=shipped if aligned else "paper", merge_v=flash)
    # n_ubatch 512: the n tokens are one ubatch, nothing merges before the step checked below
    kw = dict(flash_attn=flash, type_v=GGML_TYPES[qtype] if flash else GGML_TYPES["f16"], n_ubatch=512)
    if aligned:  # the shipped calibration was scored on f16: the wrapper says so
        with pytest.warns(CalibrationTypeWarning, match=f"scored on KV cache types f16/f16 .* this cache is {qtype}/"):
            mc = quant_llama(model_path, qtype, kv_merge=cfg, **kw)
    else:
        mc = quant_llama(model_path, qtype, kv_merge=cfg, **kw)
    stats = mc.kv_stats()
    assert (stats.hadamard_k, stats.hadamard_v) == (HEAD, HEAD if flash else 0)
    mc.eval(tokens[:n])
    pools = _internals.get_pairs(mc._ctx.ctx)
    rows = {(p.kind, l): _internals.get_rows(mc._ctx.ctx, l, p.kind, 0, n, N_EMBD)
            for p in pools for l in (p.layer, p.layer + 1)}
    mc.eval(tokens[n:n + 1])
    n_m = n - w
    assert mc.kv_stats().tokens_merged == n_m

    specs = {(p.kind, p.layer): p for p in (load_calibration(shipped, ModelInfo.of(model_path)).pairs if aligned else [])}
    h = np.kron(np.eye(N_EMBD // HEAD), hadamard(HEAD))
    for p in pools:
        a, b = p.layer, p.layer + 1
        rot = _internals.get_rotation(mc._ctx.ctx, a, p.kind)
        if aligned:
            # the calibrated R moved into the basis of the cached rows
            np.testing.assert_allclose(rot, h @ full_rotation(specs[p.kind, a]) @ h, atol=2e-6)
        else:
            assert rot is None
        ref = reference.merge(rows[p.kind, a][:n_m], rows[p.kind, b][:n_m], cfg.t, rot=rot)
        qdir = reference.dequantize(reference.quantize(ref.dir, qtype), qtype, N_EMBD)
        keep = reference.retain_select(ref.dist, gamma)
        state, dist = _internals.get_cells(mc._ctx.ctx, a, p.kind, 0, n)
        assert np.array_equal(state[:n_m] == 3, keep), f"retained set of {p.kind}{a}"
        np.testing.assert_allclose(dist[:n_m], ref.dist, atol=2e-6)
        for layer, norm, r in ((a, ref.norm0, rot), (b, ref.norm1, None)):
            want = reference.restore(qdir, norm, rot=r)
            want[keep] = rows[p.kind, layer][:n_m][keep]
            got = _internals.get_rows(mc._ctx.ctx, layer, p.kind, 0, n, N_EMBD)
            assert np.array_equal(got[:n_m][keep], want[keep])
            assert_merged_rows(got[:n_m], want, f"{qtype} {p.kind}{layer}")
            assert np.array_equal(got[n_m:], rows[p.kind, layer][n_m:])


def kld(p_logits, q_logits) -> np.ndarray:
    p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(q_logits - q_logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), axis=-1)


def _decode_logits(llm, toks, n_prompt):
    llm.eval(toks[:n_prompt])
    for t in toks[n_prompt:]:
        llm.eval([t])
    return llm.scores[n_prompt - 1:len(toks) - 1].copy()


def test_errors_do_not_amplify_on_q8_0(model_path, tokens, shipped):
    """Aligned merging stacked on q8_0 (decoding: the norms folded into attention over quantized
    directions) costs about what it costs on f16: KLD(q8_0 -> q8_0 + merge) <= 1.3 x KLD(f16 -> f16
    + merge) + 0.005 over 24 decoded tokens. A wrong basis for the rotations (H R H) would cost
    as much as the unaligned merge (~1 nat)."""
    toks = tokens[:424]
    cost = {}
    for qtype in ("f16", "q8_0"):
        base = _decode_logits(quant_llama(model_path, qtype), toks, 400)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationTypeWarning)  # said on q8_0: checked in the oracle test
            mc = quant_llama(model_path, qtype, kv_merge=MergeConfig(window=64, calibration=shipped))
        merged = _decode_logits(mc, toks, 400)
        cost[qtype] = float(kld(base, merged).mean())
    assert cost["q8_0"] <= 1.3 * cost["f16"] + 0.005, cost
    assert cost["f16"] < 0.2, cost


@pytest.mark.parametrize("n", [260, 300, 350])
def test_quantized_state_round_trip_and_type_refusal(model_path, tokens, n):
    """A restored state continues bit for bit: it keeps each exact row in its slot (the folded
    attention sums slot rows in slot order: a renumbering would reorder the rounding, which the Q4_1
    model's activation quantization turns into logit changes at some of these splits)."""
    cfg = MergeConfig(calibration="paper", window=32)
    llm = quant_llama(model_path, "q4_0", kv_merge=cfg)
    llm.eval(tokens[:n])
    state = llm.save_state()
    llm.eval(tokens[n:n + 10])
    first = llm.scores[n:n + 10].copy()
    other = quant_llama(model_path, "q4_0", kv_merge=cfg)
    other.load_state(state)
    other.eval(tokens[n:n + 10])
    assert np.array_equal(other.scores[n:n + 10], first)
    # the same layout in another cache type is refused, naming both
    q8 = quant_llama(model_path, "q8_0", kv_merge=cfg)
    with pytest.raises(ValueError, match="saved with KV cache types K q4_0, V q4_0, this Llama has K q8_0, V q8_0"):
        q8.load_state(state)
    # a raw blob (no Python metadata) is refused by llama.cpp, and the cache stays usable
    del state.kv_types
    with pytest.raises(RuntimeError, match="llama.cpp refused the state"):
        q8.load_state(state)
    q8.eval(tokens[:40])
    assert np.all(np.isfinite(q8.scores[:40]))


def test_quantized_refusals(model_path):
    with pytest.raises(ConfigError, match="type_v=q4_0 needs flash_attn=True"):
        Llama(model_path, n_ctx=512, verbose=False, type_v=GGML_TYPES["q4_0"], kv_merge=True)
    with pytest.raises(ConfigError, match="type_k=12 is not valid: expected one of f32 \\(0\\)"):
        Llama(model_path, n_ctx=512, verbose=False, flash_attn=True, type_k=12, kv_merge=True)
    with pytest.raises(ConfigError, match="type_k='q3' is not valid: expected one of f32 \\(0\\), f16 \\(1\\)"):
        Llama(model_path, n_ctx=512, verbose=False, type_k="q3", kv_merge=True)
    # names are accepted like llama.cpp's -ctk/-ctv; quantized K works with flash attention off
    llm = Llama(model_path, n_ctx=512, verbose=False, type_k="q8_0", kv_merge=MergeConfig(calibration="paper", window=16))
    toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 8)
    llm.eval(toks[:-1])
    last = _internals.eval_logits(llm, toks[-1:])  # decoding: the tokens that left the window are merged first
    assert llm.kv_stats().tokens_merged > 0 and np.all(np.isfinite(last))


def test_unit_directions_cost_what_rows_cost(model_path, tokens):
    """Block formats scale each block by its own absmax, so a unit direction quantizes with the
    same relative error as the raw row (the norm stays exact, in F32): measured on real K/V rows."""
    llm = Llama(model_path, n_ctx=512, verbose=False)
    llm.eval(tokens[:400])
    for qtype in ("q8_0", "q4_0"):
        for kind in "kv":
            x = np.concatenate([_internals.get_rows(llm._ctx.ctx, l, kind, 0, 400, N_EMBD) for l in range(15, 30)])
            n = np.linalg.norm(x, axis=1, keepdims=True)
            u = (x / n).astype(np.float32)
            err_row = np.linalg.norm(reference.dequantize(reference.quantize(x, qtype), qtype, N_EMBD) - x, axis=1) / n[:, 0]
            err_dir = np.linalg.norm(reference.dequantize(reference.quantize(u, qtype), qtype, N_EMBD) - u, axis=1)
            assert err_dir.mean() == pytest.approx(err_row.mean(), rel=0.01), (qtype, kind, err_dir.mean(), err_row.mean())


@pytest.mark.parametrize("qtype,flash_attn", [("bf16", False), ("q5_0", True), ("q5_1", True), ("q4_1", True),
                                              ("iq4_nl", True), ("f32", False)])
def test_every_cache_type_merges(model_path, tokens, shipped, qtype, flash_attn, on_gpu):
    """The other llama.cpp KV types: merged, decoded through both attention paths (the prompt
    restores, decoding folds), finite, and close to the same type unmerged (a wrong layout or
    basis costs ~1 nat). CUDA cannot read iq4_nl rows of a head's width back (GET_ROWS): refused."""
    toks = tokens[:344]
    if on_gpu and qtype == "iq4_nl":
        with pytest.raises(ConfigError, match="backend cannot run GET_ROWS of iq4_nl rows"), warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationTypeWarning)
            Llama(model_path, n_ctx=512, flash_attn=flash_attn, verbose=False, type_k=qtype, type_v=qtype,
                  kv_merge=MergeConfig(window=64, calibration=shipped))
        return

    def run(kv_merge):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationTypeWarning)
            llm = Llama(model_path, n_ctx=512, flash_attn=flash_attn, logits_all=True, verbose=False,
                        type_k=qtype, type_v=qtype, kv_merge=kv_merge)
        return llm, _decode_logits(llm, toks, 320)

    _, base = run(False)
    llm, merged = run(MergeConfig(window=64, calibration=shipped))
    assert llm.kv_stats().tokens_merged > 200
    assert np.all(np.isfinite(merged))
    assert float(kld(base, merged).mean()) < 0.3
