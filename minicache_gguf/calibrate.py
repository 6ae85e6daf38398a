"""The calibrate algorithm: fit rotations on calibration text, score every candidate (pair, K/V)
alone by its KLD against the full cache on held-out tokens (the merge simulated on llama.cpp's
real KV state, which the engine reproduces exactly; tests/test_calibration.py checks that), then
add candidates cheapest first while the measured KLD of the whole selection stays within the
budget. Runs on llama-cpp-python's own Llama (merging off) on the patched engine: calibrating
never builds a merged Llama.

Where users run: each score is taken at the target context n_ctx (default
MergeConfig.calibration_ctx) with the window and retention of the config, on held-out text of
every calibration domain (docs, code, chat: corpus.CAL_DOMAINS) and, per domain, on a retrieval
probe (a span from early in the context repeated after it: the model must copy from far back,
through the merged cells). A selection's KLD is the worst of these means, so the budget holds on
each domain and for retrieval, not on an average that one easy domain dominates. Rotations are
fitted on an equal mix of the domains.

pairs_for() resolves a MergeConfig's calibration (a file, or "auto": shipped, cached, or made
once here) into the engine's (pair, kind) list.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import numpy as np

from . import _internals, corpus
from ._version import __version__
from .alignment import FORMS, fit_all, simulate_merge
from .calfile import Calibration, CalibrationError, auto_path, find_auto, load_calibration
from .config import DEFAULT_SCORED, MergeConfig, PairSpec
from .metrics import KldScorer
from .model import ModelInfo
from .report import progress as _progress

DEFAULT_FIT_TOKENS = 2048
#: where the retrieval probe's span starts, as a fraction of the context
PROBE_DEPTH = 0.25

__all__ = ["calibrate", "auto_calibration", "pairs_for", "DEFAULT_FIT_TOKENS", "PROBE_DEPTH"]


def _overlaps(c, chosen) -> bool:
    return any(k == c[0] and abs(a - c[1]) <= 1 for k, a in chosen)


def calibrate(model_path, *, form: str = MergeConfig.alignment, max_kld: float = MergeConfig.max_kld,
              t: float = MergeConfig.t, gamma: float = MergeConfig.gamma, window: int = MergeConfig.window,
              fit_tokens: int = DEFAULT_FIT_TOKENS, n_ctx: int = MergeConfig.calibration_ctx,
              scored: int = DEFAULT_SCORED, text: Optional[str] = None, domains=corpus.CAL_DOMAINS,
              retrieval: bool = True, layout: Optional[int] = None, kinds: str = "kv", progress: bool = True,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Calibration:
    """Fit rotations on calibration text, score each candidate at context n_ctx, select under the
    KLD budget (the worst held-out text or retrieval probe stays within max_kld).

    text: a user's calibration text instead of the built-in domains. layout=S instead selects the
    paper's fixed layout (S, S+1), (S+2, S+3), ... for `kinds` (no budget; its KLD is still measured)."""
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not valid: expected one of {FORMS}")
    if kinds not in ("k", "v", "kv"):
        raise ValueError(f"kinds={kinds!r} is not valid: expected 'k', 'v' or 'kv'")
    if not (max_kld > 0 and np.isfinite(max_kld)):
        raise ValueError(f"max_kld={max_kld!r} is not valid: expected a positive number (nats/token)")
    for name, v, lo in (("fit_tokens", fit_tokens, 64), ("scored", scored, 8), ("n_ctx", n_ctx, 2 * scored + 64)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
            raise ValueError(f"{name}={v!r} is not valid: expected an integer >= {lo}")
    if text is None:
        domains = tuple(domains)
        if not domains or any(d not in corpus.CAL_DOMAINS for d in domains):
            raise ValueError(f"domains={domains!r} is not valid: expected a non-empty subset of {corpus.CAL_DOMAINS}")
        texts = {d: corpus.calibration_text(d) for d in domains}
        source = f"built-in calibration text ({', '.join(domains)})"
    else:
        texts, source = {"user": text}, "user text"
    t0 = time.perf_counter()
    context = n_ctx - scored
    llm = _internals.plain_llama(model_path, n_ctx=max(fit_tokens, n_ctx), n_batch=512, flash_attn=True, verbose=False)
    try:
        info = ModelInfo.of(model_path)
        share = -(-fit_tokens // len(texts))
        toks = {d: corpus.tokens_for(llm, x, share + n_ctx, f"{d} calibration") for d, x in texts.items()}
        fit = [tok for d in texts for tok in toks[d][:share]][:fit_tokens]
        log(f"calibrate: {info.name} ({info.arch}, {info.n_layer} layers); fitting {form} rotations on "
            f"{len(fit)} tokens of {', '.join(texts)}; scoring at context {n_ctx} ({scored} tokens per text"
            f"{' and per retrieval probe' if retrieval else ''}, window {window}, gamma {gamma:g})")
        rots = fit_all(_internals.capture_kv(llm, fit), form, info.n_head_kv)
        scorers = {}
        p0 = int(PROBE_DEPTH * context)
        for d in texts:
            held = toks[d][share:share + n_ctx]
            probes = {"copy": held[p0:p0 + scored]} if retrieval else None
            scorers[d] = KldScorer(llm, held[:context], held[context:], probes)
        spec = lambda c: PairSpec(c[0], c[1], form, rots[c])

        def measure(sel) -> dict:
            out = {}
            for d, sc in scorers.items():
                for k, v in sc.klds(simulate_merge(sc.state, [spec(c) for c in sel], t, gamma, window)).items():
                    out[d if k == "next" else f"{d}:{k}"] = v
            return out

        cands = [] if layout is not None else [(k, a) for k in kinds for a in range(info.n_layer - 1)]
        cost = {(k, a): float("nan") for k in "kv" for a in range(info.n_layer - 1)}
        if layout is not None:
            if not (isinstance(layout, int) and 0 <= layout <= info.n_layer - 2):
                raise ValueError(f"layout={layout!r} is not valid for {info.n_layer} layers: expected 0..{info.n_layer - 2}")
            chosen = [(k, a) for a in range(layout, info.n_layer - 1, 2) for k in kinds]
        bar = _progress(len(cands), "score pairs", progress)
        for c in cands:
            cost[c] = max(measure([c]).values())
            if bar:
                bar.update()
        if bar:
            bar.close()
        per_text = {}
        if layout is None:
            chosen, misses = [], 0
            bar = _progress(len(cands), "select", progress)
            for c in sorted(cands, key=lambda c: (cost[c], c)):
                if bar:
                    bar.update()
                if _overlaps(c, chosen):
                    continue
                if cost[c] > max_kld or misses >= 4:
                    break
                m = measure(chosen + [c])
                if max(m.values()) <= max_kld:
                    chosen.append(c)
                    per_text, misses = m, 0
                else:
                    misses += 1
            if bar:
                bar.close()
        elif chosen:
            per_text = measure(chosen)
    finally:
        llm.close()
    chosen.sort(key=lambda c: (c[0], c[1]))
    costs = {k: np.array([cost[k, a] for a in range(info.n_layer - 1)]) for k in "kv"}
    cal = Calibration(model=info, form=form, pairs=[spec(c) for c in chosen], n_tokens=len(fit),
                      settings={"t": t, "gamma": gamma, "window": window, "max_kld": None if layout is not None else max_kld,
                                "layout": layout, "kinds": kinds, "n_ctx": n_ctx, "scored": scored, "corpus": source,
                                "texts": list(texts), "retrieval_probe": retrieval, "probe_depth": PROBE_DEPTH,
                                "selection_kld_by_text": per_text},
                      cost=costs, selection_kld=max(per_text.values()) if per_text else 0.0, tool_version=__version__)
    log(f"calibrate: {cal.describe()} [{time.perf_counter() - t0:.0f} s]")
    return cal


def auto_calibration(model_path, cfg: MergeConfig, progress: bool = True) -> Calibration:
    """The calibration of calibration="auto" for a model and config: the shipped or cached one,
    else made once here and cached (a damaged cached file is made again, saying so)."""
    model = ModelInfo.of(model_path)
    path = find_auto(model, cfg)
    if path is not None:
        try:
            return load_calibration(path, model)
        except CalibrationError as e:
            print(f"minicache-gguf: cached calibration unusable ({e}); calibrating again", file=sys.stderr)
    path = auto_path(model, cfg)
    print(f"minicache-gguf: calibrating {model.name} once ({cfg.alignment} alignment, KLD budget "
          f"{cfg.max_kld} at context {cfg.calibration_ctx}); cached in {path}", file=sys.stderr)
    cal = calibrate(model_path, form=cfg.alignment, max_kld=cfg.max_kld, t=cfg.t, gamma=cfg.gamma,
                    window=cfg.window, n_ctx=cfg.calibration_ctx, progress=progress)
    cal.save(path)
    return cal


def pairs_for(cfg: MergeConfig, model_path, progress: bool = True) -> tuple[list[PairSpec], Calibration]:
    """The merged (pair, kind) list of a MergeConfig with calibration=PATH | "auto" for a model:
    the calibration's selection, filtered by merge_k / merge_v / start_layer."""
    if cfg.calibration == "auto":
        cal = auto_calibration(model_path, cfg, progress)
    else:
        cal = load_calibration(cfg.calibration, ModelInfo.of(model_path))
    return cal.selection(cfg), cal
