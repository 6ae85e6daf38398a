"""The calibrate algorithm and the one place that decides which calibration a merge uses.

calibrate(): the rotations of every adjacent (pair, K/V) are fitted once per model (orthogonal
Procrustes on calibration text; reused from the model's rotation set when one exists). Each
calibration domain's held-out context is captured once at the target context n_ctx, as the
user's KV cache type holds it (f16 as is; q8_0/q4_0 quantized in NumPy exactly as llama.cpp
stores them, scored on a float32 cache: alignment.CacheSim). Candidates are ranked by a cheap
proxy computed on the captured state: each one's KLD alone on a short prefix of the first
domain's state (RANK_TOKENS tokens after half the context: one small evaluation per candidate;
a re-scoring reuses the ranking of the calibration it starts from), and the full KLD is measured
only along the selection path:

  1. the candidates in proxy order, each skipped where it overlaps one before it, form a list L;
  2. the longest prefix of L whose measured KLD stays within the budget is found by bisection
     (a re-scoring for other settings probes the earlier selection's size first);
  3. the selection is extended greedily with the next candidates in proxy order (those that
     overlapped a rejected one included) until MAX_MISSES in a row fail or MAX_MEASURES
     selections have been measured.

A selection's KLD is the worst, over domains and their retrieval probes, of the mean KLD against
the stock f16 cache; for q8_0/q4_0, what merging adds to the quantization's error: the mean KLD
against the unquantized model's logits minus the stock q8_0/q4_0 cache's (metrics.KldScorer.klds_added).
The exact tokens are those the engine's streaming retention keeps for a prompt in its default
ubatches (reference.merge_steps, stream_retained).

pairs_for() resolves a MergeConfig's calibration for a model and cache types: "paper" (none),
a file, or "auto" — shipped or cached for these settings; else re-scored from a calibration of
the same model made for other settings (its rotations reused, an ETA first); else refused with
the time a calibration would take (CalibrationMissing), never the paper's merge in its place.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import _internals, corpus
from ._engine import cache_dir
from ._version import __version__
from . import kvstate
from .alignment import FORMS, CacheSim, cosine, fit_all, simulate_merge
from .metrics import kld_per_token
from .calfile import (Calibration, CalibrationError, auto_path, find_auto, find_base, find_rotations, load_calibration,
                      rotations_name, save_rotations)
from .config import DEFAULT_SCORED, GGML_TYPES, ConfigError, MergeConfig, PairSpec, merged_n_ubatch
from .metrics import KldScorer
from .model import ModelInfo
from .validate import sliding_window_refusal

DEFAULT_FIT_TOKENS = 2048
#: where the retrieval probe's span starts, as a fraction of the context
PROBE_DEPTH = 0.25
#: most KLD measurements of a selection per calibration (each: every domain's held-out tokens and probe)
MAX_MEASURES = 8
#: the greedy extension stops after this many rejected candidates in a row
MAX_MISSES = 2
#: tokens each candidate alone is scored on for the ranking (after half the context)
RANK_TOKENS = 32
#: set (to anything) to make every calibration fail before any work: the test suite sets it, so
#: no test starts one without asking (tests/conftest.py)
FORBID_ENV = "MINICACHE_GGUF_NO_CALIBRATION"
#: the paper's premise: adjacent layers' cached rows point the same way. Below this mean cosine
#: similarity (raw rows, the pairs the paper's layout merges), asking for the paper's merge warns
PAPER_MIN_COSINE = 0.5

__all__ = ["calibrate", "pairs_for", "resolve", "default_merge", "save_auto", "estimate_seconds", "CalibrationMissing", "PaperMergeWarning",
           "paper_similarity", "DEFAULT_FIT_TOKENS", "PROBE_DEPTH", "MAX_MEASURES", "FORBID_ENV"]


class CalibrationMissing(ConfigError):
    """kv_merge asked for a calibrated merge of a model that has no calibration yet."""


class PaperMergeWarning(UserWarning):
    """The paper's uncalibrated merge was asked for on a model whose adjacent layers are not similar."""


