"""Several sequences in one merged cache (n_seq_max > 1, llama.cpp's unified KV cache). Each
sequence keeps its own window and its own retention (the single-sequence rule applied to each
sequence when it receives tokens), so a batched run — prompts chunked and mixed in ubatches as a
server does, then all sequences decoding together — gives each sequence the merged cells, exact
rows and logits a run of that sequence alone gives. The default model with its shipped selection,
through llama.cpp's C API (llama-cpp-python's Llama runs one sequence)."""

import ctypes
import struct

import numpy as np
import pytest

import mcstate
from minicache_gguf import MergeConfig, _internals, corpus
from minicache_gguf.calibrate import pairs_for
from minicache_gguf.config import GGML_TYPES

llama_cpp = _internals.llama_cpp

W, GAMMA, N_UBATCH = 32, 0.1, 32
LENS = (150, 97, 121)
N_DECODE = 24
# the prompt schedule: batches of (sequence, tokens); a batch holds at most N_UBATCH tokens
SCHEDULE = [[(0, 16), (1, 16)], [(2, 32)], [(0, 32)], [(1, 20), (2, 12)], [(0, 30)], [(1, 32)], [(2, 32)],
            [(0, 32)], [(1, 29)], [(2, 32)], [(0, 40 - 32)], [(2, 13)], [(0, 32)]]


def _check_schedule():
    got = [0, 0, 0]
    for b in SCHEDULE:
        assert sum(n for _, n in b) <= N_UBATCH
        for s, n in b:
            got[s] += n
    assert tuple(got) == LENS, got


_check_schedule()


class Ctx:
    """A context on the patched engine made through the C API, merged when params are given."""

    def __init__(self, model, n_ctx, n_seq, type_name, flash, params=None):
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, N_UBATCH, N_UBATCH, n_seq
        cp.kv_unified = True
        cp.type_k = cp.type_v = GGML_TYPES[type_name]
        cp.flash_attn_type = 1 if flash else 0
        cp.n_threads = cp.n_threads_batch = 2
        if params is not None:
            _internals.set_pending(params)
        try:
            self.ctx = llama_cpp.llama_init_from_model(model, cp)
        finally:
            _internals.set_pending(None)
        assert self.ctx, _internals.last_error()
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.batch = llama_cpp.llama_batch_init(N_UBATCH, 0, n_seq)

    def decode(self, items):
        """items: (token, pos, seq); returns each item's logits."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (t, p, s) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, 1
            b.seq_id[i][0] = s
        rc = llama_cpp.llama_decode(self.ctx, b)
        assert rc == 0, (rc, _internals.last_error())
        return [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
                for i in range(len(items))]

    def state(self, seq):
        n = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        assert llama_cpp.llama_state_seq_get_data(self.ctx, buf, n, seq) == n
        return bytes(buf)

    def close(self):
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def _positions(blob):
    """The cells' positions of a per-sequence state blob (its stock header)."""
    magic, _seq, n_stream, n = struct.unpack_from("<IiII", blob, 0)
    assert n_stream == 1
    off, pos = 16, []
    for _ in range(n):
        p, k = struct.unpack_from("<iI", blob, off)
        pos.append(p)
        off += 8 + 4 * k
    return pos


def _cells_by_pos(blob, row):
    st = mcstate.parse(blob, row)
    return dict(zip(_positions(blob), st.cells))


@pytest.fixture(scope="module")
def model(model_path):
    mp = llama_cpp.llama_model_default_params()
    m = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mp)
    assert m
    yield m
    llama_cpp.llama_model_free(m)


@pytest.fixture(scope="module")
def texts(model):
    vocab = llama_cpp.llama_model_get_vocab(model)
    text = corpus.builtin_text("eval").encode()[:20000]
    buf = (llama_cpp.llama_token * 8192)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, 8192, False, False)
    toks = list(buf[:n])
    need = max(LENS) + N_DECODE
    return [toks[i * 400:i * 400 + need] for i in range(len(LENS))]


def _params(model_path, type_name):
    pairs, _ = pairs_for(MergeConfig(), model_path, type_name, type_name, progress=False)
    return _internals.params_from_config(MergeConfig(window=W, gamma=GAMMA), N_UBATCH, pairs)


