"""The calibrate algorithm: fit rotations on calibration text, score every candidate (pair, K/V)
alone by its KLD against the full cache on held-out tokens (the merge simulated on llama.cpp's
real KV state, which the engine reproduces exactly; tests/test_calibration.py checks that), then
add candidates cheapest first while the measured KLD of the whole selection stays within the
budget. Runs on llama-cpp-python's own Llama (merging off) on the patched engine: calibrating
never builds a merged Llama.

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
from .config import MergeConfig, PairSpec
from .metrics import KldScorer
from .model import ModelInfo
from .report import progress as _progress

DEFAULT_FIT_TOKENS = 2048
DEFAULT_CONTEXT = 1024
DEFAULT_SCORED = 128

__all__ = ["calibrate", "auto_calibration", "pairs_for", "DEFAULT_FIT_TOKENS", "DEFAULT_CONTEXT", "DEFAULT_SCORED"]


def _overlaps(c, chosen) -> bool:
    return any(k == c[0] and abs(a - c[1]) <= 1 for k, a in chosen)


def calibrate(model_path, *, form: str = MergeConfig.alignment, max_kld: float = MergeConfig.max_kld,
              t: float = MergeConfig.t, gamma: float = MergeConfig.gamma, window: int = MergeConfig.window,
              fit_tokens: int = DEFAULT_FIT_TOKENS,
              context: int = DEFAULT_CONTEXT, scored: int = DEFAULT_SCORED, text: Optional[str] = None,
              layout: Optional[int] = None, kinds: str = "kv", progress: bool = True, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Calibration:
    """Fit rotations on calibration text, score each candidate, select under the KLD budget.

    layout=S instead selects the paper's fixed layout (S, S+1), (S+2, S+3), ... for `kinds`
    (no budget; the selection's KLD is still measured)."""
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not valid: expected one of {FORMS}")
    if kinds not in ("k", "v", "kv"):
        raise ValueError(f"kinds={kinds!r} is not valid: expected 'k', 'v' or 'kv'")
    if not (max_kld > 0 and np.isfinite(max_kld)):
        raise ValueError(f"max_kld={max_kld!r} is not valid: expected a positive number (nats/token)")
    for name, v, lo in (("fit_tokens", fit_tokens, 64), ("context", context, 64), ("scored", scored, 8)):
        if not (isinstance(v, int) and v >= lo):
            raise ValueError(f"{name}={v!r} is not valid: expected an integer >= {lo}")
    t0 = time.perf_counter()
    n_ctx = max(fit_tokens, context + scored)
    llm = _internals.plain_llama(model_path, n_ctx=n_ctx, n_batch=512, flash_attn=True, verbose=False)
    try:
        info = ModelInfo.of(model_path)
        source = "built-in calibration text (pydoc_data, calibration split)" if text is None else "user text"
        toks = corpus.tokens_for(llm, corpus.builtin_text("calibration") if text is None else text,
                                 fit_tokens + context + scored, "calibration")
        fit, held = toks[:fit_tokens], toks[fit_tokens:fit_tokens + context + scored]
        log(f"calibrate: {info.name} ({info.arch}, {info.n_layer} layers); fitting {form} rotations on "
            f"{fit_tokens} tokens, scoring on {context}+{scored} held-out tokens")
        st = _internals.capture_kv(llm, fit)
        rots = fit_all(st, form, info.n_head_kv)
        scorer = KldScorer(llm, held[:context], held[context:])
        spec = lambda c: PairSpec(c[0], c[1], form, rots[c])
        sim = lambda sel: scorer.kld(simulate_merge(scorer.state, [spec(c) for c in sel], t, gamma, window))
        if layout is not None:
            if not (isinstance(layout, int) and 0 <= layout <= info.n_layer - 2):
                raise ValueError(f"layout={layout!r} is not valid for {info.n_layer} layers: expected 0..{info.n_layer - 2}")
            chosen = [(k, a) for a in range(layout, info.n_layer - 1, 2) for k in kinds]
            cur = sim(chosen)
            cost = {(k, a): float("nan") for k in "kv" for a in range(info.n_layer - 1)}
            cands = []
        else:
            cands = [(k, a) for k in kinds for a in range(info.n_layer - 1)]
            cost = {(k, a): float("nan") for k in "kv" for a in range(info.n_layer - 1)}
        bar = _progress(len(cands), "score pairs", progress)
        for c in cands:
            cost[c] = sim([c])
            if bar:
                bar.update()
        if bar:
            bar.close()
        order = sorted(cands, key=lambda c: (cost[c], c))
        if layout is None:
            chosen, cur = [], 0.0
        misses = 0
        bar = _progress(len(order), "select", progress)
        for c in order:
            if bar:
                bar.update()
            if _overlaps(c, chosen):
                continue
            if cost[c] > max_kld or misses >= 4:
                break
            k = sim(chosen + [c])
            if k <= max_kld:
                chosen.append(c)
                cur, misses = k, 0
            else:
                misses += 1
        if bar:
            bar.close()
    finally:
        llm.close()
    chosen.sort(key=lambda c: (c[0], c[1]))
    costs = {k: np.array([cost[k, a] for a in range(info.n_layer - 1)]) for k in "kv"}
    cal = Calibration(model=info, form=form, pairs=[spec(c) for c in chosen], n_tokens=fit_tokens,
                      settings={"t": t, "gamma": gamma, "window": window, "max_kld": None if layout is not None else max_kld,
                                "layout": layout, "kinds": kinds, "context": context, "scored": scored, "corpus": source},
                      cost=costs, selection_kld=cur if chosen else 0.0, tool_version=__version__)
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
          f"{cfg.max_kld}); cached in {path}", file=sys.stderr)
    cal = calibrate(model_path, form=cfg.alignment, max_kld=cfg.max_kld, t=cfg.t, gamma=cfg.gamma,
                    window=cfg.window, progress=progress)
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
