"""Alignment math: per-pair orthogonal rotations and the merge they enable, in NumPy.

On small modern models adjacent layers hold nearly orthogonal K/V rows (`minicache-gguf analyze` measures it: mean cosine
similarity ≈ 0 on the default model), so the
paper's merge is very lossy there. For each adjacent pair (l, l+1) and kind (K, V) we fit the
orthogonal R that best maps unit rows of layer l onto unit rows of layer l+1 (orthogonal
Procrustes: R = U Vt from SVD(unit(X_l)^T unit(X_l+1))). The engine merges unit(x_l R) with
unit(x_l+1) and restores x_l as norm * dir * R^T. Forms: "full" (one n_embd x n_embd R) or
"head" (one R per KV head, block diagonal: folds into attention per head at no extra cost).
simulate_merge applies a merge to llama.cpp's real KV state (the engine reproduces it exactly).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import kvstate, reference
from .config import ALIGNMENT_FORMS, MERGE_BLOCK, PairSpec

FORMS = ALIGNMENT_FORMS

__all__ = ["FORMS", "fit_rotation", "fit_all", "full_matrix", "cosine", "simulate_merge", "merge_pair", "CacheSim", "hadamard"]


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _procrustes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Orthogonal R minimising ||a R - b|| (rows of a, b unit)."""
    u, _, vt = np.linalg.svd(a.T @ b)
    return u @ vt


def fit_rotation(x0: np.ndarray, x1: np.ndarray, form: str, n_head_kv: int) -> np.ndarray:
    """R for merging layer rows x0 [n, d] into x1 [n, d]: [d, d] ("full") or [n_head_kv, d/h, d/h] ("head")."""
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not valid: expected one of {FORMS}")
    u0, u1 = _unit(x0), _unit(x1)
    if form == "full":
        return _procrustes(u0, u1).astype(np.float32)
    dh = x0.shape[1] // n_head_kv
    out = []
    for h in range(n_head_kv):
        s = slice(h * dh, (h + 1) * dh)
        out.append(_procrustes(_unit(x0[:, s]), _unit(x1[:, s])))
    return np.stack(out).astype(np.float32)


