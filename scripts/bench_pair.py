#!/usr/bin/env python3
"""Merging on vs off at one context, paired decode rounds (flash attention on or off, paper layout or
the shipped calibration).

    .venv/bin/python scripts/bench_pair.py paper|auto 0|1 N_CTX [--rounds 5] [--per 24] [--type f16|q8_0|q4_0]

Two contexts of the default model (KV of --type on both sides, f16 by default; n_batch = n_ubatch = 512 on both sides, 2 threads): merging
off, and merging on (`paper`: MergeConfig(calibration="paper"); `auto`: MergeConfig(), the calibrated selection), flash
attention off (0) or on (1). Each is prefilled once with N_CTX - rounds*per - 8 tokens of Python's
pydoc topics (prefill on/off = the ratio of the two prefill speeds), then the two decode `per`
tokens one at a time in turn, `rounds` times: each round's on/off ratio saw the same machine load.
Printed: prefill ratio, every round's decode ratio and their median, KV bytes on/off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minicache_gguf import Llama, MergeConfig, default_model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("merge", choices=("paper", "auto"))
    ap.add_argument("flash_attn", choices=("0", "1"))
    ap.add_argument("n_ctx", type=int)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per", type=int, default=24)
    ap.add_argument("--type", choices=("f16", "q8_0", "q4_0"), default="f16", help="K and V cache type of both contexts")
    a = ap.parse_args()
    n0 = a.n_ctx - a.rounds * a.per - 8
    if n0 < 64 or a.rounds < 1 or a.per < 1:
        ap.error(f"n_ctx {a.n_ctx} does not hold {a.rounds} rounds of {a.per} tokens after a prefill of 64")
    warnings.simplefilter("ignore")  # the calibration-context note: this script measures speed only
    import pydoc_data.topics as topics

    model = str(default_model_path())
    kv = MergeConfig(calibration="paper") if a.merge == "paper" else MergeConfig()
    llms = {name: Llama(model, n_ctx=a.n_ctx, n_batch=512, n_ubatch=512, n_threads=2, flash_attn=a.flash_attn == "1",
                        verbose=False, type_k=a.type, type_v=a.type, kv_merge=k) for name, k in (("off", False), ("on", kv))}
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    toks = llms["off"].tokenize(text.encode())
    if len(toks) < a.n_ctx:
        ap.error(f"the built-in text has {len(toks)} tokens, fewer than n_ctx {a.n_ctx}")
    pre = {}
    for name, llm in llms.items():
        t = time.perf_counter()
        llm.eval(toks[:n0])
        pre[name] = n0 / (time.perf_counter() - t)
    ratios, pos = [], n0
    for _ in range(a.rounds):
        speed = {}
        for name, llm in llms.items():
            t = time.perf_counter()
            for i in range(a.per):
                llm.eval([toks[pos + i]])
            speed[name] = a.per / (time.perf_counter() - t)
        pos += a.per
        ratios.append(speed["on"] / speed["off"])
    kv_on, kv_off = llms["on"].kv_stats().kv_bytes, llms["off"].kv_stats().kv_bytes
    print(f"{a.merge} {a.type} flash {a.flash_attn == '1'} {a.n_ctx} prefill on/off {pre['on'] / pre['off']:.3f} decode ratios "
          + " ".join(f"{x:.3f}" for x in ratios) + f" median {statistics.median(ratios):.3f} kv {kv_on / kv_off}")


if __name__ == "__main__":
    main()
