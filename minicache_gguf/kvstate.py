"""Read and write llama.cpp's per-sequence KV state blob (llama_state_seq_get_data / _set_data).

Used to capture real K/V rows of a stock (unmerged) cache and to write modified rows back — the
reference path that the merged engine is checked against. Covers what this project runs: one
stream, no per-cell extension data (no M-RoPE), f16/f32 K and V, V transposed or not, and the
two caches of an interleaved sliding-window model (Gemma 2/3: llama.cpp's iSWA cache writes the
full-attention layers' cache, then the sliding-window layers'). Anything else is refused with a
clear error rather than misread.

Layout (llama_context::state_seq_get_data + llama_kv_cache::state_write, llama.cpp 0c1e57098):
  u32 magic 0xaf143cd8; i32 seq_id; then per cache (one; two for iSWA):
  u32 n_stream; per stream: u32 cell_count; cell_count x (i32 pos, u32 n_seq_id, n_seq_id x i32 seq);
  u32 v_trans; u32 n_layer; n_layer x (i32 k_type, u64 k_row_bytes, cell_count rows);
  V, not transposed: n_layer x (i32 v_type, u64 v_row_bytes, cell_count rows)
  V, transposed:     n_layer x (i32 v_type, u32 el_bytes, u32 n_embd_v, n_embd_v x cell_count elements)
(a cache with no cell of the sequence writes no v_trans/n_layer/rows). A sliding-window cache writes
only the cells inside the window of the sequence's last position.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

SEQ_MAGIC = 0xAF143CD8
MINICACHE_STATE_TAG = 0x4D430000  # LLAMA_MINICACHE_STATE_TAG: high bits of n_layer in a merged state
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
_DTYPES = {GGML_TYPE_F32: np.dtype(np.float32), GGML_TYPE_F16: np.dtype(np.float16)}


class KvStateError(ValueError):
    """A blob this reader does not understand, or that is truncated."""


@dataclass
class SeqState:
    seq_id: int
    pos: np.ndarray                 # [cell_count] int32 positions
    seq_ids: list                   # per cell, the sequence ids
    v_trans: bool
    k: list = field(default_factory=list)  # per layer of this cache [cell_count, n_embd_k] (f16/f32)
    v: list = field(default_factory=list)  # per layer of this cache [cell_count, n_embd_v], un-transposed
    #: the model layer of each entry of k/v (None: entry i is layer i, a cache holding every layer)
    layers: Optional[list] = None
    #: the cache written after this one in the same blob (iSWA: the sliding-window layers' cache)
    next: Optional["SeqState"] = None

    @property
    def n_cells(self) -> int:
        return len(self.pos)

    def layer_ids(self) -> list:
        """The model layer of each entry of k/v."""
        return list(range(len(self.k))) if self.layers is None else list(self.layers)

    def replace_rows(self, k: list, v: list) -> "SeqState":
        """A copy of this cache's state with other K/V rows (same cells; the caches after it shared)."""
        return SeqState(self.seq_id, self.pos, self.seq_ids, self.v_trans, list(k), list(v), self.layers, self.next)

    def truncated(self, n: int) -> "SeqState":
        """This cache's first n cells (a causal prefix of a single-cache state is a valid state)."""
        if self.next is not None:
            raise KvStateError("a prefix of a state with a second cache (iSWA) is not a state: its sliding-window "
                               "cache holds the cells of the full context's window")
        return SeqState(self.seq_id, self.pos[:n], self.seq_ids[:n], self.v_trans, [x[:n] for x in self.k],
                        [x[:n] for x in self.v], self.layers)


class _Reader:
    def __init__(self, blob: bytes):
        self.b = memoryview(blob)
        self.o = 0

    def take(self, n: int) -> memoryview:
        if self.o + n > len(self.b):
            raise KvStateError(f"KV state blob truncated: needs {self.o + n} bytes, has {len(self.b)}")
        out = self.b[self.o:self.o + n]
        self.o += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def i32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]


def _dtype(t: int) -> np.dtype:
    if t not in _DTYPES:
        raise KvStateError(f"KV type {t} is not supported here (f32 = 0, f16 = 1)")
    return _DTYPES[t]