def _run(model, texts, n_ctx, seqs, type_name, flash, params):
    """The schedule restricted to `seqs` (each as sequence id seqs.index(s) when alone), then the
    decoding steps of all of them together: {seq: [logits of each decoded token]}, and the context."""
    ctx = Ctx(model, n_ctx, len(seqs), type_name, flash, params)
    sid = {s: i for i, s in enumerate(seqs)}
    done = {s: 0 for s in seqs}
    for b in SCHEDULE:
        items = []
        for s, n in b:
            if s in sid:
                items += [(texts[s][p], p, sid[s]) for p in range(done[s], done[s] + n)]
                done[s] += n
        if items:
            ctx.decode(items)
    out = {s: [] for s in seqs}
    for k in range(N_DECODE):
        items = [(texts[s][LENS[s] + k], LENS[s] + k, sid[s]) for s in seqs]
        for s, lg in zip(seqs, ctx.decode(items)):
            out[s].append(lg)
    return out, ctx


CASES = {"f16": "f16", "q4_0": "q4_0"}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_sequences_equal_each_sequence_alone(model, model_path, texts, case, monkeypatch):
    """Decoding restores the merged K/V (LLAMA_MINICACHE_RESTORE=1) and attends with llama.cpp's flash
    attention, which skips other sequences' cells: then every merged cell, exact row and logit of a
    sequence in the batched run is the one of that sequence alone, bit for bit."""
    monkeypatch.setenv("LLAMA_MINICACHE_RESTORE", "1")
    type_name = CASES[case]
    row = 192 * 2 if type_name == "f16" else 192 // 32 * 18
    # 512 cells for the 440 tokens: the retention pool (ceil(0.1 * 512) + 2 slots) is shared, tightly
    batched, ctx = _run(model, texts, 512, [0, 1, 2], type_name, True, _params(model_path, type_name))
    try:
        states = [ctx.state(s) for s in range(3)]
    finally:
        ctx.close()
    for s in range(3):
        alone, actx = _run(model, texts, 512, [s], type_name, True, _params(model_path, type_name))
        try:
            st_alone = actx.state(0)
        finally:
            actx.close()
        # the merge's bookkeeping: every position in the same state (staged, merged, retained), the same
        # distances, norms, exact rows and directions
        got, want = _cells_by_pos(states[s], row), _cells_by_pos(st_alone, row)
        assert sorted(got) == sorted(want) == list(range(LENS[s] + N_DECODE))
        n_merged = n_retained = 0
        for p in want:
            a, b = got[p], want[p]
            assert a.state == b.state, (s, p)
            n_merged += a.state == mcstate.MERGED
            for pa, pb in zip(a.pools, b.pools):
                assert (pa.slot >= 0) == (pb.slot >= 0), (s, p)
                n_retained += a.state == mcstate.MERGED and pa.slot >= 0
                assert (pa.dist, pa.norms, pa.dir, pa.rows) == (pb.dist, pb.norms, pb.dir, pb.rows), (s, p)
        assert n_merged >= LENS[s] + N_DECODE - W - N_UBATCH and n_retained > 0
        for k in range(N_DECODE):
            assert np.array_equal(batched[s][k], alone[s][k]), (s, k)


@pytest.mark.parametrize("flash", [True, False], ids=["flash_on", "flash_off"])
def test_batched_decoding_folds_within_llama_cpps_own_batching_noise(model, model_path, texts, flash):
    """Decoding steps fold the norms into an attention over every cell (other sequences' masked):
    its sums run over another cell layout than a sequence alone, as llama.cpp's own attention does
    with flash attention off. Each sequence's KLD against its run alone stays within twice what the
    stock cache's batched run shows against its single runs (flash attention off), or 1e-3."""
    from minicache_gguf.metrics import kld_per_token

    params = _params(model_path, "f16")
    merged, ctx = _run(model, texts, 1024, [0, 1, 2], "f16", flash, params)
    ctx.close()
    stock, ctx = _run(model, texts, 1024, [0, 1, 2], "f16", False, None)
    ctx.close()
    for s in range(3):
        alone, ctx = _run(model, texts, 512, [s], "f16", flash, params)
        ctx.close()
        stock_alone, ctx = _run(model, texts, 512, [s], "f16", False, None)
        ctx.close()
        kl = kld_per_token(np.array(alone[s]), np.array(merged[s]))
        kl_stock = kld_per_token(np.array(stock_alone[s]), np.array(stock[s]))
        assert kl.mean() <= max(2 * kl_stock.mean(), 1e-3), (s, kl.mean(), kl_stock.mean())
        agree = np.mean([a.argmax() == b.argmax() for a, b in zip(alone[s], merged[s])])
        assert agree >= 0.9, (s, agree)


