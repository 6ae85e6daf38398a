"""`minicache-gguf bench`: KV memory and speed of each KV mode side by side, in one run.

Per context length and mode: the KV bytes the cache allocated (kv_stats), prefill tok/s (the
context minus the decoded tokens, in n_batch chunks) and decode tok/s (one token at a time).
Modes run back to back per context length and repetition, so their ratios see the same machine
load. Plus, per mode, the largest context whose KV cache fits a memory budget (found by
allocating real contexts)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Optional

from . import corpus, report
from .config import BENCH_CTX, BENCH_MODES, QUANTIZED_TYPES, MergeConfig, kv_modes, type_name
from .llama import Llama
from .model import ModelInfo


def modes(cal_files: dict, names=None, window: int = MergeConfig.window, type_k=None, type_v=None) -> dict:
    """name -> Llama options of each KV mode to bench (config.kv_modes; unknown names are a ValueError);
    type_k/type_v: the cache types of merge modes that name none."""
    return {m.name: m.llama_kwargs() for m in kv_modes(window, cal_files, names or BENCH_MODES, type_k=type_k, type_v=type_v)}


def check_flash_attn(mode_kw: dict, flash_attn: bool) -> None:
    """A quantized V cache needs flash attention (llama.cpp stores V transposed without it): refuse such
    modes up front (ValueError) rather than after the others have run."""
    if flash_attn:
        return
    bad = [m for m, kw in mode_kw.items() if type_name(kw.get("type_v")) in QUANTIZED_TYPES]
    if bad:
        raise ValueError(f"modes {', '.join(bad)} quantize V, which needs flash attention: run them with flash "
                         "attention on, or quantize K only (a K/V type such as q8_0/f16)")


def prefill_decode(llm, toks, n_prefill: int, n_decode: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s): toks[:n_prefill] in batches, then n_decode tokens one at a time."""
    t0 = time.perf_counter()
    llm.eval(toks[:n_prefill])
    t1 = time.perf_counter()
    for t in toks[n_prefill:n_prefill + n_decode]:
        llm.eval([t])
    t2 = time.perf_counter()
    return n_prefill / (t1 - t0), n_decode / (t2 - t1)


def _one(model, kw, n_ctx, toks, n_decode, threads, flash_attn=True):
    llm = Llama(model, n_ctx=n_ctx, flash_attn=flash_attn, n_threads=threads, n_threads_batch=threads, verbose=False, **kw)
    try:
        p, d = prefill_decode(llm, toks, n_ctx - n_decode - 8, n_decode)
        return p, d, llm.kv_stats().kv_bytes
    finally:
        llm.close()


def kv_bytes(model, kw, n_ctx) -> int:
    llm = Llama(model, n_ctx=n_ctx, flash_attn=True, verbose=False, **kw)
    try:
        return llm.kv_stats().kv_bytes
    finally:
        llm.close()


