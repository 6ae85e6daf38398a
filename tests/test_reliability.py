"""No input can kill the process: forged states, wrong arguments, full contexts; and the cache
reuse contract (the same prompt gives the same output however the cache was reached)."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydoc_data.topics
import pytest

import mcstate
from minicache_gguf import Llama, MergeConfig, _internals, engine, kvstate
from minicache_gguf.llama import llama_cpp

HERE = Path(__file__).resolve().parent
ROW = 192 * 2
N_FUZZ = 520


@pytest.fixture(scope="module")
def toks(model_path):
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    llm = Llama(model_path, n_ctx=64, vocab_only=True, verbose=False)
    return llm.tokenize(text[:20000].encode())


def small(model_path, **kw):
    args = dict(n_ctx=1024, n_batch=64, n_ubatch=64, verbose=False, kv_merge=MergeConfig(calibration="paper", window=32))
    args.update(kw)
    return Llama(model_path, **args)


def merged_blob(llm, toks, n=200):
    llm.eval(toks[:n])
    llm.eval(toks[n:n + 1])  # the tokens past the window are merged, but for up to a block (32) of them
    return kvstate.get_seq_state(llama_cpp, llm._ctx.ctx)


def test_get_rows_with_a_wrong_width_is_an_error(model_path, toks):
    """A row width other than the layer's is refused before anything is copied (the caller's buffer
    is sized from the width it passes)."""
    llm = small(model_path)
    llm.eval(toks[:100])
    with pytest.raises(ValueError, match="rows are 192 wide, not 64"):
        _internals.get_rows(llm._ctx.ctx, 20, "k", 0, 100, 64)
    with pytest.raises(ValueError, match="kind='x' is not valid"):
        _internals.get_rows(llm._ctx.ctx, 20, "x", 0, 1, 192)
    assert _internals.get_rows(llm._ctx.ctx, 20, "k", 0, 100, 192).shape == (100, 192)


def test_c_api_ranges(model_path, toks):
    llm = small(model_path)
    llm.eval(toks[:40])
    lib, ffi = engine.load(), engine.ffi
    ctx = ffi.cast("struct llama_context *", llm._ctx.ctx)
    buf = ffi.new("float[192]")
    assert lib.llama_minicache_get_rows(ctx, 2**31 - 1, 0, 0, 1, buf) == -1
    assert lib.llama_minicache_get_rows(ctx, 20, 0, 2**31 - 10, 100, buf) == -1   # c0 + n overflows int32
    assert lib.llama_minicache_get_rows(ctx, 20, 2, 0, 1, buf) == -1
    st = ffi.new("uint8_t[8]")
    assert lib.llama_minicache_get_cells(ctx, 16, -1, 0, 4, st, ffi.NULL) == -1   # kind -1 is no kind
    assert lib.llama_minicache_get_cells(ctx, 2**31 - 1, 1, 0, 4, st, ffi.NULL) == -1
    assert lib.llama_minicache_get_cells(ctx, 16, 0, 2**31 - 2, 8, st, ffi.NULL) == -1
    assert lib.llama_minicache_get_cells(ctx, 16, 0, 0, 4, st, ffi.NULL) == 0
    with pytest.raises(ValueError, match="out of range"):
        _internals.get_cells(llm._ctx.ctx, 16, "k", 1000, 100)


def test_forged_state_all_merged_with_slots_is_refused(model_path, toks):
    """A forged state in which every cell is MERGED and holds a slot (more retained cells than the
    retention pool holds: the next ubatch would find no free slot) is refused at load."""
    llm = small(model_path)
    blob = merged_blob(llm, toks)
    st = mcstate.parse(blob, ROW)
    for c in st.cells:
        if c.state == mcstate.STAGED:
            c.state = mcstate.MERGED
            for pc in c.pools:
                pc.dist, pc.norms, pc.dir = 0.5, (1.0, 1.0), bytes(ROW)
        for pc in c.pools:
            pc.rows = pc.rows or (bytes(ROW), bytes(ROW))
    fresh = small(model_path)
    with pytest.raises(kvstate.KvStateError):
        kvstate.set_seq_state(llama_cpp, fresh._ctx.ctx, mcstate.serialize(st, ROW))
    assert "more retained tokens than the retention pool holds" in _internals.last_error()
    # the context still decodes (its logits read from llama.cpp: Llama.scores holds none without logits_all)
    assert np.isfinite(_internals.eval_logits(fresh, toks[:3])).all()


def test_state_into_another_n_ctx_or_n_ubatch_is_refused(model_path, toks):
    b = dict(n_batch=128)  # llama-cpp-python's own state holds n_batch rows of logits
    llm = small(model_path, **b)
    llm.create_completion(llm.detokenize(toks[:300]).decode(errors="ignore"), max_tokens=4, temperature=0)
    state = llm.save_state()
    # an n_ubatch within window + block (64) leaves the layout as it is: the state loads
    same = small(model_path, n_ubatch=32, **b)
    same.load_state(state)
    assert same.n_tokens == llm.n_tokens
    # one beyond it grows the staging pool: another layout
    for kw in (dict(n_ctx=2048, **b), dict(n_ubatch=96, **b)):
        other = small(model_path, **kw)
        with pytest.raises(RuntimeError, match=r"refused the state: .*another MiniCache layout.*same n_ctx, n_ubatch"):
            other.load_state(state)
        assert other.n_tokens == 0
        # still works: what a context that never saw the refused state says
        assert _complete(other, "Hello", 8) == _complete(small(model_path, **kw), "Hello", 8)


def _inf_norm_blob(blob, cell):
    st = mcstate.parse(blob, ROW)
    assert st.cells[cell].state == mcstate.MERGED and not st.cells[cell].pools[0].rows
    st.cells[cell].pools[0].norms = (math.inf, math.inf)
    return mcstate.serialize(st, ROW)


def test_released_cells_leave_no_nonfinite_values(model_path, toks):
    """A merged cell with an Inf norm (a forged state, or a model that produced Inf) is released
    and its cell reused: the new token must not read 0 * Inf = NaN."""
    llm = small(model_path, logits_all=True)
    blob = _inf_norm_blob(merged_blob(llm, toks), 150)
    kvstate.set_seq_state(llama_cpp, llm._ctx.ctx, blob)
    llm.n_tokens = 100                  # drop cells 100.. (cell 150 included) and refill them
    llm.eval(toks[100:180])
    assert np.isfinite(llm.scores[100:180]).all()


def test_refused_state_leaves_no_nonfinite_values(model_path, toks):
    llm = small(model_path, logits_all=True)
    blob = _inf_norm_blob(merged_blob(llm, toks), 150)
    with pytest.raises(kvstate.KvStateError):
        kvstate.set_seq_state(llama_cpp, llm._ctx.ctx, blob[:-100])  # truncated after cell 150
    llm.n_tokens = 0
    llm.eval(toks[:180])
    assert np.isfinite(llm.scores[:180]).all()


def test_state_fuzz_never_kills_the_process(model_path):
    r = subprocess.run([sys.executable, str(HERE / "fuzz_state.py"), str(model_path), "1234", str(N_FUZZ)],
                       capture_output=True, text=True, timeout=1200)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0, f"fuzzing died (rc {r.returncode}) after: {lines[-3:]}\n{r.stderr[-2000:]}"
    assert lines[-1].startswith(f"done {N_FUZZ} ")
    refused = sum(" refused" in x for x in lines)
    assert refused > N_FUZZ // 4  # the mutations do reach the checks


def test_failed_context_creation_leaves_nothing_armed(model_path):
    """Params armed for a context that was refused never reach the next context on the thread."""
    with pytest.raises(ValueError):
        Llama(model_path, n_ctx=256, verbose=False, kv_merge=MergeConfig(calibration="paper", start_layer=29))
    plain = Llama(model_path, n_ctx=256, verbose=False)
    assert plain.kv_stats().start_layer == -1


# ---------------------------------------------------------------------------------------------
# the cache reuse contract
# ---------------------------------------------------------------------------------------------

def _complete(llm, prompt, n=24):
    return llm.create_completion(prompt, max_tokens=n, temperature=0)["choices"][0]["text"]


@pytest.mark.parametrize("merge", [False, True], ids=["stock", "merged"])
def test_same_prompt_same_output_however_the_cache_was_reached(model_path, toks, merge):
    kw = dict(n_ctx=1024, verbose=False)
    if merge:
        kw["kv_merge"] = MergeConfig(calibration="paper", window=32)
    prompt = Llama(model_path, n_ctx=64, vocab_only=True, verbose=False).detokenize(toks[:150]).decode(errors="ignore")
    fresh = _complete(Llama(model_path, **kw), prompt)
    assert fresh.strip()
    llm = Llama(model_path, **kw)
    first = _complete(llm, prompt)
    repeat = _complete(llm, prompt)            # the cache holds prompt + completion
    state = llm.save_state()
    _complete(llm, "Something else entirely.")
    llm.load_state(state)
    loaded = _complete(llm, prompt)            # a state holding more than the prompt
    llm.reset()
    after_reset = _complete(llm, prompt)
    cached = Llama(model_path, **kw)
    cached.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=1 << 30))
    _complete(cached, prompt)
    from_ram_cache = _complete(cached, prompt)
    assert [first, repeat, loaded, after_reset, from_ram_cache] == [fresh] * 5


def test_a_continuation_reuses_the_merged_cache(model_path, toks):
    llm = Llama(model_path, n_ctx=1024, verbose=False, kv_merge=MergeConfig(calibration="paper", window=32))
    prompt = llm.detokenize(toks[:150]).decode(errors="ignore")
    first = llm.create_completion(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
    before = llm.kv_stats().tokens_merged
    assert before > 0
    follow = llm.tokenize((prompt + first + " And").encode())
    kept = Llama.longest_token_prefix(llm._input_ids.tolist(), follow)
    assert kept > 140
    ctx = llm._ctx.ctx
    llama_cpp.llama_perf_context_reset(ctx)
    llm.create_completion(prompt + first + " And", max_tokens=4, temperature=0)
    # llama.cpp evaluated the new prompt tokens only (not the shared prefix) and the merged cells stayed
    assert llama_cpp.llama_perf_context(ctx).n_p_eval == len(follow) - kept
    assert llm.kv_stats().tokens_merged >= before


def test_full_context_with_merging_is_an_error_not_a_crash(model_path, toks):
    llm = Llama(model_path, n_ctx=256, verbose=False, kv_merge=MergeConfig(calibration="paper", window=32))
    with pytest.raises(ValueError, match="exceed context window"):
        llm.create_completion(llm.detokenize(toks[:400]).decode(errors="ignore"), max_tokens=4)
    # generating past the end stops at the context length
    out = llm.create_completion(llm.detokenize(toks[:200]).decode(errors="ignore"), max_tokens=200, temperature=0)
    assert out["usage"]["total_tokens"] <= 256
    assert llm.kv_stats().tokens_merged > 0
    # and the context keeps working: what a fresh context says
    assert _complete(llm, "Hello") == _complete(Llama(model_path, n_ctx=256, verbose=False,
                                                      kv_merge=MergeConfig(calibration="paper", window=32)), "Hello")


def test_soak_mixed_operations_replay_identically(model_path, tmp_path):
    """1000 mixed generate / reset / save / load / continuation steps: with merging on, a replay of
    the same sequence in another instance gives the same tokens; with merging off, the patched
    engine gives the tokens of the unpatched reference engine (in its own process)."""
    import json

    import soak
    from minicache_gguf import _engine

    n = 1000
    merged = soak.run(Llama(model_path, **soak.OPTIONS, kv_merge=MergeConfig(calibration="paper", window=16, gamma=0.1)), n)
    assert len(merged) > 500
    assert soak.run(Llama(model_path, **soak.OPTIONS, kv_merge=MergeConfig(calibration="paper", window=16, gamma=0.1)), n) == merged
    off = soak.run(Llama(model_path, **soak.OPTIONS), n)
    out = tmp_path / "stock.json"
    subprocess.run([sys.executable, str(HERE / "soak.py"), str(_engine.lib_dir("stock")), str(model_path), str(n),
                    str(out)], check=True, timeout=1200)
    assert json.loads(out.read_text()) == off