def _rm_then_decode(model, texts, params):
    """The three sequences' schedule, sequence 1 removed, one more token of 0 and 2 decoded together;
    then sequence 2 copied into 1 and one token decoded in both: (their logits, the copy's)."""
    _, ctx = _run(model, texts, 1024, [0, 1, 2], "f16", True, params)
    try:
        mem = llama_cpp.llama_get_memory(ctx.ctx)
        assert llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)
        assert llama_cpp.llama_memory_seq_pos_max(mem, 1) == -1
        nxt = {s: LENS[s] + N_DECODE for s in (0, 2)}
        after = ctx.decode([(texts[0][nxt[0] - 1], nxt[0], 0), (texts[2][nxt[2] - 1], nxt[2], 2)])
        llama_cpp.llama_memory_seq_cp(mem, 2, 1, -1, -1)
        p = nxt[2] + 1
        return after, ctx.decode([(texts[2][3], p, 2), (texts[2][3], p, 1)])
    finally:
        ctx.close()


def _alone_then_decode(model, texts, s, params):
    _, ctx = _run(model, texts, 512, [s], "f16", True, params)
    try:
        nxt = LENS[s] + N_DECODE
        return ctx.decode([(texts[s][nxt - 1], nxt, 0)])[0]
    finally:
        ctx.close()


def test_removing_and_copying_sequences(model, model_path, texts, monkeypatch):
    """seq_rm of a whole sequence gives its cells and slots back and the others continue as if alone;
    seq_cp shares cells (merged, retained and staged) with another sequence, which decodes from them.
    Merged K/V restored for decoding (as in the first test); the new tokens land in the freed cells, so
    the attention visits cells in another order than alone: the stock cache, run the same way, bounds
    the difference."""
    monkeypatch.setenv("LLAMA_MINICACHE_RESTORE", "1")
    params = _params(model_path, "f16")
    after, two = _rm_then_decode(model, texts, params)
    stock_after, _ = _rm_then_decode(model, texts, None)
    assert np.array_equal(two[0], two[1])
    for i, s in enumerate((0, 2)):
        d = np.abs(after[i] - _alone_then_decode(model, texts, s, params)).max()
        d_stock = np.abs(stock_after[i] - _alone_then_decode(model, texts, s, None)).max()
        assert d <= max(2 * d_stock, 1e-5), (s, d, d_stock)


def test_a_stream_per_sequence_is_refused(model, model_path):
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = 1024, 32, 32, 2, False
    _internals.set_pending(_params(model_path, "f16"))
    try:
        ctx = llama_cpp.llama_init_from_model(model, cp)
        why = _internals.last_error()
    finally:
        _internals.set_pending(None)
    assert not ctx
    assert "kv_unified" in why


def _state_round_trip_then_decode(model, texts, params, reload: bool):
    """The three sequences' schedule; with reload, sequence 1's state saved, the sequence removed and
    its state loaded back while 0 and 2 hold their cells (as llama-server's prompt cache restores a
    slot); then one more token of each decoded together: (logits per sequence, the loaded size)."""
    _, ctx = _run(model, texts, 1024, [0, 1, 2], "f16", True, params)
    try:
        n = None
        if reload:
            blob = ctx.state(1)
            mem = llama_cpp.llama_get_memory(ctx.ctx)
            assert llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)
            buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
            n = llama_cpp.llama_state_seq_set_data(ctx.ctx, buf, len(blob), 1)
            if n == 0:
                return None, _internals.last_error()
            assert ctx.state(1) == blob  # the sequence holds what it held, slot for slot
        nxt = {s: LENS[s] + N_DECODE for s in (0, 1, 2)}
        return ctx.decode([(texts[s][nxt[s] - 1], nxt[s], s) for s in (0, 1, 2)]), n
    finally:
        ctx.close()


