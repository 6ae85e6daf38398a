"""cffi binding of the MiniCache engine C API (include/llama-minicache.h, patches 0002 and 0003).

Mirrors the header 1:1; `minicache_gguf.Llama` is the friendly layer on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cffi import FFI

from . import _engine
from .config import MergeConfig

__all__ = ["KvStats", "PairSpec", "CELL_STATES", "ROT_FORMS", "load", "params_from_config", "set_pending",
           "last_error", "get_stats", "get_pairs", "get_rows", "get_cells"]

# mirror of include/llama-minicache.h (patches/llama.cpp/0002-*.patch, 0003-*.patch)
CDEF = """
struct llama_context;

enum llama_minicache_retention {
    LLAMA_MINICACHE_RETAIN_TOPK      = 0,
    LLAMA_MINICACHE_RETAIN_THRESHOLD = 1,
};

enum llama_minicache_cell_state {
    LLAMA_MINICACHE_CELL_EMPTY    = 0,
    LLAMA_MINICACHE_CELL_STAGED   = 1,
    LLAMA_MINICACHE_CELL_MERGED   = 2,
    LLAMA_MINICACHE_CELL_RETAINED = 3,
};

enum llama_minicache_rot {
    LLAMA_MINICACHE_ROT_NONE = 0,
    LLAMA_MINICACHE_ROT_FULL = 1,
    LLAMA_MINICACHE_ROT_HEAD = 2,
};

struct llama_minicache_pair {
    int32_t       kind;
    int32_t       il;
    int32_t       rot;
    int32_t       n_r;
    const float * r;
};

struct llama_minicache_params {
    int32_t start_layer;
    float   t;
    float   gamma;
    int32_t window;
    int32_t n_ubatch;
    bool    merge_k;
    bool    merge_v;
    int32_t retention;
    int32_t n_pairs;
    const struct llama_minicache_pair * pairs;
};

struct llama_minicache_stats {
    int32_t n_layer;
    int32_t start_layer;
    int32_t n_pairs;
    int32_t merge_k;
    int32_t merge_v;
    int32_t n_pools;
    int64_t kv_size;
    int64_t n_slots;
    int64_t n_rows;
    int64_t n_stage;
    int64_t n_retain_max;
    int64_t kv_bytes;
    int64_t kv_bytes_dense;
    int64_t n_cells_used;
    int64_t n_staged;
    int64_t n_merged;
    int64_t n_retained;
    int32_t n_rot;
    int64_t rot_bytes;
};

struct llama_minicache_params llama_minicache_default_params(void);
bool llama_minicache_set_pending(const struct llama_minicache_params * params);
const char * llama_minicache_last_error(void);
bool llama_minicache_get_stats(const struct llama_context * ctx, struct llama_minicache_stats * out);
int32_t llama_minicache_get_pairs(const struct llama_context * ctx, struct llama_minicache_pair * out, int32_t n_max);
int32_t llama_minicache_get_rows(const struct llama_context * ctx, int32_t il, int32_t kind, int32_t c0, int32_t n, float * out);
int32_t llama_minicache_get_cells(const struct llama_context * ctx, int32_t il, int32_t kind, int32_t c0, int32_t n,
                                  uint8_t * state, float * dist);
