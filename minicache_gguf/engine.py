"""cffi mirror of the MiniCache engine C API, include/llama-minicache.h (patches/llama.cpp/include/):
the declarations, the library handle, and the header's enum values. Nothing else: the Python
types and functions over it are in _internals.py.
"""

from __future__ import annotations

from cffi import FFI

from . import _engine

__all__ = ["CDEF", "CELL_STATES", "GGML_CDEF", "KINDS", "ROT_FORMS", "ffi", "ggml_ffi", "load", "load_ggml"]

# mirror of patches/llama.cpp/include/llama-minicache.h (tests/test_native.py compares them)
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
    int32_t type_k;
    int32_t type_v;
    int32_t attn_rot_k;
    int32_t attn_rot_v;
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
    int64_t host_rows;
    int64_t merge_graphs;
    int64_t merge_uploads;
    int64_t merge_syncs;
};

struct llama_minicache_params llama_minicache_default_params(void);
bool llama_minicache_set_pending(const struct llama_minicache_params * params);
bool llama_minicache_set_pending_file(const char * path, int32_t n_ubatch);
const char * llama_minicache_last_error(void);
bool llama_minicache_get_stats(const struct llama_context * ctx, struct llama_minicache_stats * out);
int32_t llama_minicache_get_pairs(const struct llama_context * ctx, struct llama_minicache_pair * out, int32_t n_max);
int32_t llama_minicache_get_rows(const struct llama_context * ctx, int32_t il, int32_t kind, int32_t c0, int32_t n, float * out);
int32_t llama_minicache_get_rotation(const struct llama_context * ctx, int32_t il, int32_t kind, float * out, int32_t n);
int32_t llama_minicache_get_cells(const struct llama_context * ctx, int32_t il, int32_t kind, int32_t c0, int32_t n,
                                  uint8_t * state, float * dist);
"""

CELL_STATES = ("empty", "staged", "merged", "retained")
KINDS = {"k": 0, "v": 1}
#: rotation forms: None (the paper's merge), "full" (one n_embd x n_embd R), "head" (one R per KV head)
ROT_FORMS = {None: 0, "full": 1, "head": 2}

ffi = FFI()
ffi.cdef(CDEF)
_lib = None


def load():
    """The patched libllama this process uses, with the MiniCache API."""
    global _lib
    if _lib is None:
        path = _engine.active_lib_dir() / "libllama.so"
        lib = ffi.dlopen(str(path))
        try:
            lib.llama_minicache_set_pending
        except AttributeError:
            raise _engine.EngineNotBuilt(f"{path} has no MiniCache engine API: rebuild with scripts/setup.sh") from None
        _lib = lib
    return _lib


# the few ggml backend-registry calls (libggml.so) that put llama.cpp's RPC devices in this process
GGML_CDEF = """
typedef struct ggml_backend_reg * ggml_backend_reg_t;
ggml_backend_reg_t ggml_backend_reg_by_name(const char * name);
void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name);
void ggml_backend_register(ggml_backend_reg_t reg);
size_t ggml_backend_dev_count(void);
"""

ggml_ffi = FFI()
ggml_ffi.cdef(GGML_CDEF)

_ggml = None


def load_ggml():
    """libggml.so of the engine this process uses (the one libllama loaded)."""
    global _ggml
    if _ggml is None:
        load()
        _ggml = ggml_ffi.dlopen(str(_engine.active_lib_dir() / "libggml.so"))
    return _ggml

