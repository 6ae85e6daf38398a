"""`minicache-gguf analyze`: how similar adjacent layers' K and V really are (the paper's Figure 1a
for the user's own model), raw and after the calibrated alignment, on held-out tokens.

A model with interleaved sliding-window layers (Gemma 2/3) has two KV caches: the pairs are
consecutive layers of the same cache (its full-attention layers with each other, its
sliding-window layers with each other), measured on the cells each cache holds (a sliding-window
cache: the last window of the context)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import _internals, corpus, report
from .alignment import cosine, fit_rotation, full_matrix
from .llama import Llama
from .model import ModelInfo


def analyze(model_path, *, tokens: int = 2048, text: str | None = None, progress: bool = True) -> dict:
    """Cosine similarity of every adjacent pair's K and V rows (whole rows and per KV head; mean
    and 5th percentile), raw and aligned. Rotations are fitted on the first half of the tokens and
    measured on the second half."""
    if not (isinstance(tokens, int) and tokens >= 128):
        raise ValueError(f"tokens={tokens!r} is not valid: expected an integer >= 128")
    info = ModelInfo.of(model_path)
    llm = Llama(model_path, n_ctx=tokens, flash_attn=True, verbose=False)
    try:
        toks = corpus.tokens_for(llm, corpus.builtin_text("calibration") if text is None else text, tokens, "analysis")
        st = _internals.capture_kv(llm, toks[:tokens], info.cache_layers())
    finally:
        llm.close()
    parts = []
    part = st
    while part is not None:
        parts.append(part)
        part = part.next
    caches = ["all"] if len(parts) == 1 else ["full attention", "sliding window"]
    bar = report.progress(sum(2 * max(0, len(x.k) - 1) for x in parts), "analyze", progress)
    rows = []
    for cache, part in zip(caches, parts):
        ids = part.layer_ids()
        half = part.n_cells // 2
        if half < 16:
            continue
        for kind, data in (("k", part.k), ("v", part.v)):
            for i in range(len(data) - 1):
                x0, x1 = data[i].astype(np.float32), data[i + 1].astype(np.float32)
                r_full = fit_rotation(x0[:half], x1[:half], "full", info.n_head_kv)
                r_head = full_matrix("head", fit_rotation(x0[:half], x1[:half], "head", info.n_head_kv))
                h0, h1 = x0[half:], x1[half:]
                stats = {}
                for name, c in (("row_raw", cosine(h0, h1)),
                                ("row_aligned", cosine(h0 @ r_full, h1)),
                                ("head_raw", cosine(h0, h1, info.n_head_kv)),
                                ("head_aligned", cosine(h0 @ r_head, h1, info.n_head_kv))):
                    stats[name] = {"mean": float(c.mean()), "p5": float(np.percentile(c, 5))}
                rows.append({"kind": kind, "pair": [ids[i], ids[i + 1]], "cache": cache,
                             "fit_tokens": half, "heldout_tokens": part.n_cells - half, **stats})
                if bar:
                    bar.update()
    if bar:
        bar.close()
    half = tokens // 2
    return {"model": {"name": info.name, "arch": info.arch, "sha256": info.sha256, "n_layer": info.n_layer,
                      "n_head_kv": info.n_head_kv, "swa_layers": list(info.swa_layers), "path": str(model_path)},
            "tokens": tokens, "fit_tokens": half, "heldout_tokens": tokens - half,
            "text": "built-in calibration split (pydoc_data)" if text is None else "user text", "pairs": rows}


def to_markdown(res: dict) -> str:
    m = res["model"]
    out = [f"## Adjacent-layer similarity: {m['name']} ({m['arch']}, {m['n_layer']} layers, {m['n_head_kv']} KV heads)",
           "",
           f"Cosine similarity of the cached rows of layers a and b on {res['heldout_tokens']} held-out tokens "
           f"(rotations fitted on the {res['fit_tokens']} tokens before them). mean / 5th percentile."]
    if m.get("swa_layers"):
        out += ["", f"Sliding-window layers {m['swa_layers']} keep a second cache: pairs are consecutive layers of the "
                "same cache; a sliding-window pair is measured on the last window of the context (its cells split "
                "in half the same way)."]
    head = "| pair | K row raw | K row aligned | K head raw | K head aligned | V row raw | V row aligned | V head raw | V head aligned |"
    out += ["", head if not m.get("swa_layers") else "| cache " + head, "|---" * (9 + bool(m.get("swa_layers"))) + "|"]
    by = {(r["kind"], tuple(r["pair"])): r for r in res["pairs"]}
    f = lambda s: f"{s['mean']:+.2f} / {s['p5']:+.2f}"
    for r in res["pairs"]:
        if r["kind"] != "k":
            continue
        a, b = r["pair"]
        k, v = r, by["v", (a, b)]
        cells = " | ".join(f(x[c]) for x in (k, v) for c in ("row_raw", "row_aligned", "head_raw", "head_aligned"))
        out.append((f"| {r['cache']} " if m.get("swa_layers") else "") + f"| {a}-{b} | {cells} |")
    return "\n".join(out) + "\n"


def plot(res: dict, path) -> Path:
    fig, axes = report.figure(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, "kv"):
        rs = sorted((r for r in res["pairs"] if r["kind"] == kind), key=lambda r: r["pair"][1])
        x = [r["pair"][1] for r in rs]
        for col, label, style in (("row_raw", "raw", "o-"), ("row_aligned", "aligned (whole-row R)", "s-"),
                                  ("head_aligned", "aligned (per-head R)", "^--")):
            ax.plot(x, [r[col]["mean"] for r in rs], style, ms=3, label=label)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{kind.upper()} cache: cos(layer a, layer b)")
        ax.set_xlabel("layer b of the pair (a, b)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean cosine similarity (held-out tokens)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{res['model']['name']}: adjacent-layer KV similarity")
    return report.save(fig, path)


def write(res: dict, out_dir) -> list[Path]:
    return report.write(out_dir, "analyze", to_markdown(res), res, lambda p: plot(res, p))