def largest_context(model, kw, budget: int, lo: int = 256) -> int:
    """The largest n_ctx (a multiple of 256) whose allocated KV cache fits `budget` bytes (0 if none)."""
    b = kv_bytes(model, kw, lo)
    if b > budget:
        return 0
    hi = max(lo + 256, int(2 * budget / (b / lo)) // 256 * 256)  # past the answer: bytes/token only falls
    while kv_bytes(model, kw, hi) <= budget and hi < (1 << 20):
        lo, hi = hi, hi * 2
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        if kv_bytes(model, kw, mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def run(model, *, ctxs=BENCH_CTX, mode_kw: dict, n_decode: int = 32, reps: int = 1,
        budget_mib: float = 64.0, threads: Optional[int] = None, progress: bool = True, flash_attn: bool = True) -> dict:
    ctxs = sorted(set(int(c) for c in ctxs))
    if not ctxs or ctxs[0] < n_decode + 64:
        raise ValueError(f"context lengths {ctxs} are not valid: expected integers >= {n_decode + 64}")
    if not (isinstance(reps, int) and reps >= 1):
        raise ValueError(f"reps={reps!r} is not valid: expected an integer >= 1")
    if not budget_mib > 0:
        raise ValueError(f"budget_mib={budget_mib!r} is not valid: expected a positive number")
    check_flash_attn(mode_kw, flash_attn)
    threads = threads or os.cpu_count() or 1
    vocab = Llama(model, n_ctx=64, vocab_only=True, verbose=False)
    toks = corpus.tokens_for(vocab, corpus.builtin_text("eval"), max(ctxs), "benchmark")
    bar = report.progress(len(ctxs) * reps * len(mode_kw) + len(mode_kw), "bench", progress)
    _one(model, next(iter(mode_kw.values())), ctxs[0], toks, n_decode, threads, flash_attn)  # warm-up: page the model in
    res = {m: {"by_ctx": {}} for m in mode_kw}
    for c in ctxs:
        runs = {m: [] for m in mode_kw}
        for _ in range(reps):
            for m, kw in mode_kw.items():
                runs[m].append(_one(model, kw, c, toks, n_decode, threads, flash_attn))
                if bar:
                    bar.update()
        ref = runs.get("f16")
        for m, rs in runs.items():
            d = res[m]["by_ctx"][str(c)] = {"kv_bytes": rs[0][2], "prefill_tok_s": statistics.median(r[0] for r in rs),
                                            "decode_tok_s": statistics.median(r[1] for r in rs)}
            # speed vs f16: the median of the per-rep ratios (each rep ran the modes back to back, so a
            # ratio sees one machine load), with their range
            pairs = {k: [r[i] / f[i] for r, f in zip(rs, ref or rs)] for i, k in ((0, "prefill_tok_s"), (1, "decode_tok_s"))}
            d["vs_f16"] = {"kv_bytes": rs[0][2] / (ref or rs)[0][2], **{k: statistics.median(v) for k, v in pairs.items()}}
            d["vs_f16_range"] = {k: [min(v), max(v)] for k, v in pairs.items()}
            # a merge stacked on a cache type ("q4_0+aligned-head-w256") vs that type with merging off
            base = _base_mode(m, runs)
            if base is not None:
                rb = runs[base]
                pairs = {k: [r[i] / f[i] for r, f in zip(rs, rb)] for i, k in ((0, "prefill_tok_s"), (1, "decode_tok_s"))}
                d["vs_base"] = {"mode": base, "kv_bytes": rs[0][2] / rb[0][2],
                                **{k: statistics.median(v) for k, v in pairs.items()}}
                d["vs_base_range"] = {k: [min(v), max(v)] for k, v in pairs.items()}
    budget = int(budget_mib * (1 << 20))
    for m, kw in mode_kw.items():
        res[m]["max_ctx_in_budget"] = largest_context(model, kw, budget)
        if bar:
            bar.update()
    if bar:
        bar.close()
    info = ModelInfo.of(model)
    return {"model": {"name": info.name, "sha256": info.sha256, "path": str(model)},
            "settings": {"ctx": ctxs, "n_decode": n_decode, "reps": reps, "budget_mib": budget_mib, "threads": threads,
                         "flash_attn": flash_attn, "modes": {m: {k: (v.to_dict() if isinstance(v, MergeConfig) else v)
                                                           for k, v in kw.items()} for m, kw in mode_kw.items()}},
            "modes": res}


def _base_mode(name: str, runs: dict):
    """The stock mode a merge mode runs on (the part before "+", or f16), if it was benched too."""
    if "+" in name:
        base = name.split("+", 1)[0]
    elif name.startswith(("paper", "aligned")):
        base = "f16"
    else:
        return None
    return base if base in runs else None


def to_markdown(r: dict) -> str:
    s = r["settings"]
    out = [f"## KV memory and speed: {r['model']['name']}", "",
           f"flash attention {'on' if s['flash_attn'] else 'off'}, {s['threads']} threads, {s['n_decode']} tokens decoded after a prefill of "
           f"n_ctx - {s['n_decode'] + 8}; {s['reps']} rep(s), modes back to back; tok/s: medians; vs f16: median of "
           "the per-rep ratios [min–max over reps].", "",
           "| n_ctx | mode | KV MiB | KV vs f16 | prefill tok/s | vs f16 | decode tok/s | vs f16 |",
           "|---|---|---|---|---|---|---|---|"]
    for c in s["ctx"]:
        for m, d in r["modes"].items():
            x = d["by_ctx"][str(c)]
            v, rg = x["vs_f16"], x["vs_f16_range"]
            span = lambda k: f" [{rg[k][0]:.2f}–{rg[k][1]:.2f}]" if s["reps"] > 1 else ""
            out.append(f"| {c} | {m} | {x['kv_bytes'] / (1 << 20):.1f} | {v['kv_bytes']:.2f}× | {x['prefill_tok_s']:.1f} | "
                       f"{v['prefill_tok_s']:.2f}×{span('prefill_tok_s')} | {x['decode_tok_s']:.1f} | "
                       f"{v['decode_tok_s']:.2f}×{span('decode_tok_s')} |")
    stacked = [(c, m, d["by_ctx"][str(c)]) for c in s["ctx"] for m, d in r["modes"].items() if "vs_base" in d["by_ctx"][str(c)]]
    if stacked:
        out += ["", "Each merge vs its own cache type with merging off (median of per-rep ratios [min–max]):", "",
                "| n_ctx | mode | vs | KV | prefill | decode |", "|---|---|---|---|---|---|"]
        for c, m, x in stacked:
            v, rg = x["vs_base"], x["vs_base_range"]
            span = lambda k: f" [{rg[k][0]:.2f}–{rg[k][1]:.2f}]" if s["reps"] > 1 else ""
            out.append(f"| {c} | {m} | {v['mode']} | {1 / v['kv_bytes']:.2f}× less | {v['prefill_tok_s']:.2f}×{span('prefill_tok_s')} | "
                       f"{v['decode_tok_s']:.2f}×{span('decode_tok_s')} |")
    out += ["", f"Largest context whose KV cache fits {s['budget_mib']:g} MiB (allocated, multiples of 256):", "",
            "| mode | n_ctx |", "|---|---|"]
    out += [f"| {m} | {d['max_ctx_in_budget']} |" for m, d in r["modes"].items()]
    return "\n".join(out) + "\n"


def plot(r: dict, path) -> Path:
    ctxs = r["settings"]["ctx"]
    fig, axes = report.figure(1, 3, figsize=(14, 4))
    for m, d in r["modes"].items():
        ys = [d["by_ctx"][str(c)] for c in ctxs]
        axes[0].plot(ctxs, [y["kv_bytes"] / (1 << 20) for y in ys], "o-", label=m)
        axes[1].plot(ctxs, [y["prefill_tok_s"] for y in ys], "o-", label=m)
        axes[2].plot(ctxs, [y["decode_tok_s"] for y in ys], "o-", label=m)
    for ax, t in zip(axes, ("KV cache MiB (allocated)", "prefill tok/s", "decode tok/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n_ctx")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(r["model"]["name"])
    return report.save(fig, path)


def write(r: dict, out_dir) -> list[Path]:
    return report.write(out_dir, "bench", to_markdown(r), r, lambda p: plot(r, p))