"""

CELL_STATES = ("empty", "staged", "merged", "retained")
KINDS = {"k": 0, "v": 1}
#: rotation forms: None (the paper's merge), "full" (one n_embd x n_embd R), "head" (one R per KV head)
ROT_FORMS = {None: 0, "full": 1, "head": 2}


@dataclass(frozen=True)
class PairSpec:
    """One merged (layer pair, kind): layers `layer` and `layer + 1` of kind "k" or "v", with an
    optional orthogonal rotation of the lower layer (merged as x @ r, restored as ... @ r.T):
    form "full": r is [n_embd, n_embd]; form "head": r is [n_head_kv, n_embd_head, n_embd_head]."""

    kind: str
    layer: int
    form: str | None = None
    r: np.ndarray | None = None

_ffi = FFI()
_ffi.cdef(CDEF)
_lib = None


def load():
    global _lib
    if _lib is None:
        path = _engine.active_lib_dir() / "libllama.so"
        lib = _ffi.dlopen(str(path))
        try:
            lib.llama_minicache_set_pending
        except AttributeError:
            raise _engine.EngineNotBuilt(f"{path} has no MiniCache engine API: rebuild with scripts/setup.sh") from None
        _lib = lib
    return _lib


def _ctx(ctx_ptr: int):
    if not ctx_ptr:
        raise ValueError("the llama context is closed")
    return _ffi.cast("struct llama_context *", ctx_ptr)


class _Params:
    """The params struct plus the buffers its pointers refer to (alive until set_pending copied them)."""

    def __init__(self, p, keep):
        self.p = p
        self.keep = keep


def params_from_config(cfg: MergeConfig, n_ubatch: int, pairs: list[PairSpec] | None = None):
    """The engine params for cfg; `pairs` (explicit selection, e.g. from a calibration file)
    replaces the start_layer / merge_k / merge_v layout."""
    p = _ffi.new("struct llama_minicache_params *")
    p.start_layer = -1 if cfg.start_layer is None else cfg.start_layer
    p.t = cfg.t
    p.gamma = cfg.gamma
    p.window = cfg.window
    p.n_ubatch = n_ubatch
    p.merge_k = cfg.merge_k
    p.merge_v = cfg.merge_v
    p.retention = 0 if cfg.retention == "topk" else 1
    keep = []
    if pairs:
        arr = _ffi.new("struct llama_minicache_pair[]", len(pairs))
        keep.append(arr)
        for i, q in enumerate(pairs):
            arr[i].kind = KINDS[q.kind]
            arr[i].il = q.layer
            arr[i].rot = ROT_FORMS[q.form]
            if q.form is None:
                arr[i].n_r, arr[i].r = 0, _ffi.NULL
            else:
                r = np.ascontiguousarray(q.r, dtype=np.float32)
                keep.append(r)
                arr[i].n_r = r.size
                arr[i].r = _ffi.cast("const float *", r.ctypes.data)
        p.n_pairs = len(pairs)
        p.pairs = arr
    return _Params(p, keep)


def last_error() -> str:
    return _ffi.string(load().llama_minicache_last_error()).decode()


def set_pending(params) -> None:
    """Arm (params) or disarm (None) MiniCache for the next context created on this thread."""
    if not load().llama_minicache_set_pending(params.p if params is not None else _ffi.NULL):
        raise ValueError(f"kv_merge: {last_error()}")


@dataclass(frozen=True)
class KvStats:
    """What the KV cache allocated and holds, as measured by the engine."""

    kv_bytes: int             #: bytes of every KV buffer this cache allocated
    kv_bytes_dense: int       #: bytes a stock cache allocates for the same n_ctx, layers and types
    ratio: float              #: kv_bytes_dense / kv_bytes (compression; 1.0 with merging off)
    merged_layer_pairs: int
    start_layer: int          #: first merged layer (-1: merging off)
    merge_k: bool
    merge_v: bool
    n_ctx: int                #: cells
    tokens: int               #: occupied cells
    tokens_merged: int        #: cells stored as shared direction + norms
    tokens_staged: int        #: recent cells still exact, not merged yet
    tokens_retained: float    #: merged cells kept exact, averaged over the merged (pair, K/V) pools
    staging_capacity: int
    retention_capacity: int
    exact_slots_per_layer: int
    exact_rows_per_layer: int  #: rows allocated for the slots: + 1 zero row, padded to 256
    merged_pools: int = 0      #: merged (layer pair, kind) combinations
    aligned_pools: int = 0     #: of which with a calibrated rotation
    rotation_bytes: int = 0    #: bytes of the rotations (part of kv_bytes)

    @property
    def staging_fill(self) -> float:
        return self.tokens_staged / self.staging_capacity if self.staging_capacity else 0.0


def get_stats(ctx_ptr: int) -> KvStats | None:
    """Layout and fill of the context's KV cache (merged or not); None if its memory is not a KV
    cache (recurrent models)."""
    st = _ffi.new("struct llama_minicache_stats *")
    if not load().llama_minicache_get_stats(_ctx(ctx_ptr), st):
        return None
    return KvStats(
        kv_bytes=st.kv_bytes, kv_bytes_dense=st.kv_bytes_dense,
        ratio=st.kv_bytes_dense / st.kv_bytes if st.kv_bytes else 1.0,
        merged_layer_pairs=st.n_pairs, start_layer=st.start_layer,
        merge_k=bool(st.merge_k), merge_v=bool(st.merge_v), n_ctx=st.kv_size,
        tokens=st.n_cells_used, tokens_merged=st.n_merged, tokens_staged=st.n_staged,
        tokens_retained=st.n_retained / st.n_pools if st.n_pools else 0.0,
        staging_capacity=st.n_stage, retention_capacity=st.n_retain_max, exact_slots_per_layer=st.n_slots,
        exact_rows_per_layer=st.n_rows, merged_pools=st.n_pools, aligned_pools=st.n_rot,
        rotation_bytes=st.rot_bytes,
    )


def get_pairs(ctx_ptr: int) -> list[PairSpec]:
    """The merged (layer pair, kind) pools of the context's cache (rotations not included)."""
    lib = load()
    n = lib.llama_minicache_get_pairs(_ctx(ctx_ptr), _ffi.NULL, 0)
    if n <= 0:
        return []
    arr = _ffi.new("struct llama_minicache_pair[]", n)
    lib.llama_minicache_get_pairs(_ctx(ctx_ptr), arr, n)
    forms = {v: k for k, v in ROT_FORMS.items()}
    return [PairSpec("kv"[arr[i].kind], arr[i].il, forms[arr[i].rot]) for i in range(n)]


