"""NumPy reference of the MiniCache merge: the oracle of the engine's merge graphs.

The engine merges layer pairs with ggml graphs on the cache's backend
(patches/llama.cpp/src/llama-kv-cache-minicache-merge.cpp, build_merge); this module is the truth
they are tested against (tests/test_engine.py, tests/test_quantized.py), and the only other copy
of the merge math. :func:`restore` and :func:`retain_count` also have C counterparts in the native
core (native/minicache.h, linked into the patched libllama; :mod:`minicache_gguf.native`), which
tests compare with these. Rows are the last axis. Arithmetic is float64, rounded once to the
output dtype (float16 outputs go float64 -> float32 -> float16, as the C core does).

A merged layer pair (l-1, l) keeps, per token, ONE shared unit direction e (the SLERP of the two
layers' unit rows at t), the two rows' L2 norms and the angular distance W / pi in [0, 1] between
them. A row is restored as norm * e. An optional orthogonal matrix R aligns layer l-1 to layer l
before the merge (row-vector convention: e is built from unit(x0 @ R) and unit(x1); the first row
is restored as norm0 * e @ R.T). Retention keeps the most distinct tokens exact.

Defined results for degenerate input (per row pair), the contract the engine's merge graphs follow
(tests/test_engine.py::test_degenerate_rows_follow_the_reference_contract ties them):
- zero row(s): unit(0) = 0. One zero row: e = the other row's unit vector, distance 0 (the merge
  is lossless: the zero row restores as 0 * e). Both zero: e = 0, distance 0.
- identical or nearly identical directions (angle < ANGLE_EPS = 1e-6 rad): e = (1-t)*u0 + t*u1
  (lerp).
- opposite directions (pi - angle < 1e-6 rad): no single direction serves both rows; e = 0 (each
  row restores as 0: its error is its norm, where any unit direction costs one of the two rows
  up to twice its norm). Distance 1 (retention keeps such tokens exact first).
- a row holding NaN or Inf: its norm is the natural sqrt(sum x^2) (Inf or NaN), e = 0, distance
  1 (most distinct: retention keeps such tokens exact first). Restoring gives NaN/Inf, never a
  silently finite value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

ANGLE_EPS = 1e-6
RETENTION_MODES = ("topk", "threshold")

__all__ = [
    "ANGLE_EPS", "RETENTION_MODES", "MergeResult", "row_norms", "slerp", "merge", "restore",
    "angular_distance", "retain_count", "retain_select", "StreamingRetention", "merge_steps", "stream_retained", "fp32_to_fp16", "fp16_to_fp32",
    "QUANT_TYPES", "quantize", "dequantize",
]


@dataclass
class MergeResult:
    dir: np.ndarray    # [n_rows, n_embd] unit directions, in the requested dtype
    norm0: np.ndarray  # [n_rows] float32, norms of the (unrotated) first rows
    norm1: np.ndarray  # [n_rows] float32
    dist: np.ndarray   # [n_rows] float32 angular distance in [0, 1]


def _rows(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16):
        raise TypeError(f"rows must be float32 or float16, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"rows must be a 2-D array [n_rows, n_embd >= 1], got shape {x.shape}")
    return x.astype(np.float64)


def _check_t(t: float) -> float:
    t = float(t)
    if not (0.0 <= t <= 1.0):
        raise ValueError(f"t={t} is not valid: expected 0 <= t <= 1")
    return float(np.float32(t))


def _check_rot(rot, n: int):
    if rot is None:
        return None
    rot = np.asarray(rot, dtype=np.float32)
    if rot.shape != (n, n):
        raise ValueError(f"rot must be a [{n}, {n}] matrix, got shape {rot.shape}")
    if not np.all(np.isfinite(rot)):
        raise ValueError("rot contains NaN or Inf")
    return rot.astype(np.float64)


def _out(x64: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return x64.astype(np.float32)
    if dtype == np.float16:
        with np.errstate(over="ignore"):
            return x64.astype(np.float32).astype(np.float16)
    raise TypeError(f"output dtype must be float32 or float16, got {dtype}")


def _norm(x64: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sqrt(np.sum(x64 * x64, axis=-1))


def _unit(x64: np.ndarray, nrm: np.ndarray) -> np.ndarray:
    ok = (nrm > 0) & np.isfinite(nrm)
    safe = np.where(ok, nrm, 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(ok[:, None], x64 / safe[:, None], 0.0)


def _slerp_units(u0, n0, u1, n1, t: float):
    """Row-wise SLERP of unit rows (zero rows allowed); returns (e, dist) in float64."""
    n_rows, n = u0.shape
    e = np.zeros_like(u0)
    dist = np.zeros(n_rows)

    nonfinite = ~np.isfinite(n0) | ~np.isfinite(n1)
    zero = ~nonfinite & ((n0 == 0) | (n1 == 0))
    regular = ~nonfinite & ~zero

    dist[nonfinite] = 1.0
    e[zero] = np.where((n0[zero] == 0)[:, None], u1[zero], u0[zero])

    a, b = u0[regular], u1[regular]
    omega = 2.0 * np.arctan2(np.sqrt(np.sum((a - b) ** 2, axis=1)), np.sqrt(np.sum((a + b) ** 2, axis=1)))
    out = np.empty_like(a)

    small = omega < ANGLE_EPS
    anti = ~small & (np.pi - omega < ANGLE_EPS)
    gen = ~small & ~anti

    out[small] = (1.0 - t) * a[small] + t * b[small]

    out[anti] = 0.0  # opposite rows: no direction serves both (see the module docstring)

    og = omega[gen]
    so = np.sin(og)
    w0 = np.sin((1.0 - t) * og) / so
    w1 = np.sin(t * og) / so
    out[gen] = w0[:, None] * a[gen] + w1[:, None] * b[gen]

    e[regular] = out
    dist[regular] = omega / np.pi
    return e, dist


def row_norms(x) -> np.ndarray:
    return _norm(_rows(x)).astype(np.float32)


def slerp(u0, u1, t: float):
    """SLERP between the directions of two vectors; returns (out float32, dist float)."""
    a = np.asarray(u0, dtype=np.float32).astype(np.float64)[None, :]
    b = np.asarray(u1, dtype=np.float32).astype(np.float64)[None, :]
    if a.shape != b.shape or a.shape[1] < 1:
        raise ValueError(f"u0 and u1 must be 1-D of the same length >= 1, got {a.shape[1:]} and {b.shape[1:]}")
    t = _check_t(t)
    na, nb = _norm(a), _norm(b)
    e, d = _slerp_units(_unit(a, na), na, _unit(b, nb), nb, t)
    return e[0].astype(np.float32), float(np.float32(d[0]))


def _merge(x0, x1, t, rot):
    a, b = _rows(x0), _rows(x1)
    if a.shape != b.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {a.shape} and {b.shape}")
    t = _check_t(t)
    r = _check_rot(rot, a.shape[1])
    na, nb = _norm(a), _norm(b)
    if r is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            ar = a @ r
        ua = _unit(ar, np.where(np.isfinite(na), _norm(ar), na))
    else:
        ua = _unit(a, na)
    e, d = _slerp_units(ua, na, _unit(b, nb), nb, t)
    return e, na, nb, d


def merge(x0, x1, t: float, rot=None, out_dtype=np.float32) -> MergeResult:
    e, na, nb, d = _merge(x0, x1, t, rot)
    return MergeResult(_out(e, out_dtype), na.astype(np.float32), nb.astype(np.float32), d.astype(np.float32))


def angular_distance(x0, x1, rot=None) -> np.ndarray:
    return _merge(x0, x1, 0.5, rot)[3].astype(np.float32)


def restore(dir, norm, rot=None, out_dtype=np.float32) -> np.ndarray:
    e = _rows(dir)
    s = np.asarray(norm, dtype=np.float32).astype(np.float64)
    if s.shape != (e.shape[0],):
        raise ValueError(f"norm must have shape ({e.shape[0]},), got {s.shape}")
    r = _check_rot(rot, e.shape[1])
    y = e @ r.T if r is not None else e
    with np.errstate(invalid="ignore", over="ignore"):
        return _out(y * s[:, None], out_dtype)


def retain_count(n: int, gamma: float) -> int:
    g = float(np.float32(gamma))
    if n <= 0 or not g > 0:
        return 0
    return int(min(n, np.ceil(g * n - 1e-7 * n)))


def retain_select(dist, gamma: float, mode: str = "topk") -> np.ndarray:
    """Boolean mask of the pairs to keep exact (the most distinct ones)."""
    d = np.asarray(dist, dtype=np.float32)
    if d.ndim != 1:
        raise ValueError(f"dist must be 1-D, got shape {d.shape}")
    g = float(gamma)
    if not (0.0 <= g <= 1.0):
        raise ValueError(f"gamma={gamma} is not valid: expected 0 <= gamma <= 1")
    if mode not in RETENTION_MODES:
        raise ValueError(f"retention mode {mode!r} is not valid: expected one of {RETENTION_MODES}")
    if not np.all(np.isfinite(d)):
        raise ValueError("dist contains NaN or Inf")
    keep = np.zeros(d.shape, dtype=bool)
    if d.size == 0:
        return keep
    if mode == "threshold":
        g32 = float(np.float32(g))
        dmin, dmax = float(d.min()), float(d.max())
        return d.astype(np.float64) > dmin + (dmax - dmin) * (1.0 - g32)
    k = retain_count(d.size, g)
    order = np.lexsort((np.arange(d.size), -d.astype(np.float64)))  # dist desc, index asc
    keep[order[:k]] = True
    return keep


class StreamingRetention:
    """The engine's retention rule for one pool over a stream of merge steps (the engine's
    retain(); docs/architecture.md): after each step the candidates are the merged cells that own
    a slot (those retained so far and those merged in this step); k of them keep it, the most
    distinct first (distance descending, then the older token), and the others give it up for good.
    topk: k = min(retain_count(n_merged, gamma), capacity); threshold: the candidates above
    dmin + (dmax - dmin)(1 - gamma) over every merged cell, at most capacity."""

    def __init__(self, gamma: float, capacity: int, mode: str = "topk"):
        if mode not in RETENTION_MODES:
            raise ValueError(f"retention mode {mode!r} is not valid: expected one of {RETENTION_MODES}")
        self.gamma, self.capacity, self.mode = float(gamma), int(capacity), mode
        self.dist: dict = {}      # merged cell -> distance (float32)
        self.order: dict = {}     # merged cell -> stage order (older: smaller)
        self.retained: set = set()

    def merge(self, cells, dists, orders) -> set:
        """One merge step: cells merged now, their distances and stage orders; the retained set."""
        for c, d, o in zip(cells, dists, orders):
            self.dist[c], self.order[c] = np.float32(d), o
        cand = sorted(self.retained | set(cells), key=lambda c: (-float(self.dist[c]), self.order[c]))
        if self.mode == "topk":
            k = min(retain_count(len(self.dist), self.gamma), self.capacity)
        else:
            d = np.array(list(self.dist.values()), dtype=np.float32)
            g32 = float(np.float32(self.gamma))
            thr = float(d.min()) + (float(d.max()) - float(d.min())) * (1.0 - g32)
            k = min(sum(float(self.dist[c]) > thr for c in cand), self.capacity)
        self.retained = set(cand[:k])
        return self.retained

    def remove(self, cells) -> None:
        """Cells freed (seq_rm): they leave the merged set and give their slot back."""
        for c in cells:
            self.dist.pop(c, None)
            self.order.pop(c, None)
            self.retained.discard(c)


def merge_steps(n_cells: int, window: int, n_ubatch: int, block: int) -> list:
    """Sizes of the merge steps a prompt of n_cells tokens goes through in ubatches of n_ubatch, then
    the next token (the engine's prepare()): before a ubatch of n_new tokens, if the staged tokens and
    the new ones exceed window + block, the staged tokens beyond the window are merged, and more of
    the oldest if the ubatch needs the room (a staging pool of max(window + block, n_ubatch)); in
    token order. Decoding merges once per `block` tokens; sum(steps) tokens are merged in all."""
    if window < 1 or n_ubatch < 1 or block < 0:
        raise ValueError(f"window={window}, n_ubatch={n_ubatch}, block={block}: expected positive integers "
                         "(block >= 0)")
    n_stage, staged, steps = max(window + block, n_ubatch), 0, []
    sizes = [min(n_ubatch, n_cells - c0) for c0 in range(0, n_cells, n_ubatch)] + [1]
    for n_new in sizes:
        n_merge = max(0, staged - window, staged + n_new - n_stage) if staged + n_new > window + block else 0
        if n_merge:
            steps.append(n_merge)
        staged += n_new - n_merge
    return steps


def stream_retained(dist, steps, gamma: float, capacity: Optional[int] = None, mode: str = "topk") -> np.ndarray:
    """Boolean mask of the merged tokens (token order, distances dist) the engine keeps exact after
    merging them in steps of the given sizes (StreamingRetention)."""
    d = np.asarray(dist, dtype=np.float32)
    if sum(steps) != d.size:
        raise ValueError(f"merge steps {list(steps)} cover {sum(steps)} tokens, dist has {d.size}")
    rule = StreamingRetention(gamma, d.size if capacity is None else capacity, mode)
    c0 = 0
    for n in steps:
        cells = range(c0, c0 + n)
        rule.merge(cells, d[c0:c0 + n], cells)
        c0 += n
    keep = np.zeros(d.size, dtype=bool)
    keep[list(rule.retained)] = True
    return keep


def fp32_to_fp16(x) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16)


def fp16_to_fp32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# ggml block quantization of rows, as the engine rounds them (the CPU backend's from_float on an
# x86 AVX2 build, GGML_NATIVE=OFF): the oracle of the quantized merged cache
# ---------------------------------------------------------------------------------------------

#: types with a reference here: name -> (values per block, bytes per block)
QUANT_TYPES = {"q8_0": (32, 34), "q4_0": (32, 18)}


def _blocks(x, qtype: str) -> np.ndarray:
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype={qtype!r} is not valid: expected one of {tuple(QUANT_TYPES)}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QUANT_TYPES[qtype][0]:
        raise ValueError(f"rows must be [n_rows, n_embd] with n_embd a multiple of {QUANT_TYPES[qtype][0]}, got {x.shape}")
    return x.reshape(-1, QUANT_TYPES[qtype][0])


def quantize(x, qtype: str) -> np.ndarray:
    """Rows [n, n_embd] float32 -> [n, row bytes] uint8 in ggml's block layout.
    q8_0: d = amax/127, q = round-half-even(x * (127/amax)) (ggml-cpu's AVX2 quantize_row_q8_0);
    q4_0: d = max/-8 (max: the value of largest magnitude, first on ties), q = min(15, trunc(x/d + 8.5))
    (quantize_row_q4_0_ref). Scales are stored as f16 (round to nearest even)."""
    b = _blocks(x, qtype)
    n_rows = np.asarray(x).shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        if qtype == "q8_0":
            amax = np.abs(b).max(axis=1)
            d = (amax / np.float32(127)).astype(np.float32)
            inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
            q = np.rint(b * inv[:, None]).astype(np.int8)
            out = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), q.view(np.uint8)], axis=1)
        else:
            idx = np.abs(b).argmax(axis=1)
            mx = b[np.arange(len(b)), idx]
            d = (mx / np.float32(-8)).astype(np.float32)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            v = (b * inv[:, None]).astype(np.float32) + np.float32(8.5)
            q = np.minimum(15, np.trunc(v).astype(np.int8)).astype(np.uint8)
            packed = q[:, :16] | (q[:, 16:] << 4)
            out = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), packed], axis=1)
    return out.reshape(n_rows, -1)


def dequantize(q, qtype: str, n_embd: int) -> np.ndarray:
    """[n, row bytes] uint8 -> rows [n, n_embd] float32 (ggml's to_float: d * q exactly)."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype={qtype!r} is not valid: expected one of {tuple(QUANT_TYPES)}")
    blk, nbytes = QUANT_TYPES[qtype]
    q = np.ascontiguousarray(q, dtype=np.uint8)
    n_rows = q.shape[0]
    b = q.reshape(-1, nbytes)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    if qtype == "q8_0":
        vals = b[:, 2:].view(np.int8).astype(np.float32)
    else:
        lo = (b[:, 2:] & 0x0F).astype(np.int8) - 8
        hi = (b[:, 2:] >> 4).astype(np.int8) - 8
        vals = np.concatenate([lo, hi], axis=1).astype(np.float32)
    return (vals * d).reshape(n_rows, n_embd).astype(np.float32)
