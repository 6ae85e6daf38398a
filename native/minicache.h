// MiniCache native core: the cross-layer KV merge math of MiniCache (Liu et al., NeurIPS 2024)
// on rows of float32/float16, with no ggml or llama.cpp types.
//
// A merged layer pair (l-1, l) keeps, per token, ONE shared unit direction e (the SLERP of the
// two layers' unit rows), the two rows' L2 norms, and the angular distance between them. A row is
// restored as norm * e. An optional orthogonal matrix R aligns layer l-1 to layer l before the
// merge (row-vector convention: the merged direction is built from unit(x0 * R) and unit(x1); the
// first row is restored as norm0 * e * R^T). Tokens whose two rows are too different to merge are
// chosen for retention (kept exact by the caller) with minicache_retain_select.
//
// Conventions
// - All arithmetic is done in double and rounded once to the output type (f16 outputs: double ->
//   f32 -> f16, both round-to-nearest-even, the same as ggml).
// - Functions return MINICACHE_OK (0) or a negative enum minicache_status; nothing is written to
//   the outputs when an argument is invalid.
// - Rows are read and written through strided views (ggml-style byte strides), so a transposed
//   V cache (element stride = kv_size * type size) needs no copy.
//
// Defined results for degenerate input (per row pair):
// - zero row(s): unit(0) = 0. One zero row: e = the other row's unit vector, distance 0 (the merge
//   is lossless: the zero row restores as 0 * e). Both zero: e = 0, distance 0.
// - identical or nearly identical directions (angle < 1e-6 rad): e = (1-t)*u0 + t*u1 (lerp).
// - opposite directions (pi - angle < 1e-6 rad): no single direction serves both rows; e = 0 (each
//   row restores as 0: its error is its norm, where any unit direction costs one of the two rows
//   up to twice its norm). Distance 1 (retention keeps such tokens exact first).
// - a row holding NaN or Inf: its norm is the natural sqrt(sum x^2) (Inf or NaN), e = 0, distance
//   1 (most distinct: retention keeps such tokens exact first). Restoring gives NaN/Inf, never a
//   silently finite value.
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
#define MINICACHE_VERSION_MINOR 1
#define MINICACHE_VERSION_PATCH 0

// below this angle (radians) SLERP falls back to lerp; within it of pi, the antipodal rule applies
#define MINICACHE_ANGLE_EPS 1e-6

enum minicache_status {
    MINICACHE_OK            =  0,
    MINICACHE_ERR_NULL      = -1, // a required pointer is NULL
    MINICACHE_ERR_SIZE      = -2, // a row count or width is out of range
    MINICACHE_ERR_TYPE      = -3, // unknown enum minicache_type
    MINICACHE_ERR_PARAM     = -4, // t or gamma outside [0, 1] (or NaN), unknown retention mode
    MINICACHE_ERR_NONFINITE = -5, // NaN/Inf where only finite values are valid (rotation, distances)
    MINICACHE_ERR_ALLOC     = -6, // out of memory for scratch space
};

enum minicache_type {
    MINICACHE_TYPE_F32 = 0,
    MINICACHE_TYPE_F16 = 1, // IEEE 754 binary16, as ggml's GGML_TYPE_F16
};

enum minicache_retention {
    // keep the ceil(gamma * n) most distinct pairs (ties: lower index first). Default: bounded,
    // so it fits the fixed pool of retention slots the cache allocates up front.
    MINICACHE_RETAIN_TOPK      = 0,
    // keep pairs with d > d_min + (d_max - d_min) * (1 - gamma): the paper's Eq. 4 read as
    // "keep the most distinct". Unbounded: a bimodal distribution keeps ~half of the tokens.
    MINICACHE_RETAIN_THRESHOLD = 1,
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

// norms[i] = ||row i||_2 for n_rows rows of width n_embd.
MINICACHE_API int32_t minicache_row_norms(
        const struct minicache_view * x, int64_t n_rows, int64_t n_embd, float * norms);

// SLERP between the directions of u0 and u1 (normalized internally) at parameter t in [0, 1]:
// out = sin((1-t)W)/sin(W) * u0 + sin(tW)/sin(W) * u1, W the angle between them.
// dist (may be NULL) receives the angular distance W / pi in [0, 1].
MINICACHE_API int32_t minicache_slerp(
        const float * u0, const float * u1, int64_t n, float t, float * out, float * dist);

// Merge n_rows row pairs (x0 from layer l-1, x1 from layer l) into shared directions.
// rot: NULL or an n_embd x n_embd row-major orthogonal matrix applied to x0 (x0 * rot) first.
// Outputs (any of norm0/norm1/dist may be NULL): dir rows (unit directions), the two norms
// (of the unrotated rows), and the angular distance in [0, 1].
MINICACHE_API int32_t minicache_merge(
        const struct minicache_view * x0,
        const struct minicache_view * x1,
        int64_t                       n_rows,
        int64_t                       n_embd,
        float                         t,
        const float                 * rot,
        const struct minicache_view * dir,
        float                       * norm0,
        float                       * norm1,
        float                       * dist);

// out[i] = norm[i] * dir[i] (* rot^T when rot is not NULL: the restore of the rotated layer).
MINICACHE_API int32_t minicache_restore(
        const struct minicache_view * dir,
        const float                 * norm,
        int64_t                       n_rows,
        int64_t                       n_embd,
        const float                 * rot,
        const struct minicache_view * out);

// Angular distance W / pi between unit(x0 * rot) and unit(x1) per row, as minicache_merge.
MINICACHE_API int32_t minicache_angular_distance(
        const struct minicache_view * x0,
        const struct minicache_view * x1,
        int64_t                       n_rows,
        int64_t                       n_embd,
        const float                 * rot,
        float                       * dist);

// ceil(gamma * n), forgiving an excess of up to 1e-7 * n from gamma's float rounding (0.05f * 100
// gives 5, not 6); clamped to [0, n].
MINICACHE_API int64_t minicache_retain_count(int64_t n, float gamma);

// Select the token pairs to keep exact among n merged pairs with distances dist (finite).
// keep[i] = 1 for selected pairs, 0 otherwise. Returns the number selected, or a negative status.
MINICACHE_API int64_t minicache_retain_select(
        const float * dist, int64_t n, float gamma, int32_t mode, uint8_t * keep);

#ifdef __cplusplus
}
#endif

#endif // MINICACHE_H
