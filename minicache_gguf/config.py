"""MergeConfig: every knob of MiniCache cross-layer KV merging, named, typed, validated — the one
source of their defaults (the CLI flags and the server fields are derived from its fields) — and
the other plain values the layers above share: PairSpec, the KV modes of bench and eval, ggml's
KV cache type names."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .reference import RETENTION_MODES

__all__ = ["MergeConfig", "ConfigError", "CalibrationError", "PairSpec", "KvMode", "kv_modes", "GGML_TYPES",
           "QUANTIZED_TYPES", "TYPE_BLOCKS", "CALIBRATION_NAMES", "row_bytes", "cache_type", "type_name", "ALIGNMENT_FORMS", "DEFAULT_MAX_KLD", "DEFAULT_SCORED"]

#: rotation forms of aligned merging: one R per KV head (folds into attention at no extra cost),
#: or one R over whole rows (a bit better, 3x the merged layer's attention work when decoding)
ALIGNMENT_FORMS = ("head", "full")
#: the quality budget of calibration="auto" (mean KLD, nats/token, on held-out calibration text of
#: every calibration domain and on a retrieval probe, at MergeConfig.calibration_ctx tokens)
DEFAULT_MAX_KLD = 0.02
#: tokens calibration scores per held-out text and per retrieval probe
DEFAULT_SCORED = 128
#: the named values of MergeConfig.calibration (anything else is a calibration file)
CALIBRATION_NAMES = ("auto", "paper")


class ConfigError(ValueError):
    """An invalid MergeConfig value; the message names the field and what is valid."""


class CalibrationError(ValueError):
    """A calibration file that cannot be used: damaged, forged, or made for another model."""


#: ggml's KV cache types by name (llama.cpp's -ctk/-ctv names), as in ggml.h
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
#: (values per block, bytes per block) of each, as ggml lays them out
TYPE_BLOCKS = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q5_0": (32, 22), "q5_1": (32, 24),
               "q4_0": (32, 18), "q4_1": (32, 20), "iq4_nl": (32, 18)}


def row_bytes(type_name: str, n: int) -> int:
    """Bytes of a row of n values of a KV cache type (ggml_row_size)."""
    blck, size = TYPE_BLOCKS[type_name]
    return n // blck * size


#: the block-quantized ones (a quantized V cache needs flash attention)
QUANTIZED_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl")


def type_name(number):
    """The name of a ggml KV cache type number (None for a number outside GGML_TYPES)."""
    return _TYPE_NAMES.get(number)


_TYPE_NAMES = {v: k for k, v in GGML_TYPES.items()}


def cache_type(value, what: str = "cache type") -> str:
    """A KV cache type given as llama.cpp's tools take it (a name such as q8_0, or a ggml type
    number) -> its name; anything else is a ConfigError naming the valid ones."""
    if isinstance(value, str) and value.strip().lower() in GGML_TYPES:
        return value.strip().lower()
    num = int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None
    if isinstance(value, str) and value.strip().isdigit():
        num = int(value.strip())
    for name, n in GGML_TYPES.items():
        if num is not None and num == n:
            return name
    raise ConfigError(f"{what}={value!r} is not valid: expected one of "
                      + ", ".join(f"{n} ({i})" for n, i in GGML_TYPES.items()))


@dataclass(frozen=True)
class PairSpec:
    """One merged (layer pair, kind): layers `layer` and `layer + 1` of kind "k" or "v", with an
    optional orthogonal rotation of the lower layer (merged as x @ r, restored as ... @ r.T):
    form "full": r is [n_embd, n_embd]; form "head": r is [n_head_kv, n_embd_head, n_embd_head]."""

    kind: str
    layer: int
    form: Optional[str] = None
    r: Optional[np.ndarray] = None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class MergeConfig:
    """How the KV cache merges adjacent layer pairs.

    With a calibration (the default "auto": the one shipped or cached for the model and its KV
    cache type; or a file from `minicache-gguf calibrate`), the merged (pair, K/V) list and each
    pair's rotation come from it; merge_k / merge_v / start_layer then only filter that list. With
    calibration="paper" (the paper's uncalibrated merge, asked for by name), layers S, S+1, ... are
    merged in pairs (S, S+1), (S+2, S+3), ...; an unpaired last layer and the layers below S stay
    ordinary. Per merged pair and per token the
    cache keeps one shared direction (SLERP of the two unit rows) plus each layer's norm; the
    `window` most recent tokens and the `gamma` most distinct merged pairs are kept exact.
    """

    #: first merged layer S; None = floor(n_layer / 2) (the paper's default)
    start_layer: Optional[int] = field(default=None, metadata={"help": "first merged layer (default: n_layer / 2)"})
    #: SLERP parameter in [0, 1]: 0 = the lower layer's direction, 1 = the upper layer's
    t: float = field(default=0.6, metadata={"help": "SLERP parameter in [0, 1]"})
    #: fraction of merged token pairs kept exact (retention), in [0, 1]
    gamma: float = field(default=0.05, metadata={"help": "retention fraction in [0, 1]"})
    #: most recent tokens kept exact before they are merged (staging), >= 1
    window: int = field(default=256, metadata={"help": "recent tokens kept exact"})
    #: merge the K cache of each pair
    merge_k: bool = field(default=True, metadata={"help": "merge the K cache"})
    #: merge the V cache of each pair
    merge_v: bool = field(default=True, metadata={"help": "merge the V cache"})
    #: "auto" (the shipped or cached calibration of the model for its KV cache type, re-scored
    #: from one made for other settings where needed; refused with the time a calibration takes when
    #: the model has none), a calibration file path, or "paper" (the paper's uncalibrated merge)
    calibration: Union[str, Path] = field(
        default="auto", metadata={"help": "'auto' (the shipped or cached calibration of the model and cache type), "
                                          "a calibration file, or 'paper' (the paper's uncalibrated merge)"})
    #: retention rule: "topk" (bounded, default) or "threshold" (the paper's Eq. 4)
    retention: str = field(default="topk", metadata={"help": "retention rule: topk or threshold"})
    #: calibration="auto" only: rotation form ("head" or "full") and quality budget (KLD)
    alignment: str = field(default="head", metadata={"help": "rotation form of calibration='auto': head or full"})
    max_kld: float = field(default=DEFAULT_MAX_KLD, metadata={"help": "KLD budget (nats/token) of calibration='auto'"})
    #: calibration="auto" only: the context length (tokens) the KLD budget is scored at
    calibration_ctx: int = field(default=4096, metadata={"help": "context length the KLD budget of calibration='auto' is scored at"})

    def __post_init__(self):
        if self.start_layer is not None and not (_is_int(self.start_layer) and self.start_layer >= 0):
            raise ConfigError(f"start_layer={self.start_layer!r} is not valid: expected None or an integer >= 0")
        for name in ("t", "gamma"):
            v = getattr(self, name)
            if not (_is_real(v) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ConfigError(f"{name}={v!r} is not valid: expected a number in [0, 1]")
            object.__setattr__(self, name, float(v))
        if not (_is_int(self.window) and self.window >= 1):
            raise ConfigError(f"window={self.window!r} is not valid: expected an integer >= 1")
        for name in ("merge_k", "merge_v"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not valid: expected True or False")
        if not (self.merge_k or self.merge_v):
            raise ConfigError("merge_k=False and merge_v=False merges nothing: enable at least one")
        if self.retention not in RETENTION_MODES:
            raise ConfigError(f"retention={self.retention!r} is not valid: expected one of {RETENTION_MODES}")
        if self.alignment not in ALIGNMENT_FORMS:
            raise ConfigError(f"alignment={self.alignment!r} is not valid: expected one of {ALIGNMENT_FORMS}")
        if not (_is_real(self.max_kld) and math.isfinite(self.max_kld) and self.max_kld > 0):
            raise ConfigError(f"max_kld={self.max_kld!r} is not valid: expected a positive number (nats/token)")
        object.__setattr__(self, "max_kld", float(self.max_kld))
        if not (_is_int(self.calibration_ctx) and self.calibration_ctx >= 256):
            raise ConfigError(f"calibration_ctx={self.calibration_ctx!r} is not valid: expected an integer >= 256 (tokens)")
        cal = self.calibration
        if cal not in CALIBRATION_NAMES:
            if not isinstance(cal, (str, Path)) or not str(cal):
                raise ConfigError(f"calibration={cal!r} is not valid: expected 'auto', 'paper' (the paper's uncalibrated "
                                  "merge) or a calibration file path")
            if not Path(cal).is_file():
                raise ConfigError(f"calibration={str(cal)!r} is not valid: no such file (expected 'auto', 'paper' or an "
                                  "existing calibration file)")

    @property
    def paper(self) -> bool:
        """The paper's uncalibrated merge (calibration="paper"): fixed pairs from start_layer."""
        return self.calibration == "paper"

    def resolve_start(self, n_layer: int) -> int:
        """The first merged layer for a model with n_layer layers (validated)."""
        if n_layer < 2:
            raise ConfigError(f"a model with {n_layer} layer(s) has no adjacent layer pair to merge")
        s = n_layer // 2 if self.start_layer is None else self.start_layer
        if s > n_layer - 2:
            raise ConfigError(
                f"start_layer={s} is not valid for this model ({n_layer} layers): "
                f"expected 0 <= start_layer <= {n_layer - 2} so that at least one pair fits")
        return s

    def pairs(self, n_layer: int) -> list[tuple[int, int]]:
        """Merged layer pairs (l, l+1) for a model with n_layer layers."""
        s = self.resolve_start(n_layer)
        return [(l, l + 1) for l in range(s, n_layer - 1, 2)]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(d["calibration"], Path):
            d["calibration"] = str(d["calibration"])
        return d


# ---------------------------------------------------------------------------------------------
# KV modes: one table for bench and eval
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KvMode:
    """A KV cache configuration to measure: a ggml type for K and for V, and merging (or not)."""

    name: str
    type_k: str = "f16"
    type_v: str = "f16"
    merge: Optional[MergeConfig] = None
    what: str = ""

    def llama_kwargs(self) -> dict:
        return dict(type_k=GGML_TYPES[self.type_k], type_v=GGML_TYPES[self.type_v], kv_merge=self.merge or False)


#: llama-cpp-python's ubatch size, and the smallest one a merged context picks by itself
STOCK_N_UBATCH = 512
MIN_MERGED_N_UBATCH = 256


#: the default n_gpu_layers of every Llama this package creates (stock: 0), e.g. -1 on a GPU machine:
#: the tools and the test suite then offload everything (scripts/gpu_check.sh sets it)
N_GPU_LAYERS_ENV = "MINICACHE_GGUF_N_GPU_LAYERS"


def default_n_gpu_layers() -> Optional[int]:
    """MINICACHE_GGUF_N_GPU_LAYERS as an int (-1: all layers), None when unset."""
    raw = os.environ.get(N_GPU_LAYERS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -2
    if n < -1:
        raise ConfigError(f"{N_GPU_LAYERS_ENV}={raw!r} is not valid: expected a layer count >= 0, or -1 for all layers")
    return n


#: tokens a sequence stages beyond its window before the engine merges (LLAMA_MINICACHE_MERGE_BLOCK):
#: it merges when it would stage more than window + MERGE_BLOCK tokens, then every token beyond the
#: window at once, so decoding merges once per MERGE_BLOCK tokens (reference.merge_steps)
MERGE_BLOCK = 32


def merged_n_ubatch(window: int) -> int:
    """The ubatch size of a merged context when the caller gives none. The staging pool holds
    max(window + MERGE_BLOCK, n_ubatch) exact rows, so prompts go in ubatches of the window (at least
    MIN_MERGED_N_UBATCH tokens for prefill speed, at most llama-cpp-python's STOCK_N_UBATCH): the
    pool then costs no more than the window and one merge block do."""
    return min(STOCK_N_UBATCH, max(window, MIN_MERGED_N_UBATCH))


STOCK_TYPES = ("f16", "q8_0", "q5_0", "q4_0")
#: the modes `minicache-gguf bench` runs unless told otherwise
BENCH_MODES = ("f16", "q8_0", f"paper-w{MergeConfig.window}", f"aligned-head-w{MergeConfig.window}")
#: the context lengths it measures unless told otherwise
BENCH_CTX = (1024, 4096, 8192, 16384)


def _split_types(spec: str):
    """"q8_0" -> (q8_0, q8_0); "q8_0/q4_0" -> K q8_0, V q4_0; None if spec names no cache type."""
    parts = spec.split("/")
    if len(parts) in (1, 2) and all(p in GGML_TYPES for p in parts):
        return parts[0], parts[-1]
    return None


def kv_modes(window: int = MergeConfig.window, cal_files: Optional[dict] = None, names=None,
             t: float = MergeConfig.t, gamma: float = MergeConfig.gamma, type_k=None, type_v=None) -> list:
    """The KV modes of bench and eval: the stock types, and each merge (the paper's, V only, and
    aligned per calibration form in cal_files) with the window on ("-w<window>") and off ("-w0").
    names: keep those (f16, the reference, always first); besides the listed names, a cache type
    ("q5_1", or K/V types "q8_0/q4_0") and a merge on a cache type ("q4_0+aligned-head-w256") are
    valid; an unknown name is a ValueError. type_k/type_v: the cache types of the merges that name
    none (default f16)."""
    tk, tv = type_k or "f16", type_v or "f16"
    on_types = "" if (tk, tv) == ("f16", "f16") else f", on K {tk} / V {tv} KV"
    modes = [KvMode(ty, ty, ty, None, "stock llama.cpp KV" + (" (full cache, the reference)" if ty == "f16" else ""))
             for ty in STOCK_TYPES]
    merges = []
    for w, tag in ((window, f"w{window}"), (1, "w0")):
        on = "recent window exact" if w > 1 else "no window"
        mk = lambda **kw: MergeConfig(window=w, t=t, gamma=gamma, **kw)
        merges.append(KvMode(f"paper-{tag}", tk, tv, mk(calibration="paper"), f"paper-faithful SLERP, S=L/2, K+V, {on}{on_types}"))
        merges.append(KvMode(f"paper-v-{tag}", tk, tv, mk(calibration="paper", merge_k=False), f"paper-faithful, V only, {on}{on_types}"))
        for form in ALIGNMENT_FORMS:
            if form in (cal_files or {}):
                how = "per-head" if form == "head" else "whole-row"
                merges.append(KvMode(f"aligned-{form}-{tag}", tk, tv, mk(calibration=cal_files[form]),
                                     f"calibrated {how} alignment, {on}{on_types}"))
                merges.append(KvMode(f"aligned-{form}-v-{tag}", tk, tv, mk(calibration=cal_files[form], merge_k=False),
                                     f"calibrated {how} alignment, V only, {on}{on_types}"))
    modes += [m for m in merges if "-v-" not in m.name or m.name.startswith("paper")]
    if names:
        by_name = {m.name: m for m in modes + merges}
        out, bad = [], []
        for n in names:
            if n in by_name:
                out.append(by_name[n])
                continue
            types, _, merge = n.partition("+")
            tk_tv = _split_types(types)
            if tk_tv and not merge:
                out.append(KvMode(n, tk_tv[0], tk_tv[1], None, "stock llama.cpp KV, K " + tk_tv[0] + " / V " + tk_tv[1]))
            elif tk_tv and merge in by_name and by_name[merge].merge is not None:
                m = by_name[merge]
                out.append(KvMode(n, tk_tv[0], tk_tv[1], m.merge, f"{m.what}, stacked on {types} KV"))
            else:
                bad.append(n)
        if bad:
            raise ValueError(f"mode(s) {', '.join(map(repr, bad))} not valid: expected some of "
                             f"{', '.join(by_name)}, a cache type (q5_1, or K/V types as q8_0/q4_0) or a type and "
                             "a merge joined by '+' (q4_0+aligned-head-w256)")
        modes = [modes[0]] + [m for m in out if m.name != "f16"]
    return modes
