// MiniCache native core: the host-side pieces of the merged KV cache that the engine runs, on rows
// of float32/float16, with no ggml or llama.cpp types. Patch 0001 links it into the patched
// libllama; the Python binding (minicache_gguf/native.py) calls the same object code.
//
// A merged layer pair (l-1, l) keeps, per token, ONE shared unit direction e, the two rows' L2
// norms and their angular distance; an aligned pair also has an orthogonal matrix R that rotated
// layer l-1 before the merge (row-vector convention: x0 * R). What the core holds:
// - minicache_restore: a row restored as norm * e, or norm * e * R^T for the rotated layer, from
//   strided f16/f32 views (the engine's llama_minicache_get_rows, on the host);
// - minicache_retain_count: how many merged tokens retention keeps exact (ceil(gamma * n));
// - binary16 <-> binary32 conversion, bit-exact with ggml's.
// The merge itself (norms, units, angle, SLERP, distances) does not run here: it runs as ggml graphs
// on the cache's backend (patches/llama.cpp/src/llama-kv-cache-minicache-merge.cpp), and its
// NumPy reference, with the contract for degenerate rows, is minicache_gguf/reference.py.
//
// Conventions
// - All arithmetic is done in double and rounded once to the output type (f16 outputs: double ->
//   f32 -> f16, both round-to-nearest-even, the same as ggml).
// - Functions return MINICACHE_OK (0) or a negative enum minicache_status; nothing is written to
//   the outputs when an argument is invalid.
// - Rows are read and written through strided views (ggml-style byte strides), so a transposed
//   V cache (element stride = kv_size * type size) needs no copy.
// - NaN/Inf propagate: a NaN or Inf norm restores as a NaN/Inf row, never a silently finite one.
#ifndef MINICACHE_H
#define MINICACHE_H

#include <stdint.h>

#if defined(_WIN32) && defined(MINICACHE_BUILD)
#    define MINICACHE_API __declspec(dllexport)
#elif defined(__GNUC__)
#    define MINICACHE_API __attribute__((visibility("default")))
#else
#    define MINICACHE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define MINICACHE_VERSION_MAJOR 0
#define MINICACHE_VERSION_MINOR 2
#define MINICACHE_VERSION_PATCH 0

enum minicache_status {
    MINICACHE_OK            =  0,
    MINICACHE_ERR_NULL      = -1, // a required pointer is NULL
    MINICACHE_ERR_SIZE      = -2, // a row count or width is out of range
    MINICACHE_ERR_TYPE      = -3, // unknown enum minicache_type
    MINICACHE_ERR_PARAM     = -4, // a parameter out of range (no function returns it now; the value stays)
    MINICACHE_ERR_NONFINITE = -5, // NaN/Inf where only finite values are valid (the rotation)
    MINICACHE_ERR_ALLOC     = -6, // out of memory for scratch space
};

enum minicache_type {
    MINICACHE_TYPE_F32 = 0,
    MINICACHE_TYPE_F16 = 1, // IEEE 754 binary16, as ggml's GGML_TYPE_F16
};

// Strided view of rows: element j of row i is at (char *) data + i * nb1 + j * nb0.
struct minicache_view {
    void *  data;
    int32_t type;  // enum minicache_type
    int64_t nb0;   // bytes between consecutive elements of a row
    int64_t nb1;   // bytes between consecutive rows
};

MINICACHE_API const char * minicache_version(void);
MINICACHE_API const char * minicache_status_str(int32_t status);

// IEEE binary16 <-> binary32, round-to-nearest-even, NaN stays NaN, overflow gives Inf.
MINICACHE_API uint16_t minicache_fp32_to_fp16(float f);
MINICACHE_API float    minicache_fp16_to_fp32(uint16_t h);
MINICACHE_API void     minicache_fp32_to_fp16_row(const float * x, uint16_t * y, int64_t n);
MINICACHE_API void     minicache_fp16_to_fp32_row(const uint16_t * x, float * y, int64_t n);

// out[i] = norm[i] * dir[i] (* rot^T when rot is not NULL: the restore of the rotated layer).
// rot: NULL or an n_embd x n_embd row-major orthogonal matrix (finite).
MINICACHE_API int32_t minicache_restore(
        const struct minicache_view * dir,
        const float                 * norm,
        int64_t                       n_rows,
        int64_t                       n_embd,
        const float                 * rot,
        const struct minicache_view * out);

// ceil(gamma * n), forgiving an excess of up to 1e-7 * n from gamma's float rounding (0.05f * 100
// gives 5, not 6); clamped to [0, n].
MINICACHE_API int64_t minicache_retain_count(int64_t n, float gamma);

#ifdef __cplusplus
}
#endif

#endif // MINICACHE_H