def test_one_sequences_state_reloads_among_the_others(model, model_path, texts, monkeypatch):
    """llama_state_seq_get_data / set_data of one sequence while the others keep their cells: the
    reloaded sequence holds the same cells, slots and rows (its state bytes are equal) and every
    sequence decodes as if nothing happened (merged K/V restored for decoding, flash attention)."""
    monkeypatch.setenv("LLAMA_MINICACHE_RESTORE", "1")
    params = _params(model_path, "f16")
    want, _ = _state_round_trip_then_decode(model, texts, params, reload=False)
    got, n = _state_round_trip_then_decode(model, texts, params, reload=True)
    assert got is not None, f"the state of sequence 1 was refused: {n}"
    for s in (0, 1, 2):
        assert np.array_equal(got[s], want[s]), s


def _reload_after_others_moved_on(model, texts, params, reload: bool):
    """Sequence 1's state saved and the sequence removed; 0 and 2 decode 48 more tokens (their merges
    take slots, the freed ones among them); then, with reload, the saved state is loaded back; then
    one more token of 0 and 2: (their logits, set_data's return, the engine's error)."""
    _, ctx = _run(model, texts, 1024, [0, 1, 2], "f16", True, params)
    try:
        blob = ctx.state(1)
        mem = llama_cpp.llama_get_memory(ctx.ctx)
        assert llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)
        pos = {s: LENS[s] + N_DECODE for s in (0, 2)}
        for k in range(48):
            ctx.decode([(texts[s][(pos[s] + k) % len(texts[s])], pos[s] + k, s) for s in (0, 2)])
        n, why = None, ""
        if reload:
            buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
            n = llama_cpp.llama_state_seq_set_data(ctx.ctx, buf, len(blob), 1)
            why = _internals.last_error()
            if n:
                assert ctx.state(1) == blob
            else:
                assert llama_cpp.llama_memory_seq_pos_max(mem, 1) == -1  # refused: nothing of it is left
        return ctx.decode([(texts[s][5], pos[s] + 48, s) for s in (0, 2)]), n, why
    finally:
        ctx.close()


def test_a_reload_that_finds_its_slots_taken_is_refused_and_leaves_the_others(model, model_path, texts, monkeypatch):
    """A sequence's saved state names its exact slots; once other sequences' merges took one, the
    load is refused (llama-server then evaluates the prompt) and the other sequences decode as if no
    load had been tried."""
    monkeypatch.setenv("LLAMA_MINICACHE_RESTORE", "1")
    params = _params(model_path, "f16")
    want, _, _ = _reload_after_others_moved_on(model, texts, params, reload=False)
    got, n, why = _reload_after_others_moved_on(model, texts, params, reload=True)
    # the other sequences' merges took one of its slots: refused, with the reason
    assert n == 0 and "another sequence holds it" in why, (n, why)
    for i in range(2):
        assert np.array_equal(got[i], want[i]), i


def _keep_then_decode(model, texts, params):
    """The three sequences' schedule, then seq_keep(0): the other sequences' cells, slots and merged
    state go; one more token of 0: (its logits, cells used after seq_keep, cells sequence 0 holds)."""
    _, ctx = _run(model, texts, 1024, [0, 1, 2], "f16", True, params)
    try:
        mem = llama_cpp.llama_get_memory(ctx.ctx)
        n0 = len(_positions(ctx.state(0)))
        llama_cpp.llama_memory_seq_keep(mem, 0)
        assert llama_cpp.llama_memory_seq_pos_max(mem, 1) == -1 and llama_cpp.llama_memory_seq_pos_max(mem, 2) == -1
        used = _internals.get_stats(_ptr(ctx)).tokens
        nxt = LENS[0] + N_DECODE
        return ctx.decode([(texts[0][nxt - 1], nxt, 0)])[0], used, n0
    finally:
        ctx.close()


def _ptr(ctx) -> int:
    return ctypes.cast(ctx.ctx, ctypes.c_void_p).value


def test_seq_keep_leaves_one_sequence_as_if_alone(model, model_path, texts, monkeypatch):
    """seq_keep(0) frees every other sequence's cells at once (the cache then holds exactly sequence
    0's cells), and sequence 0 decodes as alone, within the difference the stock cache shows."""
    monkeypatch.setenv("LLAMA_MINICACHE_RESTORE", "1")
    params = _params(model_path, "f16")
    got, used, n0 = _keep_then_decode(model, texts, params)
    stock, _, _ = _keep_then_decode(model, texts, None)
    assert used == n0
    d = np.abs(got - _alone_then_decode(model, texts, 0, params)).max()
    d_stock = np.abs(stock - _alone_then_decode(model, texts, 0, None)).max()
    assert d <= max(2 * d_stock, 1e-5), (d, d_stock)