def get_rows(ctx_ptr: int, layer: int, kind: str, c0: int, n: int, n_embd: int) -> np.ndarray:
    """Restored K or V rows [n, n_embd] float32 of cells [c0, c0 + n) of a layer (merged or not)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not valid: expected 'k' or 'v'")
    for name, v in (("layer", layer), ("c0", c0), ("n", n), ("n_embd", n_embd)):
        if not (isinstance(v, (int, np.integer)) and 0 <= v < 2**31):
            raise ValueError(f"{name}={v!r} is not valid: expected an integer in [0, 2^31)")
    lib = load()
    # the engine writes n rows of the layer's real width: ask for it (n = 0 writes nothing) before allocating
    width = lib.llama_minicache_get_rows(_ctx(ctx_ptr), layer, KINDS[kind], c0, 0, _ffi.cast("float *", _ffi.new("float[1]")))
    if width < 0:
        raise ValueError(f"cannot read {kind.upper()} rows of layer {layer}, cells [{c0}, {c0 + n}): no such layer, "
                         "cells out of range, or a quantized layer")
    if width != n_embd:
        raise ValueError(f"layer {layer} {kind.upper()} rows are {width} wide, not {n_embd}")
    out = np.empty((n, width), dtype=np.float32)
    got = lib.llama_minicache_get_rows(_ctx(ctx_ptr), layer, KINDS[kind], c0, n, _ffi.cast("float *", out.ctypes.data))
    if got != width:
        raise ValueError(f"cannot read {kind.upper()} rows of layer {layer}, cells [{c0}, {c0 + n})")
    return out


def get_cells(ctx_ptr: int, layer: int, kind: str, c0: int, n: int):
    """(state uint8 [n], dist float32 [n]) of cells in the pool holding a merged layer/kind."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not valid: expected 'k' or 'v'")
    for name, v in (("layer", layer), ("c0", c0), ("n", n)):
        if not (isinstance(v, (int, np.integer)) and 0 <= v < 2**31):
            raise ValueError(f"{name}={v!r} is not valid: expected an integer in [0, 2^31)")
    stats = get_stats(ctx_ptr)
    if stats is None or c0 + n > stats.n_ctx:
        raise ValueError(f"cells [{c0}, {c0 + n}) are out of range (the cache has {stats.n_ctx if stats else 0} cells)")
    state = np.zeros(n, dtype=np.uint8)
    dist = np.zeros(n, dtype=np.float32)
    rc = load().llama_minicache_get_cells(_ctx(ctx_ptr), layer, KINDS[kind], c0, n,
                                          _ffi.cast("uint8_t *", state.ctypes.data), _ffi.cast("float *", dist.ctypes.data))
    if rc < 0:
        raise ValueError(f"layer {layer} {kind.upper()} is not merged in this context (or cells out of range)")
    return state, dist
