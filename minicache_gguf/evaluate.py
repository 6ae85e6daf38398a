"""`minicache-gguf eval`: what a KV cache configuration costs in quality and saves in memory,
measured through the real engine.

For each context length C and each row (a KV cache configuration), the first C - E tokens of a
chunk of evaluation text are prefilled and the last E = min(256, C/2) tokens are evaluated in one
batch, whose E - 1 next-token predictions are scored; against the full f16 cache on the same chunk: perplexity, KL divergence (mean and 99th
percentile, nats/token), top-1 agreement. Passkey retrieval: a number hidden at several depths
of filler text, the model asked to repeat it (greedy). Every row reports the KV bytes per token
its cache really allocated (kv_stats(): the backend buffers, staging/retention pools and
rotations included).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import _internals, corpus, report
from .config import KvMode, MergeConfig, kv_modes
from .llama import Llama
from .metrics import kld_per_token, log_softmax
from .model import ModelInfo

DEFAULT_CTX = (512, 1024, 2048, 4096, 8192)
def default_rows(window: int, cal_files: dict, names=None, t: float = MergeConfig.t, gamma: float = MergeConfig.gamma,
                 type_k=None, type_v=None) -> list:
    """The rows of the eval table: the KV modes of config.kv_modes (the table bench uses too): f16
    (the reference), stock q8_0/q5_0/q4_0, and each merge mode with the window on and off
    (type_k/type_v: the cache types of merge rows that name none)."""
    return kv_modes(window, cal_files, names, t=t, gamma=gamma, type_k=type_k, type_v=type_v)


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.\n\n")
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(llm, n_ctx: int, depth: float, key: int) -> str:
    """A prompt of about n_ctx - 16 tokens with the key line at `depth` (0 = start, 1 = end) of the filler."""
    line = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(llm.tokenize(FILLER.encode(), add_bos=False))
    fixed = len(llm.tokenize((PASSKEY_INTRO + line + PASSKEY_QUESTION).encode()))
    n_fill = max(1, (n_ctx - 16 - fixed) // per)
    before = int(round(depth * n_fill))
    return PASSKEY_INTRO + FILLER * before + line + FILLER * (n_fill - before) + PASSKEY_QUESTION


@dataclass
class Result:
    rows: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)


def _metrics(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict:
    lq = log_softmax(got)
    nll = -lq[np.arange(len(targets)), targets]
    kl = kld_per_token(ref, got)
    return {"nll": nll, "kld": kl, "top1": (ref.argmax(-1) == got.argmax(-1))}


def run(model_path, *, ctxs=DEFAULT_CTX, chunks: int = 1, rows: Optional[list[KvMode]] = None, text: Optional[str] = None,
        text_what: Optional[str] = None,
        passkey_ctx: int = 4096, passkey_depths=(0.1, 0.3, 0.5, 0.7, 0.9), passkey_trials: int = 1,
        n_ubatch: int = 512, threads: Optional[int] = None, progress: bool = True, seed: int = 1234) -> Result:
    if rows is None:
        raise ValueError("rows: pass default_rows(...) or a list of KvMode")
    if rows[0].name != "f16":
        raise ValueError("the first row must be the f16 reference")
    ctxs = sorted(set(int(c) for c in ctxs))
    if not ctxs or ctxs[0] < 64:
        raise ValueError(f"context lengths {ctxs} are not valid: expected integers >= 64")
    if not (isinstance(chunks, int) and chunks >= 1):
        raise ValueError(f"chunks={chunks!r} is not valid: expected an integer >= 1")
    threads = threads or os.cpu_count() or 1
    common = dict(flash_attn=True, n_ubatch=n_ubatch, n_threads=threads, n_threads_batch=threads, verbose=False)

    vocab = Llama(model_path, n_ctx=64, vocab_only=True, verbose=False)
    src = corpus.builtin_text("eval") if text is None else text
    need = max(ctxs) * chunks
    toks = corpus.tokens_for(vocab, src, need, "evaluation")
    info = ModelInfo.of(model_path)

    keys = random.Random(seed)
    trials = [(d, keys.randrange(10000, 99999)) for d in passkey_depths for _ in range(passkey_trials)] if passkey_ctx else []
    total = len(ctxs) * chunks * len(rows) + len(trials) * len(rows)
    bar = report.progress(total, "eval", progress)

    out = {r.name: {"name": r.name, "what": r.what, "quality": {}, "kv_bytes_per_token": {}, "passkey": None} for r in rows}
    for c in ctxs:
        e = min(256, c // 2)
        ref_logits = []
        for r in rows:
            acc = {"nll": [], "kld": [], "top1": []}
            llm = Llama(model_path, n_ctx=c, **common, **r.llama_kwargs())
            try:
                out[r.name]["kv_bytes_per_token"][c] = llm.kv_stats().kv_bytes / c
                for j in range(chunks):
                    chunk = toks[j * c:(j + 1) * c]
                    llm.reset()
                    llm.eval(chunk[:c - e])
                    # the scored batch's own predictions: positions c-e .. c-2 predict chunk[c-e+1 .. c-1]
                    logits = _internals.eval_logits(llm, chunk[c - e:])[:-1]
                    if r.name == "f16":
                        ref_logits.append(logits)
                    m = _metrics(ref_logits[j], logits, np.array(chunk[c - e + 1:c]))
                    for k in acc:
                        acc[k].append(m[k])
                    if bar:
                        bar.update()
            finally:
                llm.close()
            nll, kl, top1 = (np.concatenate(acc[k]) for k in ("nll", "kld", "top1"))
            out[r.name]["quality"][c] = {"ppl": float(np.exp(nll.mean())), "kld_mean": float(kl.mean()),
                                         "kld_p99": float(np.percentile(kl, 99)), "top1": float(top1.mean()),
                                         "scored_tokens": int(len(kl))}
        base = out["f16"]["quality"][c]["ppl"]
        for r in rows:
            out[r.name]["quality"][c]["ppl_ratio"] = out[r.name]["quality"][c]["ppl"] / base

    if trials:
        for r in rows:
            llm = Llama(model_path, n_ctx=passkey_ctx, **common, **r.llama_kwargs())
            try:
                out[r.name]["kv_bytes_per_token"].setdefault(passkey_ctx, llm.kv_stats().kv_bytes / passkey_ctx)
                hits = []
                for depth, key in trials:
                    llm.reset()
                    prompt = passkey_prompt(llm, passkey_ctx, depth, key)
                    text_out = llm.create_completion(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
                    found = re.findall(r"\d+", text_out)
                    hits.append({"depth": depth, "key": key, "answer": text_out.strip(), "ok": bool(found) and found[0] == str(key)})
                    if bar:
                        bar.update()
            finally:
                llm.close()
            out[r.name]["passkey"] = {"ctx": passkey_ctx, "accuracy": sum(h["ok"] for h in hits) / len(hits),
                                      "trials": hits}
    if bar:
        bar.close()

    for r in rows:
        d = out[r.name]
        d["kv_bytes_per_token"] = {str(k): v for k, v in d["kv_bytes_per_token"].items()}
        d["quality"] = {str(k): v for k, v in d["quality"].items()}
        ref = out["f16"]["kv_bytes_per_token"]
        d["compression"] = {k: ref[k] / v for k, v in d["kv_bytes_per_token"].items() if k in ref}
    return Result(rows=[out[r.name] for r in rows],
                  settings={"ctx": ctxs, "chunks": chunks, "scored_per_chunk": {str(c): min(256, c // 2) for c in ctxs},
                            "passkey_ctx": passkey_ctx, "passkey_depths": list(passkey_depths),
                            "passkey_trials": passkey_trials, "n_ubatch": n_ubatch, "flash_attn": True,
                            "text": text_what or ("built-in eval split (pydoc_data)" if text is None else "user text"),
                            "merge": {r.name: (r.merge.to_dict() if r.merge else None) for r in rows}},
                  model={"name": info.name, "arch": info.arch, "sha256": info.sha256, "path": str(model_path)})


def to_markdown(res: Result) -> str:
    out = [f"## KV cache quality and memory: {res.model['name']}", "",
           f"Scored against the full f16 cache on the same tokens ({res.settings['text']}; flash attention on, "
           f"n_ubatch {res.settings['n_ubatch']}). KV B/tok = bytes the cache allocated / n_ctx.", ""]
    for c in res.settings["ctx"]:
        k = str(c)
        out += [f"### context {c} ({res.settings['chunks']} chunk(s), last {res.settings['scored_per_chunk'][k]} tokens scored)", "",
                "| row | KV B/tok | compression | PPL | PPL × | KLD mean | KLD p99 | top-1 |", "|---|---|---|---|---|---|---|---|"]
        for r in res.rows:
            q = r["quality"][k]
            out.append(f"| {r['name']} | {r['kv_bytes_per_token'][k]:.0f} | {r['compression'][k]:.2f}× | {q['ppl']:.3f} | "
                       f"{q['ppl_ratio']:.3f} | {q['kld_mean']:.4f} | {q['kld_p99']:.3f} | {q['top1']:.3f} |")
        out.append("")
    if any(r["passkey"] for r in res.rows):
        pk = res.settings["passkey_ctx"]
        out += [f"### passkey retrieval at context {pk}", "", "| row | accuracy | KV B/tok | compression | answers (depth: answer) |",
                "|---|---|---|---|---|"]
        for r in res.rows:
            p = r["passkey"]
            ans = "; ".join(f"{t['depth']:.1f}: {'✓' if t['ok'] else '✗ ' + repr(t['answer'][:16])}" for t in p["trials"])
            out.append(f"| {r['name']} | {p['accuracy']:.2f} | {r['kv_bytes_per_token'][str(pk)]:.0f} | "
                       f"{r['compression'][str(pk)]:.2f}× | {ans} |")
        out.append("")
    out += ["Rows:", ""] + [f"- `{r['name']}`: {r['what']}" for r in res.rows]
    return "\n".join(out) + "\n"


def plot(res: Result, path) -> Path:
    c = str(max(res.settings["ctx"]))
    fig, ax = report.figure(figsize=(7.5, 5))
    for r in res.rows:
        x, y = r["kv_bytes_per_token"][c], max(r["quality"][c]["kld_mean"], 1e-5)
        stock = "+" not in r["name"] and not r["name"].startswith(("paper", "aligned"))
        marker = "s" if stock else ("o" if "aligned" in r["name"] else "^")
        ax.scatter([x], [y], marker=marker, s=40)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("KV cache bytes per token (allocated)")
    ax.set_ylabel("KLD vs full f16 cache (nats/token, mean)")
    ax.set_title(f"{res.model['name']}: quality vs KV memory at context {c}")
    ax.grid(alpha=0.3, which="both")
    return report.save(fig, path)


def write(res: Result, out_dir, stem: str = "eval") -> list[Path]:
    data = {"model": res.model, "settings": res.settings, "rows": res.rows}
    return report.write(out_dir, stem, to_markdown(res), data, lambda p: plot(res, p))


def summary(results: dict) -> str:
    """One table per context length: each row's mean KLD on each text (label -> Result of run())."""
    labels = list(results)
    first = results[labels[0]]
    out = [f"## KLD mean by text: {first.model['name']}", "",
           "Each text scored as in its own table below (last tokens of a chunk, against the full f16 cache).", ""]
    out += [f"- `{k}`: {r.settings['text']}" for k, r in results.items()] + [""]
    for c in first.settings["ctx"]:
        k = str(c)
        out += [f"### context {c}", "", "| row | compression | " + " | ".join(labels) + " |",
                "|---|---|" + "---|" * len(labels)]
        for i, r in enumerate(first.rows):
            klds = [results[lab].rows[i]["quality"][k]["kld_mean"] for lab in labels]
            out.append(f"| {r['name']} | {r['compression'][k]:.2f}× | " + " | ".join(f"{x:.4f}" for x in klds) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def write_many(results: dict, out_dir) -> list[Path]:
    """eval-<text>.{md,json,png} per text and eval-summary.md."""
    out = []
    for label, res in results.items():
        out += write(res, out_dir, "eval-" + "".join(ch if ch.isalnum() else "-" for ch in label.split("/")[-1]))
    path = Path(out_dir) / "eval-summary.md"
    path.write_text(summary(results))
    return out + [path]
