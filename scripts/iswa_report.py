#!/usr/bin/env python3
"""An interleaved sliding-window model (default: Gemma 3 270M Q4_K_M): its KV memory with and
without a window-sized sliding-window cache, and what merging each pair of its full-attention
layers would cost in quality.

    .venv/bin/python scripts/iswa_report.py [--model M.gguf] [--ctx 8192,32768] [--n-ctx 4096] [--skip-pairs]

Memory: Llama.kv_stats().kv_bytes (both caches' buffers, allocated at creation, no decoding) for
f16 / q8_0 / q4_0 (flash attention on), swa_full=False (this package's default, llama-server's) and
swa_full=True (llama-cpp-python's default).

Pairs: the only KV that grows with the context is the full-attention layers', so merging pays only
there; consecutive full-attention layers are not adjacent (Gemma 3: 5, 11, 17). Each pair and kind
alone, on the three built-in calibration domains, as `minicache-gguf calibrate` scores a candidate:
an f16 context of n_ctx - 128 tokens, the cells older than the window (256) merged in NumPy as the
engine would (t 0.6, gamma 0.05, streaming retention), loaded into a stock context, and the KLD of
the next 128 tokens (DEFAULT_SCORED) and of a retrieval probe (a span from 25% deep, repeated) against the unmerged
cache. "paper": no rotation; "aligned": the per-head rotation fitted on 2048 tokens (split over the
domains). The budget is MergeConfig().max_kld, the worst over domains and probes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minicache_gguf import Llama, _internals, corpus  # noqa: E402
from minicache_gguf.alignment import fit_rotation, simulate_merge  # noqa: E402
from minicache_gguf.calibrate import PROBE_DEPTH  # noqa: E402
from minicache_gguf.config import DEFAULT_SCORED, MergeConfig, PairSpec, merged_n_ubatch  # noqa: E402
from minicache_gguf.metrics import KldScorer  # noqa: E402
from minicache_gguf.model import ModelInfo, gemma3_model_path  # noqa: E402


def memory(model: str, ctxs: list[int]) -> None:
    print("| n_ctx | KV type | swa_full=False MiB | swa_full=True MiB | ratio |")
    print("|---|---|---|---|---|")
    for n_ctx in ctxs:
        for ty in ("f16", "q8_0", "q4_0"):
            mib = []
            for full in (False, True):
                llm = Llama(model, n_ctx=n_ctx, type_k=ty, type_v=ty, flash_attn=True, swa_full=full, verbose=False)
                try:
                    mib.append(llm.kv_stats().kv_bytes / 2**20)
                finally:
                    llm.close()
            print(f"| {n_ctx} | {ty} | {mib[0]:.1f} | {mib[1]:.1f} | {mib[1] / mib[0]:.2f}x |", flush=True)


def pairs(model: str, n_ctx: int, fit_tokens: int = 2048) -> None:
    info = ModelInfo.of(model)
    groups = info.cache_layers()
    full = groups[0]
    cfg = MergeConfig()
    scored = DEFAULT_SCORED
    context = n_ctx - scored
    p0 = int(PROBE_DEPTH * context)
    t0 = time.perf_counter()
    llm = _internals.plain_llama(model, n_ctx=max(n_ctx, fit_tokens), n_batch=512, flash_attn=True, verbose=False)
    try:
        share = -(-fit_tokens // len(corpus.CAL_DOMAINS))
        toks = {d: corpus.tokens_for(llm, corpus.calibration_text(d), share + n_ctx, f"{d} calibration")
                for d in corpus.CAL_DOMAINS}
        fit_st = _internals.capture_kv(llm, [t for d in toks for t in toks[d][:share]][:fit_tokens], groups)
        scorers = {}
        for d in toks:
            held = toks[d][share:share + n_ctx]
            scorers[d] = KldScorer(llm, held[:context], held[context:], {"copy": held[p0:p0 + scored]},
                                   layer_groups=groups)
        print(f"{info.name}: full-attention layers {full}; context {context} + {scored} scored tokens per domain "
              f"({', '.join(toks)}); window {cfg.window}, t {cfg.t}, gamma {cfg.gamma}; budget {cfg.max_kld}\n")
        print("| pair | kind | merge | " + " | ".join(f"{d} next | {d} copy" for d in toks) + " | worst |")
        print("|---" * (4 + 2 * len(toks)) + "|")
        n_ubatch = merged_n_ubatch(cfg.window)
        for kind in "kv":
            fit_rows = fit_st.k if kind == "k" else fit_st.v
            for i in range(len(full) - 1):
                r = fit_rotation(fit_rows[i].astype(np.float32), fit_rows[i + 1].astype(np.float32), "head",
                                 info.n_head_kv)
                for name, spec in (("paper", PairSpec(kind, i)), ("aligned", PairSpec(kind, i, "head", r))):
                    # index i of the full-attention cache's state: layers full[i] and full[i + 1]
                    got = {}
                    for d, sc in scorers.items():
                        got[d] = sc.klds(simulate_merge(sc.state, [spec], cfg.t, cfg.gamma, cfg.window,
                                                        n_ubatch=n_ubatch))
                    worst = max(v for g in got.values() for v in g.values())
                    cells = " | ".join(f"{got[d]['next']:.4f} | {got[d]['copy']:.4f}" for d in got)
                    print(f"| {full[i]}-{full[i + 1]} | {kind.upper()} | {name} | {cells} | {worst:.4f} |", flush=True)
    finally:
        llm.close()
    print(f"\n({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an iSWA GGUF model (default: Gemma 3 270M Q4_K_M)")
    ap.add_argument("--ctx", default="8192,32768", help="context lengths of the memory table")
    ap.add_argument("--n-ctx", type=int, default=MergeConfig.calibration_ctx, help="scoring context of the pair table")
    ap.add_argument("--skip-pairs", action="store_true", help="only the memory table")
    a = ap.parse_args()
    model = a.model or str(gemma3_model_path())
    if not ModelInfo.of(model).swa_layers:
        sys.exit(f"{model}: not a model with sliding-window layers")
    memory(model, [int(c) for c in a.ctx.split(",")])
    print()
    if not a.skip_pairs:
        pairs(model, a.n_ctx)


if __name__ == "__main__":
    main()
