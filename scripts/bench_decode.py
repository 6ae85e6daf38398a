#!/usr/bin/env python3
"""Decode speed of merging stacked on each KV cache type vs that type with merging off.

    .venv/bin/python scripts/bench_decode.py [--n-ctx 8192] [--prefill N] [--types f16,q8_0,q4_0]
        [--flash-attn 0|1] [--rounds 3] [--per 16]

Per cache type T, two contexts: T alone and T + aligned merging (the default calibration, as
calibration="auto"), flash attention on (or off: f16 only, a quantized V needs it). Each context is
prefilled once with --prefill tokens of the built-in eval text (default n_ctx - rounds*per - 8;
prefill tok/s reported), then the contexts decode `per` tokens
one at a time in turn, `rounds` times (teacher-forced: the same work as greedy generation without
the sampler), so every round pairs the two modes under the same machine load. Reported: allocated
KV, prefill tok/s, median decode tok/s, and the median (min-max) of the per-round decode ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minicache_gguf import Llama, MergeConfig, corpus  # noqa: E402
from minicache_gguf.config import cache_type  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--types", default="f16,q8_0,q4_0", help="KV cache types (default f16,q8_0,q4_0)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per", type=int, default=16, help="tokens decoded per round and mode (default 16)")
    ap.add_argument("--calibration", default="auto", help="calibration file or 'auto' (default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=None, help="tokens cached before decoding (default: fill n_ctx)")
    ap.add_argument("--flash-attn", choices=("0", "1"), default="1", help="flash attention off (0, f16 only) or on (1, default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    types = [cache_type(t, "--types") for t in a.types.split(",")]
    n_pre = a.n_ctx - a.rounds * a.per - 8 if a.prefill is None else a.prefill
    if n_pre < 64 or n_pre + a.rounds * a.per + 8 > a.n_ctx:
        raise SystemExit(f"--n-ctx {a.n_ctx} does not hold a prefill of {n_pre} (at least 64) and {a.rounds} rounds "
                         f"of {a.per} tokens")
    flash = a.flash_attn == "1"
    if not flash and types != ["f16"]:
        raise SystemExit(f"--flash-attn 0 needs --types f16 (a quantized V cache needs flash attention), got {a.types}")

    warnings.simplefilter("ignore")  # the calibration-type note: this script measures exactly that
    vocab = Llama(a.model, n_ctx=64, vocab_only=True, verbose=False)
    toks = corpus.tokens_for(vocab, corpus.builtin_text("eval"), a.n_ctx, "benchmark")
    llms, out = {}, {}
    for t in types:
        for merged in (False, True):
            name = f"{t}+aligned" if merged else t
            llm = Llama(a.model, n_ctx=a.n_ctx, flash_attn=flash, type_k=t, type_v=t, n_threads=a.threads,
                        n_threads_batch=a.threads, verbose=False,
                        kv_merge=MergeConfig(calibration=a.calibration) if merged else False)
            t0 = time.perf_counter()
            llm.eval(toks[:n_pre])
            out[name] = {"kv_mib": llm.kv_stats().kv_bytes / 2**20, "prefill_tok_s": n_pre / (time.perf_counter() - t0)}
            llms[name] = llm
            print(f"{name}: prefilled {n_pre} tokens at {out[name]['prefill_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    dec = {n: [] for n in llms}
    for r in range(a.rounds):
        seg = toks[n_pre + r * a.per:n_pre + (r + 1) * a.per]
        for name, llm in llms.items():
            t0 = time.perf_counter()
            for tok in seg:
                llm.eval([tok])
            dec[name].append(a.per / (time.perf_counter() - t0))
    print(f"n_ctx {a.n_ctx}, {n_pre} tokens prefilled, {a.rounds} rounds x {a.per} decoded, "
          f"flash attention {'on' if flash else 'off'}, "
          f"{a.threads} threads\n")
    print("| cache | KV MiB | prefill tok/s | decode tok/s | merged vs type alone: KV | prefill | decode (per-round range) |")
    print("|---|---|---|---|---|---|---|")
    for t in types:
        base, m = out[t], out[f"{t}+aligned"]
        ratios = [x / y for x, y in zip(dec[f"{t}+aligned"], dec[t])]
        base["decode_tok_s"] = statistics.median(dec[t])
        m["decode_tok_s"] = statistics.median(dec[f"{t}+aligned"])
        m["decode_vs_type"] = statistics.median(ratios)
        m["decode_vs_type_range"] = [min(ratios), max(ratios)]
        print(f"| {t} | {base['kv_mib']:.1f} | {base['prefill_tok_s']:.1f} | {base['decode_tok_s']:.1f} | | | |")
        print(f"| {t} + aligned | {m['kv_mib']:.1f} | {m['prefill_tok_s']:.1f} | {m['decode_tok_s']:.1f} | "
              f"{base['kv_mib'] / m['kv_mib']:.2f}× less | {m['prefill_tok_s'] / base['prefill_tok_s']:.2f}× | "
              f"{m['decode_vs_type']:.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |")
    if a.json:
        a.json.write_text(json.dumps({"settings": vars(a) | {"json": str(a.json)}, "modes": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