def full_matrix(form: Optional[str], r: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The [d, d] matrix of a rotation (block diagonal for "head"), None for no rotation."""
    if form is None:
        return None
    if form == "full":
        return np.asarray(r, dtype=np.float32)
    h, dh, _ = r.shape
    out = np.zeros((h * dh, h * dh), dtype=np.float32)
    for i in range(h):
        out[i * dh:(i + 1) * dh, i * dh:(i + 1) * dh] = r[i]
    return out


def cosine(x0: np.ndarray, x1: np.ndarray, n_head_kv: int = 1) -> np.ndarray:
    """Cosine similarity per row (n_head_kv=1) or per (row, head): [n] or [n, n_head_kv]."""
    n, d = x0.shape
    a = _unit(x0.reshape(n, n_head_kv, d // n_head_kv))
    b = _unit(x1.reshape(n, n_head_kv, d // n_head_kv))
    c = (a * b).sum(-1)
    return c[:, 0] if n_head_kv == 1 else c


def hadamard(n: int) -> np.ndarray:
    """llama.cpp's orthonormal Walsh-Hadamard matrix of size n (Sylvester order, symmetric)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


class CacheSim:
    """The values a KV cache of given types holds, in NumPy, for scoring on a float32 cache:
    f16 rows round to f16; block-quantized rows (q8_0, q4_0) are quantized as llama.cpp stores
    them: in its Hadamard basis (attn_rot: K in blocks of the largest power of two >= 64 dividing
    the head width, V in blocks of 64, when the head width is a multiple of 64), with the CPU
    backend's rounding (reference.quantize). A merged direction is stored the same way."""

    #: the cache types it simulates
    TYPES = ("f16", "f32") + tuple(reference.QUANT_TYPES)

    @classmethod
    def supports(cls, type_name: str) -> bool:
        return type_name in cls.TYPES

    def __init__(self, type_k: str, type_v: str, head_k: int, head_v: int):
        self.types = {"k": type_k, "v": type_v}
        for kind, ty in self.types.items():
            if ty not in self.TYPES:
                raise ValueError(f"type_{kind}={ty!r}: calibrating for this cache type is not supported: expected "
                                 f"one of {', '.join(self.TYPES)}")
        blk_k = 64 if head_k % 64 == 0 else 0
        while blk_k and head_k % (2 * blk_k) == 0:
            blk_k *= 2
        self.block = {"k": blk_k if type_k in reference.QUANT_TYPES else 0,
                      "v": 64 if type_v in reference.QUANT_TYPES and head_v % 64 == 0 else 0}

    @property
    def plain(self) -> bool:
        """An f16 cache: scored as it is (no simulation)."""
        return self.types == {"k": "f16", "v": "f16"}

    def _basis(self, kind: str, x: np.ndarray) -> np.ndarray:
        b = self.block[kind]
        if not b:
            return x
        n, d = x.shape
        return (x.reshape(n, d // b, b) @ hadamard(b)).reshape(n, d)

    def stored(self, kind: str, x: np.ndarray) -> np.ndarray:
        """Rows [n, d] as the cache holds them, read back as float32."""
        ty = self.types[kind]
        x = np.asarray(x, dtype=np.float32)
        if ty == "f32":
            return x
        if ty == "f16":
            return x.astype(np.float16).astype(np.float32)
        y = self._basis(kind, x.astype(np.float64)).astype(np.float32)
        yq = reference.dequantize(reference.quantize(y, ty), ty, x.shape[1]).astype(np.float64)
        return self._basis(kind, yq).astype(np.float32)

    def stock(self, st: kvstate.SeqState) -> kvstate.SeqState:
        """A float32 copy of a captured state holding what the stock cache of these types holds."""
        out = st.replace_rows([self.stored("k", x) for x in st.k], [self.stored("v", x) for x in st.v])
        if st.next is not None:
            out.next = self.stock(st.next)
        return out


def n_merged(n_cells: int, window: int, n_ubatch: Optional[int]) -> int:
    """Tokens the engine has merged once a prompt of n_cells tokens and the next token are in, for a
    prompt evaluated in ubatches of n_ubatch (reference.merge_steps); None: every token beyond the
    window (one merge step)."""
    if n_ubatch is None:
        return max(0, n_cells - window)
    return sum(reference.merge_steps(n_cells, window, n_ubatch, MERGE_BLOCK))


def merge_pair(st: kvstate.SeqState, q: PairSpec, t: float, gamma: float, window: int, retention: str = "topk",
               sim: Optional[CacheSim] = None, n_ubatch: Optional[int] = None) -> tuple:
    """The rows of layers q.layer and q.layer + 1 (kind q.kind) that the merged engine restores for
    the cells older than the window: dir * norm (* R^T), the most distinct gamma fraction exact.
    sim: the cache types of a float32 state made by CacheSim.stock (the direction is stored as that
    type stores rows); None for a state of f16/f32 rows. n_ubatch: the state's tokens were
    evaluated in ubatches of this size, and the exact ones are those the engine's streaming
    retention keeps over those merge steps (reference.stream_retained); None: one merge step."""
    rows = st.k if q.kind == "k" else st.v
    a, b = q.layer, q.layer + 1
    n_m = n_merged(st.n_cells, window, n_ubatch)
    rot = full_matrix(q.form, q.r)
    x0, x1 = rows[a][:n_m], rows[b][:n_m]
    m = reference.merge(x0, x1, t, rot=rot, out_dtype=rows[a].dtype if sim is None else np.float32)
    d = m.dir if sim is None else sim.stored(q.kind, m.dir)
    if n_ubatch is None:
        keep = reference.retain_select(m.dist, gamma, retention)
    else:
        keep = reference.stream_retained(m.dist, reference.merge_steps(st.n_cells, window, n_ubatch, MERGE_BLOCK),
                                         gamma, mode=retention)
    r0 = reference.restore(d, m.norm0, rot=rot, out_dtype=rows[a].dtype)
    r1 = reference.restore(d, m.norm1, out_dtype=rows[b].dtype)
    r0[keep], r1[keep] = x0[keep], x1[keep]
    return r0, r1


def simulate_merge(st: kvstate.SeqState, pairs: list[PairSpec], t: float, gamma: float, window: int,
                   retention: str = "topk", sim: Optional[CacheSim] = None,
                   cache: Optional[dict] = None, n_ubatch: Optional[int] = None) -> kvstate.SeqState:
    """A copy of a stock KV state in which the cells older than the window of each listed
    (pair, kind) hold what the merged engine restores (merge_pair, n_ubatch as there). cache:
    (kind, layer) -> the pair's merged rows, filled and reused (a pair's rows do not depend on the
    other pairs)."""
    # the untouched layers are shared with st (calibration simulates many selections per run)
    out = st.replace_rows(st.k, st.v)
    n_m = n_merged(st.n_cells, window, n_ubatch)
    if n_m == 0:
        return out
    for q in pairs:
        rows = out.k if q.kind == "k" else out.v
        a, b = q.layer, q.layer + 1
        got = None if cache is None else cache.get((q.kind, q.layer))
        if got is None:
            got = merge_pair(st, q, t, gamma, window, retention, sim, n_ubatch)
            if cache is not None:
                cache[q.kind, q.layer] = got
        rows[a], rows[b] = rows[a].copy(), rows[b].copy()
        rows[a][:n_m], rows[b][:n_m] = got
    return out


def fit_all(st: kvstate.SeqState, form: str, n_head_kv: int) -> dict:
    """(kind, layer) -> R for every adjacent pair."""
    out = {}
    for kind, rows in (("k", st.k), ("v", st.v)):
        for a in range(len(rows) - 1):
            out[kind, a] = fit_rotation(rows[a], rows[a + 1], form, n_head_kv)
    return out