def _overlaps(c, chosen) -> bool:
    return any(k == c[0] and abs(a - c[1]) <= 1 for k, a in chosen)


def _fmt_s(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _types_text(type_k: str, type_v: str) -> str:
    return type_k if type_k == type_v else f"K {type_k} / V {type_v}"


def _ctk_args(type_k: str, type_v: str) -> str:
    return "" if (type_k, type_v) == ("f16", "f16") else f" -ctk {type_k} -ctv {type_v}"


class _Clock:
    """Calibration work in prefill-equivalents (pe: one prefill of the scoring context), and its
    seconds on this machine from one timed 512-token prefill: a prefill of n tokens costs
    n * per_token * (1 + n / DEPTH_TOKENS) (attention grows with the context). The steps' costs in
    pe were measured on the default model at context 4096 (`minicache-gguf calibrate` logs the
    real figure of every run)."""

    #: the context length at which attention doubles a prefill token's cost (default model: a
    #: 512-token prefill 1.47 s, a 4096-token one 18.3 s)
    DEPTH_TOKENS = 7370
    #: pe of: fitting rotations on 2048 tokens; capturing one domain (prefill, state, references);
    #: ranking one candidate; measuring one selection on one domain (next tokens + probe)
    FIT, CAPTURE, RANK, MEASURE = 0.46, 1.3, 0.0075, 0.12
    #: a quantized cache is scored on float32 rows: states twice the size, quantized in NumPy
    #: (measured on the default model, q4_0: 215 s vs 166 s for f16)
    SIMULATED = 1.4

    def __init__(self, per_token: float, context: int, simulated: bool = False):
        self.prefill_s = context * per_token * (1 + context / self.DEPTH_TOKENS) * (self.SIMULATED if simulated else 1.0)

    def plan(self, *, fit_tokens: int, n_texts: int, measures: int, ranked: int) -> dict:
        """Estimated pe of each step and in total, and the total in seconds; ranked: candidates to
        rank (0: ranking reused)."""
        out = {"fit": self.FIT * fit_tokens / DEFAULT_FIT_TOKENS, "capture": self.CAPTURE,
               "rank": self.RANK, "measure": self.MEASURE * n_texts}
        out["total"] = out["fit"] + n_texts * out["capture"] + ranked * out["rank"] + measures * out["measure"]
        out["seconds"] = out["total"] * self.prefill_s
        return out


def _time_prefill(llm, tokens: list) -> float:
    """Seconds per token of a 512-token prefill (after a short warm-up)."""
    llm.reset()
    llm.eval(tokens[:16])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens[:512])
    dt = time.perf_counter() - t0
    llm.reset()
    return dt / len(tokens[:512])


#: calibration's measured selections, as planned for the ETA: a fresh one (bisection + extension)
#: and a re-scoring from an earlier selection (its size probed first)
PLANNED_MEASURES = {"fresh": 7, "rescore": 4}


def _scoring_llama(model_path, n_ctx: int, sim: CacheSim):
    """llama-cpp-python's Llama on the patched engine, merging off: f16 cache for an f16 target,
    else float32 (the simulated cache's values are loaded into it exactly)."""
    kw = {} if sim.plain else dict(type_k=GGML_TYPES["f32"], type_v=GGML_TYPES["f32"])
    return _internals.plain_llama(model_path, n_ctx=n_ctx, n_batch=512, flash_attn=True, verbose=False, **kw)


