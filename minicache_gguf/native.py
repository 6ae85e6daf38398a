"""cffi binding of the MiniCache native core (native/minicache.h).

The functions are looked up in the patched libllama itself, where patch 0001 links the core:
Python and the engine run the very same object code. The core holds only what the engine runs on
the host, so this module exposes only that: :func:`restore` (norm * dir, * R^T for the rotated
layer, through strided f16/f32 views: the engine's llama_minicache_get_rows), :func:`retain_count`
(retention's ceil(gamma * n)) and the f16 conversions (:func:`fp32_to_fp16`, :func:`fp16_to_fp32`),
plus :func:`load` and :func:`version`. Each has the signature of its counterpart in
:mod:`minicache_gguf.reference`, so tests compare the two. The merge itself (SLERP, norms,
distances) runs as ggml graphs inside the engine; its NumPy reference is
:mod:`minicache_gguf.reference`, with no C copy here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from cffi import FFI

from . import _engine

__all__ = [
    "MinicacheError", "load", "version", "restore", "retain_count", "fp32_to_fp16", "fp16_to_fp32",
    "header_prototypes",
]

# mirror of native/minicache.h (C prototypes; tests check it against the header)
CDEF = """
enum minicache_status {
    MINICACHE_OK            =  0,
    MINICACHE_ERR_NULL      = -1,
    MINICACHE_ERR_SIZE      = -2,
    MINICACHE_ERR_TYPE      = -3,
    MINICACHE_ERR_PARAM     = -4,
    MINICACHE_ERR_NONFINITE = -5,
    MINICACHE_ERR_ALLOC     = -6,
};
enum minicache_type { MINICACHE_TYPE_F32 = 0, MINICACHE_TYPE_F16 = 1 };
struct minicache_view { void * data; int32_t type; int64_t nb0; int64_t nb1; };

const char * minicache_version(void);
const char * minicache_status_str(int32_t status);
uint16_t minicache_fp32_to_fp16(float f);
float    minicache_fp16_to_fp32(uint16_t h);
void     minicache_fp32_to_fp16_row(const float * x, uint16_t * y, int64_t n);
void     minicache_fp16_to_fp32_row(const uint16_t * x, float * y, int64_t n);
int32_t minicache_restore(const struct minicache_view * dir, const float * norm, int64_t n_rows,
                          int64_t n_embd, const float * rot, const struct minicache_view * out);
int64_t minicache_retain_count(int64_t n, float gamma);
"""

_ffi = FFI()
_ffi.cdef(CDEF)
_lib = None

_TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}


class MinicacheError(RuntimeError):
    """A native core call returned an error status."""

    def __init__(self, func: str, status: int):
        self.status = status
        msg = _ffi.string(_lib.minicache_status_str(status)).decode() if _lib is not None else "?"
        super().__init__(f"{func} failed with status {status}: {msg}")


def load(lib_path: str | Path | None = None):
    """dlopen the patched libllama (once) and return the cffi library object."""
    global _lib
    if _lib is None:
        path = Path(lib_path) if lib_path else _engine.active_lib_dir() / "libllama.so"
        lib = _ffi.dlopen(str(path))
        try:
            lib.minicache_version
        except AttributeError:
            raise _engine.EngineNotBuilt(
                f"{path} does not export the MiniCache native core: it is not the patched engine"
            ) from None
        _lib = lib
    return _lib


def version() -> str:
    return _ffi.string(load().minicache_version()).decode()


def _check(func: str, status: int) -> None:
    if status < 0:
        raise MinicacheError(func, status)


def _rows(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in _TYPES:
        raise TypeError(f"{name} must be float32 or float16, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D array [n_rows, n_embd >= 1], got shape {x.shape}")
    return x


def _view(x: np.ndarray):
    """minicache_view over a (possibly strided, e.g. transposed) 2-D array; keeps x alive."""
    v = _ffi.new("struct minicache_view *")
    v.data = _ffi.cast("void *", x.ctypes.data)
    v.type = _TYPES[x.dtype]
    v.nb0 = x.strides[1]
    v.nb1 = x.strides[0]
    return v


def _fptr(a: np.ndarray | None, ctype: str = "float *"):
    return _ffi.NULL if a is None else _ffi.cast(ctype, a.ctypes.data)


def _rot(rot, n: int):
    if rot is None:
        return None
    rot = np.ascontiguousarray(rot, dtype=np.float32)
    if rot.shape != (n, n):
        raise ValueError(f"rot must be a [{n}, {n}] matrix, got shape {rot.shape}")
    return rot


def restore(dir, norm, rot=None, out_dtype=np.float32) -> np.ndarray:
    e = _rows(dir, "dir")
    s = np.ascontiguousarray(norm, dtype=np.float32)
    if s.shape != (e.shape[0],):
        raise ValueError(f"norm must have shape ({e.shape[0]},), got {s.shape}")
    r = _rot(rot, e.shape[1])
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in _TYPES:
        raise TypeError(f"output dtype must be float32 or float16, got {out_dtype}")
    out = np.empty(e.shape, dtype=out_dtype)
    _check("minicache_restore", load().minicache_restore(
        _view(e), _fptr(s), e.shape[0], e.shape[1], _fptr(r), _view(out)))
    return out


def retain_count(n: int, gamma: float) -> int:
    return int(load().minicache_retain_count(int(n), float(gamma)))


def fp32_to_fp16(x) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(a.shape, dtype=np.float16)
    load().minicache_fp32_to_fp16_row(_fptr(a), _fptr(out, "uint16_t *"), a.size)
    return out


def fp16_to_fp32(x) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=np.float16)
    out = np.empty(a.shape, dtype=np.float32)
    load().minicache_fp16_to_fp32_row(_fptr(a, "uint16_t *"), _fptr(out), a.size)
    return out


def header_prototypes(header: str | Path) -> set[str]:
    """Names of the MINICACHE_API functions declared in a header (for the drift test)."""
    text = Path(header).read_text()
    return set(re.findall(r"MINICACHE_API\s+[\w\s\*]+?\b(minicache_\w+)\s*\(", text))