def _parse_cache(r: _Reader, seq_id: int) -> SeqState:
    n_stream = r.u32()
    if n_stream != 1:
        raise KvStateError(f"n_stream={n_stream}: only single-stream KV states are supported")
    n = r.u32()
    if 8 * n > len(r.b) - r.o:  # each cell takes at least 8 bytes (pos, n_seq_id)
        raise KvStateError(f"KV state blob truncated: {n} cells need at least {8 * n} more bytes, "
                           f"{len(r.b) - r.o} are left")
    pos = np.empty(n, dtype=np.int32)
    seq_ids = []
    for i in range(n):
        pos[i] = r.i32()
        n_seq = r.u32()
        if n_seq > 64:
            raise KvStateError(f"cell {i} claims {n_seq} sequences: not a KV state blob (or it carries cell extensions)")
        seq_ids.append([r.i32() for _ in range(n_seq)])
    st = SeqState(seq_id=seq_id, pos=pos, seq_ids=seq_ids, v_trans=False)
    if n == 0:
        return st
    v_trans = r.u32()
    if v_trans not in (0, 1):
        raise KvStateError(f"v_trans={v_trans}: not a KV state blob")
    st.v_trans = bool(v_trans)
    n_layer = r.u32()
    if n_layer >> 16 == MINICACHE_STATE_TAG >> 16:
        raise KvStateError("a MiniCache merged KV state: its merged layers are stored as directions and norms, "
                           "not rows this reader can return")
    for _ in range(n_layer):
        dt = _dtype(r.i32())
        row = r.u64()
        if row % dt.itemsize:
            raise KvStateError(f"K row of {row} bytes is not a whole number of {dt} elements")
        st.k.append(np.frombuffer(r.take(row * n), dtype=dt).reshape(n, row // dt.itemsize).copy())
    for _ in range(n_layer):
        dt = _dtype(r.i32())
        if st.v_trans:
            el = r.u32()
            if el != dt.itemsize:
                raise KvStateError(f"V element size {el} does not match {dt}")
            ne = r.u32()
            st.v.append(np.frombuffer(r.take(el * ne * n), dtype=dt).reshape(ne, n).T.copy())
        else:
            row = r.u64()
            if row % dt.itemsize:
                raise KvStateError(f"V row of {row} bytes is not a whole number of {dt} elements")
            st.v.append(np.frombuffer(r.take(row * n), dtype=dt).reshape(n, row // dt.itemsize).copy())
    return st


def parse_seq_state(blob: bytes, layer_groups: Optional[list] = None) -> SeqState:
    """The first cache's state; a second cache in the blob (iSWA) becomes its `next`.
    layer_groups: the model layers each cache holds, in the order they are written
    (ModelInfo.cache_layers()); the states' `layers` are set from it and their layer counts checked."""
    r = _Reader(blob)
    magic = r.u32()
    if magic != SEQ_MAGIC:
        raise KvStateError(f"not a llama.cpp sequence state (magic {magic:#x}, expected {SEQ_MAGIC:#x})")
    seq_id = r.i32()
    parts = [_parse_cache(r, seq_id)]
    if r.o != len(r.b) and layer_groups is not None and len(layer_groups) > 1:
        parts.append(_parse_cache(r, seq_id))
    if r.o != len(r.b):
        hint = "" if layer_groups is not None else \
            " (a model with sliding-window layers writes two caches: pass layer_groups=ModelInfo.cache_layers())"
        raise KvStateError(f"{len(r.b) - r.o} trailing bytes after the KV state{hint}")
    if layer_groups is not None:
        if len(parts) != len(layer_groups):
            raise KvStateError(f"the state holds {len(parts)} KV cache(s), the model {len(layer_groups)}")
        for part, layers in zip(parts, layer_groups):
            if part.n_cells and len(part.k) != len(layers):
                raise KvStateError(f"a KV cache of the state holds {len(part.k)} layers, the model's holds "
                                   f"{len(layers)} ({list(layers)})")
            part.layers = list(layers) if len(layer_groups) > 1 else None
    for a, b in zip(parts, parts[1:]):
        a.next = b
    return parts[0]


def _serialize_cache(st: SeqState, out: list) -> None:
    out.append(struct.pack("<II", 1, st.n_cells))
    for p, seqs in zip(st.pos, st.seq_ids):
        out.append(struct.pack("<iI", int(p), len(seqs)))
        out.extend(struct.pack("<i", s) for s in seqs)
    if st.n_cells == 0:
        return
    out.append(struct.pack("<II", int(st.v_trans), len(st.k)))
    type_of = {v: k for k, v in _DTYPES.items()}
    for k in st.k:
        out.append(struct.pack("<iQ", type_of[k.dtype], k.shape[1] * k.dtype.itemsize))
        out.append(np.ascontiguousarray(k).tobytes())
    for v in st.v:
        if st.v_trans:
            out.append(struct.pack("<iII", type_of[v.dtype], v.dtype.itemsize, v.shape[1]))
            out.append(np.ascontiguousarray(v.T).tobytes())
        else:
            out.append(struct.pack("<iQ", type_of[v.dtype], v.shape[1] * v.dtype.itemsize))
            out.append(np.ascontiguousarray(v).tobytes())


def serialize_seq_state(st: SeqState) -> bytes:
    out = [struct.pack("<Ii", SEQ_MAGIC, st.seq_id)]
    part = st
    while part is not None:
        _serialize_cache(part, out)
        part = part.next
    return b"".join(out)


def get_seq_state(llama_cpp, ctx, seq_id: int = 0) -> bytes:
    """The sequence's KV state blob from a llama_cpp context pointer."""
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    n = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id)
    if n == 0:
        raise KvStateError("llama_state_seq_get_data wrote nothing (see llama.cpp's log)")
    return ctypes.string_at(buf, n)  # (bytes(buf[:n]) would build a list of n ints first)


def set_seq_state(llama_cpp, ctx, blob: bytes, seq_id: int = 0) -> None:
    buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
    if llama_cpp.llama_state_seq_set_data(ctx, buf, len(blob), seq_id) == 0:
        raise KvStateError("llama_state_seq_set_data refused the blob (see llama.cpp's log)")
