#!/usr/bin/env python3
"""Throughput at a fixed KV budget: how many sequences of a given context fit in M MiB of KV cache,
and the aggregate decode speed with that many in flight (the default model, llama.cpp's C API, one
unified KV cache, CPU).

    .venv/bin/python scripts/bench_parallel.py [--budget-mib 96] [--ctx 1024] [--decode 32] [--reps 3]

Rows: f16, q8_0, q4_0 (flash attention on), each stock and merged (`kv_merge=True`'s selection for
that cache type: the shipped one; q8_0 has none shipped and uses the f16 selection, marked). For each
row: the largest N whose context (n_seq_max = N, n_ctx = N x ctx) allocates at most M MiB of KV
(llama_minicache_get_stats' kv_bytes, the cache's own buffers); then N sequences, each prefilled with
ctx - decode tokens of the built-in eval text (one sequence at a time, ubatches of 256), decode
`decode` more tokens together (one batch of N tokens per step); aggregate tok/s = N x decode / time,
the median of `reps` repetitions (each removes the decoded tokens and decodes them again). Stock and
merged contexts of one cache type are held together and their repetitions alternate (order swapped
each time); the last column is the median of the paired merged / stock ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MINICACHE_GGUF_NO_CALIBRATION", "1")  # never start a calibration from here

from minicache_gguf import MergeConfig, _internals, corpus, default_model_path  # noqa: E402
from minicache_gguf.calibrate import CalibrationMissing, pairs_for  # noqa: E402
from minicache_gguf.config import GGML_TYPES, merged_n_ubatch  # noqa: E402

llama_cpp = _internals.llama_cpp
N_UBATCH = merged_n_ubatch(MergeConfig.window)


def _context(model, n_seq, n_ctx, type_name, params):
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = n_ctx, N_UBATCH, N_UBATCH, n_seq, True
    cp.type_k = cp.type_v = GGML_TYPES[type_name]
    cp.flash_attn_type = 1
    cp.n_threads = cp.n_threads_batch = os.cpu_count() or 2
    if params is not None:
        _internals.set_pending(params)
    try:
        ctx = llama_cpp.llama_init_from_model(model, cp)
        why = _internals.last_error()
    finally:
        _internals.set_pending(None)
    if not ctx:
        raise RuntimeError(f"context refused: {why}")
    return ctx


def _kv_mib(ctx) -> float:
    return _internals.get_stats(ctypes.cast(ctx, ctypes.c_void_p).value).kv_bytes / 2**20


def _decode(ctx, batch, items):
    batch.n_tokens = len(items)
    for i, (t, p, s) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, 0
        batch.seq_id[i][0] = s
    batch.logits[len(items) - 1] = 1
    rc = llama_cpp.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}: {_internals.last_error()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mib", type=float, default=96.0)
    ap.add_argument("--ctx", type=int, default=1024, help="tokens per sequence (prompt + decoded)")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-seq", type=int, default=64)
    a = ap.parse_args()

    path = default_model_path()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(model)
    text = corpus.builtin_text("eval").encode()
    buf = (llama_cpp.llama_token * 200000)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, len(buf), False, False)
    toks = list(buf[:n])
    prompt = a.ctx - a.decode

    print(f"default model, {a.ctx} tokens per sequence ({prompt} prompt + {a.decode} decoded), KV budget "
          f"{a.budget_mib:g} MiB, {os.cpu_count()} threads, flash attention on\n")
    print("| KV cache | merge | KV MiB per sequence | sequences in budget | KV MiB allocated | aggregate decode tok/s "
          "| merged / stock tok/s |")
    print("|---|---|---|---|---|---|---|")
    for type_name in ("f16", "q8_0", "q4_0"):
        rows = []  # stock, merged
        for merged in (False, True):
            params, note = None, ""
            if merged:
                try:
                    pairs, _ = pairs_for(MergeConfig(), path, type_name, type_name, progress=False)
                except (CalibrationMissing, RuntimeError):
                    pairs, _ = pairs_for(MergeConfig(), path, "f16", "f16", progress=False)
                    note = " (f16 selection)"
                params = _internals.params_from_config(MergeConfig(), N_UBATCH, pairs)
            # the largest N within the budget (allocation grows with N)
            best, mib_best = 0, 0.0
            for n_seq in range(1, a.max_seq + 1):
                ctx = _context(model, n_seq, n_seq * a.ctx, type_name, params)
                mib = _kv_mib(ctx)
                llama_cpp.llama_free(ctx)
                if mib > a.budget_mib:
                    break
                best, mib_best = n_seq, mib
            rows.append({"label": "on" + note if merged else "off", "n": best, "mib": mib_best, "params": params,
                         "times": []})
        live = [r for r in rows if r["n"] > 0]
        try:
            for r in live:
                r["ctx"] = _context(model, r["n"], r["n"] * a.ctx, type_name, r["params"])
                r["batch"] = batch = llama_cpp.llama_batch_init(N_UBATCH, 0, r["n"])
                for s in range(r["n"]):
                    seq = toks[s * 997 % (len(toks) - a.ctx):][:a.ctx]
                    for i in range(0, prompt, N_UBATCH):
                        _decode(r["ctx"], batch, [(seq[p], p, s) for p in range(i, min(prompt, i + N_UBATCH))])
            # paired repetitions: stock and merged alternate, the order swapped every repetition
            for rep in range(a.reps):
                for r in (live if rep % 2 == 0 else live[::-1]):
                    t0 = time.perf_counter()
                    for k in range(a.decode):
                        p = prompt + k
                        _decode(r["ctx"], r["batch"], [(toks[(s * 997 + p) % len(toks)], p, s) for s in range(r["n"])])
                    r["times"].append(time.perf_counter() - t0)
                    mem = llama_cpp.llama_get_memory(r["ctx"])
                    for s in range(r["n"]):
                        llama_cpp.llama_memory_seq_rm(mem, s, prompt, -1)
        finally:
            for r in live:
                if r.get("batch"):
                    llama_cpp.llama_batch_free(r["batch"])
                if r.get("ctx"):
                    llama_cpp.llama_free(r["ctx"])
        ratio = "—"
        if len(live) == 2:
            st, mg = live
            ratio = "%.2f" % statistics.median(
                (mg["n"] * a.decode / tm) / (st["n"] * a.decode / ts) for ts, tm in zip(st["times"], mg["times"]))
        for i, r in enumerate(rows):
            if r["n"] == 0:
                print(f"| {type_name} | {r['label']} | — | 0 | — | — | — |", flush=True)
                continue
            tps = r["n"] * a.decode / statistics.median(r["times"])
            print(f"| {type_name} | {r['label']} | {r['mib'] / r['n']:.2f} | {r['n']} | {r['mib']:.1f} | {tps:.1f} | "
                  f"{ratio if i == 1 else ''} |", flush=True)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
