#!/usr/bin/env python3
"""Engine benchmark: prefill and decode speed with kv_merge on vs off, side by side in one run.

    .venv/bin/python scripts/bench_engine.py [--n-ctx 4096] [--prefill 3500] [--decode 64] [--reps 3]

Prefill: `--prefill` tokens of built-in text (Python's pydoc topics) evaluated in ubatches of 512.
Decode: then `--decode` tokens evaluated one at a time (teacher-forced, the same work as greedy
generation without the sampler), i.e. with ~prefill tokens in the cache. The modes alternate
(off, on, off, on, ...); reported: per mode the median and the best of --reps runs, and the median
of the paired on/off ratios (each pair ran back to back, under the same machine load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minicache_gguf import Llama, MergeConfig, default_model_path  # noqa: E402
from minicache_gguf.bench import prefill_decode  # noqa: E402


def corpus_tokens(llm, n: int) -> list[int]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    toks = llm.tokenize(text.encode())
    if len(toks) < n:
        raise SystemExit(f"the built-in text has only {len(toks)} tokens, fewer than {n}")
    return toks[:n]


def run_once(model, kv_merge, n_ctx, toks, n_prefill, n_decode, n_threads, flash_attn):
    llm = Llama(model, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=n_threads, flash_attn=flash_attn,
                verbose=False, kv_merge=kv_merge)
    prefill, decode = prefill_decode(llm, toks, n_prefill, n_decode)
    stats = llm.kv_stats()
    llm.close()
    return prefill, decode, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--prefill", type=int, default=3500)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: llama-cpp-python's)")
    ap.add_argument("--flash-attn", action="store_true", help="flash attention on (merged layers restore K/V then)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--calibration", default=None,
                    help="merge as this calibration file selects (aligned merging) instead of the paper's layout")
    a = ap.parse_args()
    if a.prefill + a.decode > a.n_ctx:
        ap.error(f"--prefill {a.prefill} + --decode {a.decode} does not fit --n-ctx {a.n_ctx}")
    model = a.model or str(default_model_path())
    probe = Llama(model, n_ctx=64, vocab_only=True, verbose=False)
    toks = corpus_tokens(probe, a.prefill + a.decode)

    modes = {"off": False, "on": MergeConfig(calibration=a.calibration) if a.calibration else MergeConfig()}
    res = {m: {"prefill": [], "decode": []} for m in modes}
    stats = {}
    for rep in range(a.reps):
        for name, kv_merge in modes.items():
            p, d, s = run_once(model, kv_merge, a.n_ctx, toks, a.prefill, a.decode, a.threads, a.flash_attn)
            res[name]["prefill"].append(p)
            res[name]["decode"].append(d)
            stats[name] = s
            print(f"rep {rep + 1}/{a.reps} kv_merge {name:3}: prefill {p:7.1f} tok/s, decode {d:6.1f} tok/s", flush=True)

    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in res.items()}
    best = {m: {k: max(v) for k, v in r.items()} for m, r in res.items()}
    # each rep runs off then on back to back: their ratio sees the same machine load
    paired = {k: statistics.median(on / off for on, off in zip(res["on"][k], res["off"][k])) for k in ("prefill", "decode")}
    print()
    print(f"{Path(model).name}, n_ctx {a.n_ctx}, f16 KV, flash attention {'on' if a.flash_attn else 'off'}, "
          f"merge: {f'calibration {a.calibration}' if a.calibration else 'paper layout (S=L/2, K+V)'}, "
          f"{a.prefill} tokens prefilled, {a.decode} decoded; {a.reps} alternating reps")
    print("| kv_merge | KV bytes allocated | prefill tok/s median (best) | decode tok/s median (best) |")
    print("|---|---|---|---|")
    for m in modes:
        print(f"| {m} | {stats[m].kv_bytes:,} | {med[m]['prefill']:.1f} ({best[m]['prefill']:.1f}) "
              f"| {med[m]['decode']:.1f} ({best[m]['decode']:.1f}) |")
    print(f"on/off, median of paired reps: prefill {paired['prefill']:.3f}x, decode {paired['decode']:.3f}x; "
          f"best vs best: prefill {best['on']['prefill'] / best['off']['prefill']:.3f}x, "
          f"decode {best['on']['decode'] / best['off']['decode']:.3f}x; "
          f"KV bytes {stats['off'].kv_bytes / stats['on'].kv_bytes:.3f}x smaller")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "runs": res, "median": med,
                                      "best": best, "paired_ratio": paired,
                                      "kv_bytes": {m: stats[m].kv_bytes for m in modes}}, indent=2))


if __name__ == "__main__":
    main()