def calibrate(model_path, *, form: str = MergeConfig.alignment, max_kld: float = MergeConfig.max_kld,
              t: float = MergeConfig.t, gamma: float = MergeConfig.gamma, window: int = MergeConfig.window,
              fit_tokens: int = DEFAULT_FIT_TOKENS, n_ctx: int = MergeConfig.calibration_ctx,
              scored: int = DEFAULT_SCORED, text: Optional[str] = None, domains=corpus.CAL_DOMAINS,
              retrieval: bool = True, layout: Optional[int] = None, kinds: str = "kv", type_k: str = "f16",
              type_v: str = "f16", rotations: Optional[dict] = None, start: Optional[list] = None,
              ranking: Optional[dict] = None,
              progress: bool = True, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Calibration:
    """Fit (or reuse) rotations, rank candidates by the proxy, select under the KLD budget with
    KLD measured only along the selection path (module docstring), on a cache of type_k/type_v.

    rotations: (kind, layer) -> R of every pair, reused instead of fitted. start: (kind, layer)
    list of an earlier selection, re-verified first. ranking: "k"/"v" -> per-pair proxy costs of
    an earlier calibration (Calibration.cost), reused instead of ranking again. text: a user's
    calibration text instead of the built-in domains. layout=S instead selects the paper's fixed layout (S, S+1), (S+2, S+3),
    ... for `kinds` (no budget; its KLD is still measured). The calibration's settings record its
    time in seconds and in prefill-equivalents (one prefill of n_ctx - scored tokens, timed here)."""
    if os.environ.get(FORBID_ENV):
        raise RuntimeError(f"a calibration was started while {FORBID_ENV} is set (the test suite sets it: a test "
                           "that calibrates must ask for it with the allow_calibration fixture)")
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
    info = ModelInfo.of(model_path)
    if sliding_window_refusal(info):
        raise ConfigError(f"calibrate: {sliding_window_refusal(info)}")
    sim = CacheSim(type_k, type_v, info.n_embd_k // info.n_head_kv, info.n_embd_v // info.n_head_kv)
    t0 = time.perf_counter()
    context = n_ctx - scored
    llm = _scoring_llama(model_path, max(fit_tokens, n_ctx), sim)
    try:
        share = -(-fit_tokens // len(texts))
        toks = {d: corpus.tokens_for(llm, x, share + n_ctx, f"{d} calibration") for d, x in texts.items()}
        fit = [tok for d in texts for tok in toks[d][:share]][:fit_tokens]
        clock = _Clock(_time_prefill(llm, fit), context, not sim.plain)
        cands = [] if layout is not None else [(k, a) for k in kinds for a in range(info.n_layer - 1)]
        reuse_rank = bool(cands) and ranking is not None and all(
            len(ranking.get(k, ())) > a and np.isfinite(ranking[k][a]) for k, a in cands)
        plan = clock.plan(fit_tokens=0 if rotations is not None else len(fit), n_texts=len(texts),
                          ranked=0 if reuse_rank else len(cands),
                          measures=1 if layout is not None else PLANNED_MEASURES["rescore" if start else "fresh"])
        log(f"calibrate: {info.name} ({info.arch}, {info.n_layer} layers) on a {_types_text(type_k, type_v)} KV cache; "
            + ("rotations reused" if rotations is not None else f"fitting {form} rotations on {len(fit)} tokens")
            + f"; scoring at context {n_ctx} ({scored} tokens per text of {', '.join(texts)}"
            f"{' and per retrieval probe' if retrieval else ''}, window {window}, gamma {gamma:g}); "
            f"about {_fmt_s(plan['seconds'])} on this machine ({plan['total']:.1f} prefills of {context} tokens, "
            "estimated from a timed 512-token prefill)")
        bar = _work_bar(plan["total"], progress)
        if rotations is None:
            rots = fit_all(_internals.capture_kv(llm, fit), form, info.n_head_kv)
            bar.add(plan["fit"])
        else:
            rots = rotations
        scorers = {}
        p0 = int(PROBE_DEPTH * context)
        t_capture = None
        for d in texts:
            held = toks[d][share:share + n_ctx]
            probes = {"copy": held[p0:p0 + scored]} if retrieval else None
            scorers[d] = KldScorer(llm, held[:context], held[context:], probes,
                                   stock=None if sim.plain else sim.stock)
            t_capture = t_capture or scorers[d].prefill_seconds
            bar.add(plan["capture"])
        spec = lambda c: PairSpec(c[0], c[1], form, rots[c])
        # the engine's ubatch size for a prompt (its merge steps decide which tokens stay exact)
        n_ubatch = merged_n_ubatch(window)
        n_measured = 0
        merged_rows = {d: {} for d in scorers}
        simulated = None if sim.plain else sim

        def measure(sel) -> dict:
            nonlocal n_measured
            n_measured += 1
            out = {}
            for d, sc in scorers.items():
                merged = simulate_merge(sc.state, [spec(c) for c in sel], t, gamma, window, sim=simulated,
                                        cache=merged_rows[d], n_ubatch=n_ubatch)
                for k, v in (sc.klds(merged) if simulated is None else sc.klds_added(merged)).items():
                    out[d if k == "next" else f"{d}:{k}"] = v
            bar.add(plan["measure"])
            return out

        proxy = {(k, a): float("nan") for k in "kv" for a in range(info.n_layer - 1)}
        if reuse_rank:
            proxy.update({c: float(ranking[c[0]][c[1]]) for c in cands})
        elif cands:
            proxy.update(_rank(llm, next(iter(scorers.values())), cands, spec, t, gamma, window, simulated,
                               lambda: bar.add(plan["rank"]), n_ubatch))
        per_sel = {}
        if layout is not None:
            if not (isinstance(layout, int) and 0 <= layout <= info.n_layer - 2):
                raise ValueError(f"layout={layout!r} is not valid for {info.n_layer} layers: expected 0..{info.n_layer - 2}")
            chosen = [(k, a) for a in range(layout, info.n_layer - 1, 2) for k in kinds]
            if chosen:
                per_sel = measure(chosen)
        else:
            chosen, per_sel = _select(cands, proxy, measure, max_kld, start or [])
        bar.close()
    finally:
        llm.close()
    chosen.sort(key=lambda c: (c[0], c[1]))
    seconds = time.perf_counter() - t0
    costs = {k: np.array([proxy[k, a] for a in range(info.n_layer - 1)]) for k in "kv"}
    cal = Calibration(model=info, form=form, pairs=[spec(c) for c in chosen], n_tokens=len(fit),
                      settings={"t": t, "gamma": gamma, "window": window, "max_kld": None if layout is not None else max_kld,
                                "layout": layout, "kinds": kinds, "n_ctx": n_ctx, "scored": scored, "corpus": source,
                                "texts": list(texts), "retrieval_probe": retrieval, "probe_depth": PROBE_DEPTH,
                                "type_k": type_k, "type_v": type_v, "selection_kld_by_text": per_sel,
                                "cost": "proxy: KLD of the pair alone on a short prefix (ranking)",
                                "ranking_reused": reuse_rank,
                                "measured_selections": n_measured, "rotations_reused": rotations is not None,
                                "rescored_from": [list(c) for c in start] if start else None,
                                "seconds": round(seconds, 1), "eta_seconds": round(plan["seconds"], 1),
                                "prefill_seconds": round(t_capture or 0.0, 2),
                                "prefill_equivalents": round(seconds / t_capture, 2) if t_capture else None},
                      cost=costs, selection_kld=max(per_sel.values()) if per_sel else 0.0, tool_version=__version__)
    cal.rotations = rots
    log(f"calibrate: {cal.describe()} [{seconds:.0f} s = {seconds / (t_capture or seconds):.1f} prefills of "
        f"{context} tokens (one took {t_capture or 0:.1f} s); {n_measured} selections measured]")
    return cal


def _rank(llm, sc: KldScorer, cands, spec, t, gamma, window, sim, tick, n_ubatch=None) -> dict:
    """The proxy: each candidate's KLD alone, on the first half of a captured context (its cells
    truncated: a causal prefix is the same state), scoring the RANK_TOKENS tokens after it."""
    n = len(sc.context) // 2
    cut = lambda st: kvstate.SeqState(st.seq_id, st.pos[:n], st.seq_ids[:n], st.v_trans, [x[:n] for x in st.k],
                                      [x[:n] for x in st.v])
    short = cut(sc.state)
    toks = sc.context[n:n + RANK_TOKENS]

    def score(state) -> np.ndarray:
        _internals.set_seq_state(llm, kvstate.serialize_seq_state(state))
        llm.n_tokens = n
        return _internals.eval_logits(llm, toks)

    # a simulated cache type: ranked against the unquantized model (the stock type's own error is the
    # same for every candidate, so this orders them by what they add to it)
    ref = score(short if sc.exact_state is None else cut(sc.exact_state))
    tick()
    out = {}
    for c in cands:
        out[c] = float(kld_per_token(ref, score(simulate_merge(short, [spec(c)], t, gamma, window, sim=sim,
                                                              n_ubatch=n_ubatch))).mean())
        tick()
    return out


def _select(cands, proxy, measure, max_kld, start) -> tuple:
    """The selection path of the module docstring: (chosen, its KLD per text)."""
    order = sorted(cands, key=lambda c: (c not in start, proxy[c], c))
    path = []
    for c in order:
        if not _overlaps(c, path):
            path.append(c)
    results = {0: {}}
    count = [0]
    within = lambda m: max(m.values()) <= max_kld if m else True

    def probe(k) -> bool:
        if k not in results:
            results[k] = measure(path[:k])
            count[0] += 1
        return within(results[k])

    lo, hi = 0, len(path) + 1
    first = len([c for c in path if c in start]) if start else None
    while hi - lo > 1 and count[0] < MAX_MEASURES:
        mid = first if first is not None and lo < first < hi else (lo + hi) // 2
        first = None
        if probe(mid):
            lo = mid
        else:
            hi = mid
    chosen, per = list(path[:lo]), results[lo]
    rejected = {path[hi - 1]} if hi <= len(path) else set()
    misses = 0
    for c in order:
        if count[0] >= MAX_MEASURES or misses >= MAX_MISSES:
            break
        if c in chosen or c in rejected or _overlaps(c, chosen):
            continue
        m = measure(chosen + [c])
        count[0] += 1
        if within(m):
            chosen.append(c)
            per, misses = m, 0
        else:
            misses += 1
    return chosen, per


class _WorkBar:
    """A progress bar in estimated seconds of work: tqdm's remaining time follows the real rate."""

    def __init__(self, total: float, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=round(total, 2), desc="calibrate", file=sys.stderr, leave=False, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed} elapsed, {remaining} left]")

    def add(self, work: float) -> None:
        if self.bar is not None:
            self.bar.update(min(round(work, 4), max(0.0, self.bar.total - self.bar.n)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _work_bar(total: float, enabled: bool) -> _WorkBar:
    return _WorkBar(total, enabled)


def estimate_seconds(model_path, *, n_ctx: int = MergeConfig.calibration_ctx, fresh: bool = True,
                     type_k: str = "f16", type_v: str = "f16", n_texts: int = len(corpus.CAL_DOMAINS),
                     scored: int = DEFAULT_SCORED) -> float:
    """The time a calibration of this model takes on this machine, from one timed 512-token prefill
    (the model is loaded for it: seconds for a small model)."""
    info = ModelInfo.of(model_path)
    if sliding_window_refusal(info):
        raise ConfigError(f"calibrate: {sliding_window_refusal(info)}")
    sim = CacheSim(type_k, type_v, info.n_embd_k // info.n_head_kv, info.n_embd_v // info.n_head_kv)
    llm = _scoring_llama(model_path, 1024, sim)
    try:
        toks = corpus.tokens_for(llm, corpus.calibration_text(corpus.CAL_DOMAINS[0]), 528, "timing")
        clock = _Clock(_time_prefill(llm, toks), n_ctx - scored, not sim.plain)
    finally:
        llm.close()
    return clock.plan(fit_tokens=DEFAULT_FIT_TOKENS if fresh else 0, n_texts=n_texts, ranked=0 if not fresh else
                      2 * (info.n_layer - 1), measures=PLANNED_MEASURES["fresh" if fresh else "rescore"])["seconds"]


def _rescore(model_path, info: ModelInfo, cfg: MergeConfig, type_k: str, type_v: str, progress: bool) -> Optional[Calibration]:
    """A calibration for cfg's settings and these cache types re-scored from the model's rotation
    set and an earlier selection (None when the model has no rotation set of this form)."""
    rots = find_rotations(info, cfg.alignment)
    if rots is None:
        return None
    base = find_base(info, cfg.alignment, type_k, type_v)
    start = [(q.kind, q.layer) for q in base.pairs] if base is not None else None
    what = "" if base is None else f" from {base.path.name} ({base.describe()})"
    print(f"minicache-gguf: no calibration of {info.name} for these settings (window {cfg.window}, gamma {cfg.gamma:g}, "
          f"t {cfg.t:g}, KLD budget {cfg.max_kld:g} at context {cfg.calibration_ctx}, {_types_text(type_k, type_v)} "
          f"cache): re-scoring{what} with the model's rotations; cached in {auto_path(info, cfg, type_k, type_v)}",
          file=sys.stderr)
    cal = calibrate(model_path, form=cfg.alignment, max_kld=cfg.max_kld, t=cfg.t, gamma=cfg.gamma, window=cfg.window,
                    n_ctx=cfg.calibration_ctx, type_k=type_k, type_v=type_v, rotations=rots, start=start,
                    ranking=base.cost if base is not None else None, progress=progress)
    cal.save(auto_path(info, cfg, type_k, type_v))
    return cal


def save_auto(cal: Calibration, cfg: MergeConfig):
    """Cache a calibration where calibration="auto" finds it (and the model's rotation set): its path."""
    tk, tv = cal.types()
    path = cal.save(auto_path(cal.model, cfg, tk, tv))
    save_rotation_set(cal)
    return path


def save_rotation_set(cal: Calibration) -> Optional[Path]:
    """Cache the rotations a calibration fitted on the built-in text as the model's rotation set,
    unless it has one (shipped or cached): the path written, or None."""
    rots = getattr(cal, "rotations", None)
    if rots is None or cal.settings.get("rotations_reused") or cal.settings.get("corpus") == "user text":
        return None
    if find_rotations(cal.model, cal.form) is not None:
        return None
    return save_rotations(cache_dir() / "calibration" / rotations_name(cal.model.sha256, cal.form), cal.model, cal.form,
                          rots, cal.n_tokens)


def missing_text(model_path, info: ModelInfo, type_k: str, type_v: str, n_ctx: int = MergeConfig.calibration_ctx) -> str:
    """What a model without a calibration needs, in one line: what calibrating costs here, and how."""
    if not (CacheSim.supports(type_k) and CacheSim.supports(type_v)):
        return (f"no calibration of {info.name} for KV cache type {_types_text(type_k, type_v)}, and calibrate scores "
                f"only {', '.join(CacheSim.TYPES)} caches")
    try:
        eta = f"about {_fmt_s(estimate_seconds(model_path, n_ctx=n_ctx, type_k=type_k, type_v=type_v))}"
    except Exception as e:  # the estimate is advice: its failure must not hide the message
        eta = f"an unknown time ({type(e).__name__}: {e})"
    return (f"no calibration of {info.name} for KV cache type {_types_text(type_k, type_v)} (none shipped, none cached); "
            f"calibrating takes {eta} on this machine (estimated from a timed 512-token prefill): run "
            f"`minicache-gguf calibrate -m {model_path}{_ctk_args(type_k, type_v)}` once (cached: kv_merge=True, "
            "--kv-merge, chat and serve then use it)")


def resolve(cfg: MergeConfig, model_path, type_k: str = "f16", type_v: str = "f16",
            progress: bool = True) -> Optional[Calibration]:
    """The calibration a MergeConfig merges with for a model and cache types (None: the paper's
    merge, asked for by name). "auto": shipped or cached for these settings and types; else
    re-scored from the model's rotation set; else CalibrationMissing (with the time it takes)."""
    if cfg.paper:
        return None
    info = ModelInfo.of(model_path)
    if cfg.calibration != "auto":
        return load_calibration(cfg.calibration, info)
    path = find_auto(info, cfg, type_k, type_v)
    if path is not None:
        try:
            return load_calibration(path, info)
        except CalibrationError as e:
            print(f"minicache-gguf: calibration {path} unusable ({e}); looking further", file=sys.stderr)
    if not (CacheSim.supports(type_k) and CacheSim.supports(type_v)):
        raise CalibrationMissing(
            f"kv_merge: {missing_text(model_path, info, type_k, type_v)}: use one of those, pass a calibration file "
            "made for another cache type (its budget then does not hold: CalibrationTypeWarning), or name the "
            "paper's uncalibrated merge: MergeConfig(calibration='paper') (--calibration paper)")
    cal = _rescore(model_path, info, cfg, type_k, type_v, progress)
    if cal is None:
        raise CalibrationMissing(f"kv_merge: {missing_text(model_path, info, type_k, type_v, cfg.calibration_ctx)}; or "
                                 "name the paper's uncalibrated merge: MergeConfig(calibration='paper') (--calibration paper)")
    return cal


def default_merge(model_path, cfg: MergeConfig, type_k: str = "f16", type_v: str = "f16") -> tuple:
    """Chat's and serve's default when merging is neither asked for nor refused: (cfg with the
    shipped or cached calibration of this model, cache types and settings, "") — merging on, its
    budget measured — or (False, the one line that says why it is off and what calibrating costs)."""
    info = ModelInfo.of(model_path)
    path = find_auto(info, cfg, type_k, type_v)
    if path is not None:
        return replace(cfg, calibration=str(path)), ""
    return False, "merging off: " + missing_text(model_path, info, type_k, type_v, cfg.calibration_ctx)


def pairs_for(cfg: MergeConfig, model_path, type_k: str = "f16", type_v: str = "f16",
              progress: bool = True) -> tuple[Optional[list[PairSpec]], Optional[Calibration]]:
    """The merged (pair, kind) list of a MergeConfig for a model and cache types (None: the
    paper's layout) and its calibration: the selection, filtered by merge_k / merge_v / start_layer."""
    cal = resolve(cfg, model_path, type_k, type_v, progress)
    return (None, None) if cal is None else (cal.selection(cfg), cal)


def paper_similarity(model_path, cfg: MergeConfig, tokens: int = 512) -> dict:
    """Mean cosine similarity of the raw cached rows of the pairs the paper's layout merges
    (what `minicache-gguf analyze` measures), on the built-in calibration text; cached per model."""
    info = ModelInfo.of(model_path)
    start = cfg.resolve_start(info.n_layer)
    path = cache_dir() / "analysis" / f"{info.sha256[:16]}-paper-s{start}-n{tokens}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    llm = _internals.plain_llama(model_path, n_ctx=tokens, n_batch=512, flash_attn=True, verbose=False)
    try:
        toks = corpus.tokens_for(llm, corpus.calibration_text(corpus.CAL_DOMAINS[0]), tokens, "analysis")
        st = _internals.capture_kv(llm, toks[:tokens])
    finally:
        llm.close()
    out = {}
    for kind, rows in (("k", st.k), ("v", st.v)):
        cs = [float(cosine(rows[a].astype(np.float32), rows[a + 1].astype(np.float32)).mean())
              for a in range(start, info.n_layer - 1, 2)]
        out[kind] = float(np.mean(cs)) if cs else float("nan")
    out["tokens"] = tokens
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def paper_warning(model_path, cfg: MergeConfig) -> Optional[str]:
    """The warning for the paper's merge on a model where the premise fails (None where it holds)."""
    sim = paper_similarity(model_path, cfg)
    kinds = [k for k in ("k", "v") if (cfg.merge_k if k == "k" else cfg.merge_v) and sim[k] < PAPER_MIN_COSINE]
    if not kinds:
        return None
    figs = ", ".join(f"{k.upper()} {sim[k]:+.2f}" for k in kinds)
    return (f"kv_merge: the paper's merge assumes adjacent layers' cached rows point the same way; on this model the "
            f"merged pairs' mean cosine similarity is {figs} (measured on {sim['tokens']} tokens; `minicache-gguf "
            "analyze` shows every pair): expect a large quality loss. calibration='auto' (the default) uses a "
            "calibrated selection instead")
