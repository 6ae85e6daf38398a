"""The merged KV cache inside llama.cpp: real engine, real default model."""

import numpy as np
import pydoc_data.topics
import pytest

from minicache_gguf import ConfigError, Llama, MergeConfig, _internals, kvstate, reference
from minicache_gguf.config import MERGE_BLOCK, merged_n_ubatch
from minicache_gguf.layout import expected_layout
from minicache_gguf.llama import llama_cpp

N_LAYER, N_EMBD = 30, 192  # SmolLM2-135M: 3 KV heads x 64


@pytest.fixture(scope="module")
def tokens(model_path):
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    llm = Llama(model_path, n_ctx=64, vocab_only=True, verbose=False)
    return llm.tokenize(text[:60000].encode())


def merged_pairs(cfg=MergeConfig(calibration="paper")):
    return cfg.pairs(N_LAYER)


def kl(logits_p, logits_q) -> float:
    p = np.exp(logits_p - logits_p.max())
    p /= p.sum()
    q = np.exp(logits_q - logits_q.max())
    q /= q.sum()
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


@pytest.mark.parametrize("flash_attn", [False, True], ids=["flash_off", "flash_on"])
def test_equivalence_oracle(model_path, tokens, flash_attn):
    """Restored K/V == the NumPy reference merge of the unmerged K/V (to one f16 rounding: the
    engine merges on the cache's backend in f32 ggml ops, the reference in f64; both round to f16
    once); retained set == the reference's; next-token logits == a stock cache holding the
    reference-restored K/V within the rounding gap that separates llama.cpp's own two attention
    paths on that cache (a decoding step folds the norms into the attention instead of restoring
    K/V, so it rounds differently; prompt ubatches restore K/V and match bit for bit)."""
    n, w, gamma = 300, 64, 0.05
    cfg = MergeConfig(calibration="paper", window=w, gamma=gamma)
    dense = Llama(model_path, n_ctx=512, flash_attn=flash_attn, logits_all=True, verbose=False)
    dense.eval(tokens[:n])
    st = kvstate.parse_seq_state(kvstate.get_seq_state(llama_cpp, dense._ctx.ctx))
    assert st.n_cells == n and len(st.k) == N_LAYER and st.v_trans == (not flash_attn)

    # n_ubatch 512 (a merged context's default is the window, >= 256): the n tokens are one ubatch, as for the stock cache
    mc = Llama(model_path, n_ctx=512, n_ubatch=512, flash_attn=flash_attn, logits_all=True, verbose=False, kv_merge=cfg)
    mc.eval(tokens[:n])
    # nothing merged yet: every row and every logit is the stock one
    for layer in range(N_LAYER):
        for kind, rows in (("k", st.k), ("v", st.v)):
            assert np.array_equal(_internals.get_rows(mc._ctx.ctx, layer, kind, 0, n, N_EMBD), rows[layer].astype(np.float32))
    assert np.array_equal(mc.scores[:n], dense.scores[:n])

    mc.eval(tokens[n:n + 1])  # the oldest n - w tokens leave the window and are merged
    n_m = n - w
    stats = mc.kv_stats()
    assert (stats.tokens, stats.tokens_merged, stats.tokens_staged) == (n + 1, n_m, w + 1)

    for a, b in merged_pairs():
        for kind, rows in (("k", st.k), ("v", st.v)):
            ref = reference.merge(rows[a][:n_m], rows[b][:n_m], cfg.t, out_dtype=np.float16)
            keep = reference.retain_select(ref.dist, gamma)
            assert keep.sum() == reference.retain_count(n_m, gamma)
            state, dist = _internals.get_cells(mc._ctx.ctx, a, kind, 0, n)
            assert np.array_equal(state[:n_m] == 3, keep), f"retained set of layers {a},{b} {kind}"
            assert np.all(np.isin(state[:n_m], (2, 3))) and np.all(state[n_m:] == 1)
            np.testing.assert_allclose(dist[:n_m], ref.dist, atol=2e-6)
            for layer, norm in ((a, ref.norm0), (b, ref.norm1)):
                want = reference.restore(ref.dir, norm, out_dtype=np.float16).astype(np.float32)
                want[keep] = rows[layer][:n_m][keep]
                got = _internals.get_rows(mc._ctx.ctx, layer, kind, 0, n, N_EMBD)
                # f16 tolerance: one f16 ulp of the row's scale
                np.testing.assert_allclose(got[:n_m], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
                assert np.array_equal(got[n_m:], rows[layer][n_m:].astype(np.float32))
                rows[layer][:n_m] = want.astype(np.float16)

    kvstate.set_seq_state(llama_cpp, dense._ctx.ctx, kvstate.serialize_seq_state(st))
    dense.eval(tokens[n:n + 1])
    got, want = mc.scores[n], dense.scores[n]
    # the same reference cache through llama.cpp's other attention path: its own rounding gap
    other = Llama(model_path, n_ctx=512, flash_attn=not flash_attn, logits_all=True, verbose=False)
    other.eval(tokens[:n])
    st.v_trans = flash_attn  # the other path's V layout
    kvstate.set_seq_state(llama_cpp, other._ctx.ctx, kvstate.serialize_seq_state(st))
    other.eval(tokens[n:n + 1])
    alt = other.scores[n]
    assert np.abs(got - want).max() <= np.abs(alt - want).max(), (np.abs(got - want).max(), np.abs(alt - want).max())
    assert kl(want, got) <= max(kl(want, alt), 1e-3)
    assert got.argmax() == want.argmax()


@pytest.mark.parametrize("flash_attn", [False, True], ids=["flash_off", "flash_on"])
def test_merge_step_runs_on_the_cache_backend(model_path, tokens, flash_attn):
    """Merging copies no row between the host and the cache: the merge step is graphs computed on
    the backend holding the pools (here the CPU backend), and only state save/load and get_rows
    move rows (counted by the engine)."""
    llm = Llama(model_path, n_ctx=512, flash_attn=flash_attn, verbose=False, kv_merge=MergeConfig(calibration="paper", window=32))
    llm.eval(tokens[:200])
    for t in tokens[200:230]:  # the first decoding step merges the 168 staged tokens beyond the window
        llm.eval([t])
    s = llm.kv_stats()
    assert s.tokens_merged == 200 - 32 and s.tokens_retained > 0
    assert s.host_rows == 0, s.host_rows
    assert s.merge_graphs >= 2  # the distances, then the demoted directions and what is zeroed
    llm.save_state()
    assert llm.kv_stats().host_rows > 0  # the counter counts


@pytest.mark.parametrize("flash_attn", [False, True], ids=["flash_off", "flash_on"])
def test_decoding_merges_once_per_block(model_path, tokens, flash_attn):
    """A decoding sequence merges once per MERGE_BLOCK tokens: the merge step's graph computes,
    host-to-device copies and waits (counted by the engine) happen only at the tokens that merge, and
    each of those merges the block of staged tokens beyond the window; the other tokens add none."""
    w, b, n0 = 32, MERGE_BLOCK, 100
    llm = Llama(model_path, n_ctx=1024, flash_attn=flash_attn, verbose=False, kv_merge=MergeConfig(calibration="paper", window=w))
    llm.eval(tokens[:n0])
    assert llm.kv_stats().tokens_merged == 0  # the prompt fits the staging pool
    counts = []
    for t in tokens[n0:n0 + 3 * b + 1]:
        s0 = llm.kv_stats()
        llm.eval([t])
        s1 = llm.kv_stats()
        counts.append((s1.merge_graphs - s0.merge_graphs, s1.merge_uploads - s0.merge_uploads,
                       s1.merge_syncs - s0.merge_syncs, s1.tokens_merged - s0.tokens_merged))
    busy = [i for i, c in enumerate(counts) if any(c[:3])]
    assert busy == [0, b, 2 * b, 3 * b], busy
    assert [counts[i][3] for i in busy] == [n0 - w, b, b, b]
    for i in busy:
        graphs, uploads, syncs, _ = counts[i]
        # the distances graph (and its read-back), the demoted directions, the zeroed rows and norms
        assert 1 <= graphs <= 3 and syncs <= graphs + 1 and uploads >= 1, counts[i]
    assert llm.kv_stats().tokens_staged <= w + b


def test_flash_attention_on_and_off_agree(model_path, tokens):
    """With or without flash attention (V transposed or not), a merged cache gives the same
    results up to the difference the two attention paths already have on a stock cache."""
    cfg = MergeConfig(calibration="paper", window=32)
    runs = {}
    for fa in (False, True):
        for kv_merge in (False, cfg):
            llm = Llama(model_path, n_ctx=512, flash_attn=fa, logits_all=True, verbose=False, kv_merge=kv_merge)
            llm.eval(tokens[:200])
            llm.eval(tokens[200:210])
            runs[fa, bool(kv_merge)] = (llm.scores[:210].copy(),
                                        _internals.get_rows(llm._ctx.ctx, 20, "v", 0, 210, N_EMBD))
    for part in (0, 1):  # logits, and the restored V of a merged layer
        stock_gap = np.abs(runs[False, False][part] - runs[True, False][part]).max()
        merged_gap = np.abs(runs[False, True][part] - runs[True, True][part]).max()
        assert merged_gap <= 2 * stock_gap + 1e-3, (part, merged_gap, stock_gap)


@pytest.mark.parametrize("n_ctx,type_k,type_v", [(512, "f16", "f16"), (2048, "f16", "f16"), (8192, "f16", "f16"),
                                               (8192, "q4_0", "q4_0"), (4096, "q8_0", "q5_1")])
def test_memory_matches_closed_form(model_path, n_ctx, type_k, type_v):
    cfg = MergeConfig(calibration="paper")
    types = dict(flash_attn=True, type_k=type_k, type_v=type_v)
    mc = Llama(model_path, n_ctx=n_ctx, verbose=False, kv_merge=cfg, **types)
    s = mc.kv_stats()
    want = expected_layout(N_LAYER, N_EMBD, N_EMBD, n_ctx, cfg, n_ubatch=merged_n_ubatch(cfg.window), type_k=type_k, type_v=type_v)
    assert s.kv_bytes == pytest.approx(want.kv_bytes, rel=0.01)
    assert s.kv_bytes_dense == want.kv_bytes_dense
    assert (s.merged_layer_pairs, s.staging_capacity, s.retention_capacity) == (want.n_pairs, want.staging, want.retention)
    mc.close()

    stock = Llama(model_path, n_ctx=n_ctx, verbose=False, **types)
    dense = stock.kv_stats()
    assert dense.start_layer == -1 and dense.kv_bytes == pytest.approx(want.kv_bytes_dense, rel=0.01)
    assert s.kv_bytes < dense.kv_bytes  # it really allocates less
    assert s.ratio == pytest.approx(dense.kv_bytes / s.kv_bytes, rel=0.01)


@pytest.mark.parametrize("n_ctx", [512, 1024, 2048, 4096])
def test_never_more_memory_than_stock(model_path, n_ctx):
    """With default settings the merged cache allocates less than the stock one at every n_ctx >= 512,
    for the paper's layout and the shipped calibration (the fewest pools); an explicit n_ubatch of
    512 (a staging pool of 512 rows) is the user's choice and may cost more at 512."""
    stock = Llama(model_path, n_ctx=n_ctx, verbose=False).kv_stats().kv_bytes
    for cfg in (MergeConfig(calibration="paper"), MergeConfig(calibration="auto")):
        llm = Llama(model_path, n_ctx=n_ctx, verbose=False, kv_merge=cfg)
        s = llm.kv_stats()
        assert s.staging_capacity == min(n_ctx, 256 + MERGE_BLOCK)
        assert s.kv_bytes < stock, (cfg.calibration, n_ctx, s.kv_bytes, stock)
        llm.close()


def test_high_level_api(model_path):
    cfg = MergeConfig(calibration="paper", window=16)
    llm = Llama(model_path, n_ctx=1024, verbose=False, kv_merge=cfg)
    prompt = "Q: What is the capital of France?\nA:"
    first = llm.create_completion(prompt, max_tokens=48, temperature=0)["choices"][0]["text"]
    assert first.strip()
    # a shared prefix: llama-cpp-python keeps the common cells and removes the rest (seq_rm)
    again = llm.create_completion(prompt + first[:10], max_tokens=16, temperature=0)["choices"][0]["text"]
    assert again.strip()
    chat = llm.create_chat_completion([{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0)
    assert chat["choices"][0]["message"]["content"]
    chunks = list(llm.create_completion(prompt, max_tokens=12, temperature=0, stream=True))
    assert len(chunks) >= 2 and "".join(c["choices"][0]["text"] for c in chunks).strip()
    # a fresh context and a reset one produce the same greedy continuation
    llm.reset()
    after_reset = llm.create_completion(prompt, max_tokens=48, temperature=0)["choices"][0]["text"]
    assert after_reset == first
    s = llm.kv_stats()
    assert s.tokens == s.tokens_merged + s.tokens_staged
    assert s.tokens_staged <= cfg.window + MERGE_BLOCK  # merged once per block


def test_long_generation_crosses_the_window(model_path):
    cfg = MergeConfig(calibration="paper", window=16, gamma=0.1)
    llm = Llama(model_path, n_ctx=1024, verbose=False, kv_merge=cfg)
    out = llm.create_completion("Once upon a time,", max_tokens=300, temperature=0.8, seed=1)
    assert out["usage"]["completion_tokens"] > 50
    s = llm.kv_stats()
    assert s.tokens_merged >= s.tokens - cfg.window - MERGE_BLOCK > 0
    assert s.tokens_retained == pytest.approx(min(np.ceil(0.1 * s.tokens_merged - 1e-7 * s.tokens_merged), s.retention_capacity))


def test_bad_input_is_refused_clearly(model_path):
    with pytest.raises(ConfigError, match=r"start_layer=40 is not valid for this model \(30 layers\)"):
        Llama(model_path, n_ctx=256, verbose=False, kv_merge=MergeConfig(calibration="paper", start_layer=40))
    with pytest.raises(ValueError, match="type_v=q8_0 needs flash_attn=True"):
        Llama(model_path, n_ctx=256, verbose=False, kv_merge=True, type_v=llama_cpp.GGML_TYPE_Q8_0)
    with pytest.raises(ValueError, match="embedding=True is not supported"):
        Llama(model_path, n_ctx=256, verbose=False, kv_merge=True, embedding=True)
    llm = Llama(model_path, n_ctx=256, verbose=False, kv_merge=True)
    assert not llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(llm._ctx.ctx))


def test_state_round_trip_and_refusals(model_path, tokens):
    cfg = MergeConfig(calibration="paper", window=32)
    llm = Llama(model_path, n_ctx=1024, verbose=False, kv_merge=cfg)
    prompt = llm.detokenize(tokens[:400]).decode(errors="ignore")
    llm.create_completion(prompt, max_tokens=8, temperature=0)
    s = llm.kv_stats()
    assert s.tokens_merged > 300 and s.tokens_retained > 0
    state = llm.save_state()
    first = llm.create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
    llm.load_state(state)
    assert llm.kv_stats() == s
    again = llm.create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
    assert again == first and first.strip()

    # into a fresh context of the same layout: the same continuation
    other = Llama(model_path, n_ctx=1024, verbose=False, kv_merge=cfg)
    other.load_state(state)
    assert other.create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"] == first

    # the other mode, or another layout, is refused with a clear error
    stock = Llama(model_path, n_ctx=1024, verbose=False)
    with pytest.raises(ValueError, match="saved with kv_merge=.*this Llama has kv_merge=None"):
        stock.load_state(state)
    del state.kv_merge  # what a raw blob would be: llama.cpp itself refuses it
    with pytest.raises(RuntimeError, match="llama.cpp refused the state"):
        stock.load_state(state)
    shifted = Llama(model_path, n_ctx=1024, verbose=False, kv_merge=MergeConfig(calibration="paper", window=32, start_layer=17))
    with pytest.raises(RuntimeError, match="llama.cpp refused the state"):
        shifted.load_state(state)
    with pytest.raises(RuntimeError, match="llama.cpp refused the state"):
        llm.load_state(_stock_state(stock, tokens))
    # per-sequence blobs: a merged one is tagged, a stock reader refuses it
    blob = kvstate.get_seq_state(llama_cpp, other._ctx.ctx)
    with pytest.raises(kvstate.KvStateError, match="MiniCache merged KV state"):
        kvstate.parse_seq_state(blob)
    with pytest.raises(kvstate.KvStateError):
        kvstate.set_seq_state(llama_cpp, stock._ctx.ctx, blob)


def _stock_state(stock, tokens):
    stock.eval(tokens[:50])
    state = stock.save_state()
    del state.kv_merge
    return state


def test_threshold_retention_in_the_engine(model_path, tokens):
    """retention="threshold": the retained pairs are those with d > d_min + (d_max - d_min)(1 - gamma)
    over the merged tokens (one merge step, so the engine and the formula see the same set)."""
    cfg = MergeConfig(calibration="paper", window=32, gamma=0.2, retention="threshold")
    llm = Llama(model_path, n_ctx=512, verbose=False, kv_merge=cfg)
    llm.eval(tokens[:200])
    llm.eval(tokens[200:201])
    n_m = 200 - 32
    for a, _ in merged_pairs():
        for kind in "kv":
            state, dist = _internals.get_cells(llm._ctx.ctx, a, kind, 0, n_m)
            want = reference.retain_select(dist, cfg.gamma, "threshold")
            if want.sum() <= llm.kv_stats().retention_capacity:
                assert np.array_equal(state == 3, want)
            else:  # bounded: the most distinct of them
                assert (state == 3).sum() == llm.kv_stats().retention_capacity
                assert dist[state == 3].min() >= dist[(state == 2) & want].max()


@pytest.mark.parametrize("retention", ["topk", "threshold"])
def test_retention_over_many_steps_and_a_seq_rm_follows_the_streaming_rule(model_path, tokens, retention):
    """Many merge steps (ubatches of 32 tokens, window 32), a seq_rm of merged and staged cells in
    the middle, then more steps: after every ubatch each merged pool's retained set is the one the
    reference's streaming rule (reference.StreamingRetention) gives for the same merge steps and
    the engine's distances (the single-step oracle above ties those to the reference merge)."""
    w, u, gamma = 32, 48, 0.1  # a ubatch larger than the window: the staging pool holds u
    cfg = MergeConfig(calibration="paper", window=w, gamma=gamma, retention=retention)
    llm = Llama(model_path, n_ctx=1024, n_batch=u, n_ubatch=u, verbose=False, kv_merge=cfg)
    cap = llm.kv_stats().retention_capacity
    pools = [(a, kind) for a, _ in merged_pairs(cfg) for kind in ("k", "v")]
    refs = {p: reference.StreamingRetention(gamma, cap, retention) for p in pools}
    order = {}        # cell -> stage order, as the test staged them
    counter = iter(range(10**9))
    staged = set()
    n_steps = 0
    sizes = []        # tokens merged by each merge step

    def step(toks):
        nonlocal n_steps
        before = set(staged)
        c0 = llm.n_tokens
        llm.eval(toks)
        new = set(range(c0, c0 + len(toks)))
        for c in sorted(new):
            order[c] = next(counter)
        for p in pools:
            state, dist = _internals.get_cells(llm._ctx.ctx, p[0], p[1], 0, llm.n_tokens)
            merged_now = sorted((c for c in before if state[c] in (2, 3)), key=lambda c: order[c])
            if p == pools[0] and merged_now:
                sizes.append(len(merged_now))
            want = refs[p].merge(merged_now, dist[merged_now], [order[c] for c in merged_now]) if merged_now \
                else refs[p].retained
            got = set(np.flatnonzero(state == 3).tolist())
            assert got == want, (p, n_steps, sorted(got ^ want))
            assert set(np.flatnonzero(state == 1).tolist()) == (before - set(merged_now)) | new
        staged.clear()
        staged.update(np.flatnonzero(_internals.get_cells(llm._ctx.ctx, pools[0][0], "k", 0, llm.n_tokens)[0] == 1).tolist())
        n_steps += 1

    n_stage = max(w + MERGE_BLOCK, u)  # the staging pool: what a ubatch finds staged once it is full
    for i in range(0, 384, u):
        step(tokens[i:i + u])
    stats = llm.kv_stats()
    assert stats.staging_capacity == n_stage and stats.tokens_merged == 384 - n_stage
    # the merge steps the calibration's simulation assumes for a prompt in ubatches of u (its last
    # one is what the next token merges: the staged tokens beyond the window)
    assert sizes + [n_stage - w] == reference.merge_steps(384, w, u, MERGE_BLOCK)
    # seq_rm of the last 80 cells (64 staged + 16 merged), as llama-cpp-python does for a new suffix
    cut = 384 - 80
    llm.n_tokens = cut
    for p in pools:
        refs[p].remove(range(cut, 384))
    staged.difference_update(range(cut, 384))
    for c in range(cut, 384):
        order.pop(c)
    for i in range(0, 240, u):
        step(tokens[1000 + i:1000 + i + u])
    assert n_steps == 13
    assert llm.kv_stats().tokens_merged == cut + 240 - n_stage
    # the streaming rule is not a top-k over all merged cells: this run shows the difference
    p = pools[0]
    state, dist = _internals.get_cells(llm._ctx.ctx, p[0], p[1], 0, llm.n_tokens)
    merged = np.flatnonzero(np.isin(state, (2, 3)))
    if retention == "topk":
        top = set(merged[reference.retain_select(dist[merged], gamma)].tolist())
        assert top != set(np.flatnonzero(state == 3).tolist())


@pytest.mark.parametrize("failing", ["stats", "round0", "round1"])
def test_a_failed_merge_step_is_completed_by_the_retry(model_path, tokens, monkeypatch, failing):
    """A merge step whose graph fails (injected with LLAMA_MINICACHE_FAIL_GRAPH: the distances
    graph, the graph writing the demoted cells' directions, or the one that then frees, zeroes and
    writes norms) fails that decode with the engine's reason; decoding the same token again gives
    the same cache and logits as a run where nothing failed. A decoding step that merges runs three
    graphs on one backend: distances, round 0, round 1."""
    cfg = MergeConfig(calibration="paper", window=32)
    pools = [(a, kind) for a, _ in merged_pairs(cfg) for kind in ("k", "v")]

    def run(fail_at=None):
        if fail_at is not None:
            monkeypatch.setenv("LLAMA_MINICACHE_FAIL_GRAPH", str(fail_at))
        llm = Llama(model_path, n_ctx=512, flash_attn=True, verbose=False, kv_merge=cfg)
        monkeypatch.delenv("LLAMA_MINICACHE_FAIL_GRAPH", raising=False)
        llm.eval(tokens[:100])  # staged: the first decoding step merges the 68 beyond the window
        graphs, failed = [llm.kv_stats().merge_graphs], 0
        for t in tokens[100:120]:
            try:
                llm.eval([t])
            except RuntimeError as e:
                assert "LLAMA_MINICACHE_FAIL_GRAPH" in str(e), e
                failed += 1
                llm.eval([t])
            graphs.append(llm.kv_stats().merge_graphs)
        logits = _internals.eval_logits(llm, tokens[120:121])
        rows = [_internals.get_rows(llm._ctx.ctx, il, kind, 0, llm.n_tokens, N_EMBD) for a, kind in pools for il in (a, a + 1)]
        cells = [_internals.get_cells(llm._ctx.ctx, a, kind, 0, llm.n_tokens) for a, kind in pools]
        return graphs, failed, logits, rows, cells, llm.kv_stats()

    graphs, _, logits, rows, cells, stats = run()
    assert graphs[1] - graphs[0] == 3  # one decoding step that merges: three graphs
    assert graphs[-1] == graphs[1]  # the next 19 merge nothing (a block is 32)
    fail_at = graphs[0] + ("stats", "round0", "round1").index(failing)
    _, failed, logits2, rows2, cells2, stats2 = run(fail_at)
    assert failed == 1
    assert stats2.tokens_merged == stats.tokens_merged and stats2.tokens_retained == stats.tokens_retained
    for (s, d), (s2, d2) in zip(cells, cells2):
        np.testing.assert_array_equal(s2, s)
        np.testing.assert_array_equal(d2, d)
    for r, r2 in zip(rows, rows2):
        np.testing.assert_array_equal(r2, r)
    np.testing.assert_array_equal(logits2, logits)


def test_an_op_the_backend_lacks_is_refused_at_context_creation(model_path, monkeypatch, on_gpu):
    """The merge step's graphs are built and checked with ggml_backend_supports_op when the context
    is created: an op the pools' backend lacks (LLAMA_MINICACHE_REFUSE_OPS makes the engine treat
    one as missing, as a backend without it would) is a ConfigError naming op, type and backend,
    before any token is decoded."""
    cfg = MergeConfig(calibration="paper", window=32)
    for op, typ in (("SET_ROWS", "f32"), ("GET_ROWS", "f16"), ("SQRT", "f32")):
        monkeypatch.setenv("LLAMA_MINICACHE_REFUSE_OPS", op)
        with pytest.raises(ConfigError, match=rf"the {'CUDA0' if on_gpu else 'CPU'} backend cannot run {op} of {typ} rows"):
            Llama(model_path, n_ctx=256, verbose=False, kv_merge=cfg)
    monkeypatch.delenv("LLAMA_MINICACHE_REFUSE_OPS")
    llm = Llama(model_path, n_ctx=256, verbose=False, kv_merge=cfg)
    assert llm.kv_stats().merge_graphs == 0  # the check computes nothing


@pytest.mark.parametrize("flash_attn", [False, True], ids=["flash_off", "flash_on"])
def test_degenerate_rows_follow_the_reference_contract(model_path, tokens, flash_attn):
    """Rows written into the window through a state, then merged by the engine: a row holding NaN, a
    row holding Inf, opposite rows, one direction at two lengths, a zero row. Distances, norms,
    retained set and restored rows are the NumPy reference's (the contract in the docstring of
    minicache_gguf/reference.py: NaN/Inf -> direction 0, distance 1, the row restores as NaN;
    opposite -> direction 0, distance 1; a zero row -> the other row's direction, distance 0); with
    room for three retained tokens, retention keeps exactly the three at distance 1; the cells
    without degenerate rows are unaffected."""
    import mcstate

    n, w, row = 48, 32, N_EMBD * 2
    n_m = n - w
    for gamma in (0.0, 3 / n_m):
        cfg = MergeConfig(calibration="paper", window=w, gamma=gamma)
        llm = Llama(model_path, n_ctx=256, flash_attn=flash_attn, verbose=False, kv_merge=cfg)
        llm.eval(tokens[:n])
        st = mcstate.parse(kvstate.get_seq_state(llama_cpp, llm._ctx.ctx), row)
        pairs = dict(merged_pairs(cfg))
        rows = {}  # (layer a, kind) -> (x0, x1) as the state now holds them
        for i in range(st.n_pools):
            kind, a = ("k", "v")[st.layout[10 + 5 * i]], st.layout[11 + 5 * i]
            x0 = np.stack([np.frombuffer(c.pools[i].rows[0], np.float16) for c in st.cells]).copy()
            x1 = np.stack([np.frombuffer(c.pools[i].rows[1], np.float16) for c in st.cells]).copy()
            x0[0, 5] = np.nan
            x1[1, 7] = np.inf
            x1[2] = -x0[2]
            x1[3] = x0[3] * np.float16(2)
            x0[4] = 0
            for k, c in enumerate(st.cells):
                c.pools[i].rows = (x0[k].tobytes(), x1[k].tobytes())
            rows[(a, kind)] = (x0, x1)
        kvstate.set_seq_state(llama_cpp, llm._ctx.ctx, mcstate.serialize(st, row))
        # enough new tokens to stage more than window + block: the oldest n - w cells are merged
        n1 = w + MERGE_BLOCK + 1
        llm.eval(tokens[n:n1])
        assert llm.kv_stats().tokens_merged == n_m

        for (a, kind), (x0, x1) in rows.items():
            ref = reference.merge(x0[:n_m], x1[:n_m], cfg.t, out_dtype=np.float16)
            np.testing.assert_array_equal(ref.dist[:3], 1.0)
            assert ref.dist[3] == 0.0 and ref.dist[4] == 0.0
            keep = reference.retain_select(ref.dist, gamma)
            assert keep.sum() == (3 if gamma else 0) and (not gamma or keep[:3].all())
            state, dist = _internals.get_cells(llm._ctx.ctx, a, kind, 0, n1)
            assert np.array_equal(state[:n_m] == 3, keep), (a, kind, gamma)
            np.testing.assert_allclose(dist[:n_m], ref.dist, atol=2e-6)
            for layer, x, norm in ((a, x0, ref.norm0), (pairs[a], x1, ref.norm1)):
                want = reference.restore(ref.dir, norm, out_dtype=np.float16).astype(np.float32)
                want[keep] = x[:n_m][keep]
                got = _internals.get_rows(llm._ctx.ctx, layer, kind, 0, n1, N_EMBD)
                np.testing.assert_allclose(got[:n_m], want, rtol=1e-3, atol=1e-3 * np.nanmax(np.abs(want[5:])),
                                           equal_nan=True, err_msg=f"layer {layer} {kind} gamma {gamma}")
                assert np.array_equal(np.isnan(got[:n_m]), np.isnan(want))


@pytest.mark.parametrize("case", ["q8_0", "f16_k_only"])
def test_a_backend_without_out_prod_restores_instead_of_folding(model_path, tokens, monkeypatch, case, on_gpu):
    """The decoding fold sums rows stored by rows (quantized V; a K-only pair's dense V with flash
    attention on) with OUT_PROD, which ggml-cuda has for F32 only and ggml-metal not at all. Where the
    cache's backend lacks it (LLAMA_MINICACHE_REFUSE_OPS=OUT_PROD: the CPU backend standing in for such
    a backend), those layers restore their merged K/V for decoding as for prompt ubatches: decoding
    gives the logits of LLAMA_MINICACHE_RESTORE=1 bit for bit, not the fold's (which round otherwise).
    On a GPU (CUDA lacks OUT_PROD of these types) the default is that restore."""
    qtype = 8 if case == "q8_0" else 1
    cfg = MergeConfig(calibration="paper", window=32, merge_v=case == "q8_0")

    def run(env):
        for k in ("LLAMA_MINICACHE_REFUSE_OPS", "LLAMA_MINICACHE_RESTORE"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        llm = Llama(model_path, n_ctx=512, n_ubatch=256, type_k=qtype, type_v=qtype, flash_attn=True,
                    logits_all=True, verbose=False, kv_merge=cfg)
        llm.eval(tokens[:100])
        for t in tokens[100:106]:
            llm.eval([t])
        assert llm.kv_stats().tokens_merged > 0
        return llm.scores[100:106].copy()

    fold = run({})
    restore = run({"LLAMA_MINICACHE_RESTORE": "1"})
    lacking = run({"LLAMA_MINICACHE_REFUSE_OPS": "OUT_PROD"})
    assert np.array_equal(lacking, restore)
    if on_gpu:
        assert np.array_equal(fold, restore)
        return
    assert not np.array_equal(fold, restore)
    # the same attention, rounded otherwise (measured: KLD at most 0.007 per token here)
    assert max(kl(r, f) for r, f in zip(restore, fold)) < 0.05
