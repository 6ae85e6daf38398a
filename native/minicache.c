// MiniCache native core, see minicache.h for the contract.
#include "minicache.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MC_STR2(x) #x
#define MC_STR(x) MC_STR2(x)

#ifndef M_PI
#    define M_PI 3.14159265358979323846
#endif

const char * minicache_version(void) {
    return MC_STR(MINICACHE_VERSION_MAJOR) "." MC_STR(MINICACHE_VERSION_MINOR) "." MC_STR(MINICACHE_VERSION_PATCH);
}

const char * minicache_status_str(int32_t status) {
    switch (status) {
        case MINICACHE_OK:            return "ok";
        case MINICACHE_ERR_NULL:      return "a required pointer is NULL";
        case MINICACHE_ERR_SIZE:      return "row count or width out of range";
        case MINICACHE_ERR_TYPE:      return "unknown element type (valid: 0 = f32, 1 = f16)";
        case MINICACHE_ERR_PARAM:     return "parameter out of range (t and gamma must be in [0, 1]; mode 0 = topk, 1 = threshold)";
        case MINICACHE_ERR_NONFINITE: return "NaN or Inf where only finite values are valid";
        case MINICACHE_ERR_ALLOC:     return "out of memory";
        default:                      return "unknown status";
    }
}

//
// binary16 conversion (bit-exact with ggml's generic path and with F16C/NumPy: round to nearest even)
//

static inline float fp32_from_bits(uint32_t w) {
    float f;
    memcpy(&f, &w, sizeof(f));
    return f;
}

static inline uint32_t fp32_to_bits(float f) {
    uint32_t w;
    memcpy(&w, &f, sizeof(w));
    return w;
}

float minicache_fp16_to_fp32(uint16_t h) {
    const uint32_t w     = (uint32_t) h << 16;
    const uint32_t sign  = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;

    const uint32_t exp_offset = UINT32_C(0xE0) << 23;
    const float    normalized = fp32_from_bits((two_w >> 4) + exp_offset) * 0x1.0p-112f;

    const uint32_t magic_mask   = UINT32_C(126) << 23;
    const float    denormalized = fp32_from_bits((two_w >> 17) | magic_mask) - 0.5f;

    const uint32_t denormalized_cutoff = UINT32_C(1) << 27;
    const uint32_t result = sign | (two_w < denormalized_cutoff ? fp32_to_bits(denormalized) : fp32_to_bits(normalized));
    return fp32_from_bits(result);
}

uint16_t minicache_fp32_to_fp16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;

    const uint32_t w      = fp32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign   = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    if (bias < UINT32_C(0x71000000)) {
        bias = UINT32_C(0x71000000);
    }

    base = fp32_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits          = fp32_to_bits(base);
    const uint32_t exp_bits      = (bits >> 13) & UINT32_C(0x00007C00);
    const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
    const uint32_t nonsign       = exp_bits + mantissa_bits;
    return (uint16_t) ((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT16_C(0x7E00) : nonsign));
}

void minicache_fp32_to_fp16_row(const float * x, uint16_t * y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        y[i] = minicache_fp32_to_fp16(x[i]);
    }
}

void minicache_fp16_to_fp32_row(const uint16_t * x, float * y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        y[i] = minicache_fp16_to_fp32(x[i]);
    }
}

//
// row access through views
//

static int check_view(const struct minicache_view * v) {
    if (v == NULL || v->data == NULL) {
        return MINICACHE_ERR_NULL;
    }
    if (v->type != MINICACHE_TYPE_F32 && v->type != MINICACHE_TYPE_F16) {
        return MINICACHE_ERR_TYPE;
    }
    return MINICACHE_OK;
}

static void load_row(const struct minicache_view * v, int64_t i, int64_t n, double * out) {
    const char * row = (const char *) v->data + i * v->nb1;
    if (v->type == MINICACHE_TYPE_F32) {
        for (int64_t j = 0; j < n; j++) {
            float f;
            memcpy(&f, row + j * v->nb0, sizeof(f));
            out[j] = f;
        }
    } else {
        for (int64_t j = 0; j < n; j++) {
            uint16_t h;
            memcpy(&h, row + j * v->nb0, sizeof(h));
            out[j] = minicache_fp16_to_fp32(h);
        }
    }
}

static void store_row(const struct minicache_view * v, int64_t i, int64_t n, const double * x) {
    char * row = (char *) v->data + i * v->nb1;
    if (v->type == MINICACHE_TYPE_F32) {
        for (int64_t j = 0; j < n; j++) {
            const float f = (float) x[j];
            memcpy(row + j * v->nb0, &f, sizeof(f));
        }
    } else {
        for (int64_t j = 0; j < n; j++) {
            const uint16_t h = minicache_fp32_to_fp16((float) x[j]);
            memcpy(row + j * v->nb0, &h, sizeof(h));
        }
    }
}

//
// math on double rows
//

static double norm2(const double * x, int64_t n) {
    double s = 0.0;
    for (int64_t j = 0; j < n; j++) {
        s += x[j] * x[j];
    }
    return sqrt(s);
}

// y = x * rot (row vector times row-major n x n matrix)
static void rotate(const double * x, const float * rot, int64_t n, double * y) {
    for (int64_t j = 0; j < n; j++) {
        y[j] = 0.0;
    }
    for (int64_t k = 0; k < n; k++) {
        const double xk = x[k];
        const float * r = rot + k * n;
        for (int64_t j = 0; j < n; j++) {
            y[j] += xk * (double) r[j];
        }
    }
}

// y = x * rot^T
static void rotate_t(const double * x, const float * rot, int64_t n, double * y) {
    for (int64_t j = 0; j < n; j++) {
        const float * r = rot + j * n;
        double s = 0.0;
        for (int64_t k = 0; k < n; k++) {
            s += x[k] * (double) r[k];
        }
        y[j] = s;
    }
}

// u = x / nrm, or 0 when nrm is 0 or not finite
static void unit(const double * x, double nrm, int64_t n, double * u) {
    const int ok = nrm > 0.0 && isfinite(nrm);
    for (int64_t j = 0; j < n; j++) {
        u[j] = ok ? x[j] / nrm : 0.0;
    }
}

// SLERP of unit vectors u0, u1 (either may be 0, see the header). n0, n1: the norms the units
// came from (to tell zero and non-finite rows apart). Returns the angular distance in [0, 1].
static double slerp_units(const double * u0, double n0, const double * u1, double n1,
                          int64_t n, double t, double * out) {
    if (!isfinite(n0) || !isfinite(n1)) {
        for (int64_t j = 0; j < n; j++) {
            out[j] = 0.0;
        }
        return 1.0;
    }
    if (n0 == 0.0 || n1 == 0.0) {
        const double * other = n0 == 0.0 ? u1 : u0; // both zero: u1 is 0
        for (int64_t j = 0; j < n; j++) {
            out[j] = other[j];
        }
        return 0.0;
    }

    // angle = 2 atan2(|u0 - u1|, |u0 + u1|): accurate near 0 and near pi, unlike acos(dot)
    double dm = 0.0, dp = 0.0;
    for (int64_t j = 0; j < n; j++) {
        const double a = u0[j] - u1[j];
        const double b = u0[j] + u1[j];
        dm += a * a;
        dp += b * b;
    }
    const double omega = 2.0 * atan2(sqrt(dm), sqrt(dp));

    if (omega < MINICACHE_ANGLE_EPS) {
        for (int64_t j = 0; j < n; j++) {
            out[j] = (1.0 - t) * u0[j] + t * u1[j];
        }
    } else if (M_PI - omega < MINICACHE_ANGLE_EPS) {
        // opposite rows: no direction serves both; 0 is the closest to both in the worst case
        for (int64_t j = 0; j < n; j++) {
            out[j] = 0.0;
        }
    } else {
        const double so = sin(omega);
        const double w0 = sin((1.0 - t) * omega) / so;
        const double w1 = sin(t * omega) / so;
        for (int64_t j = 0; j < n; j++) {
            out[j] = w0 * u0[j] + w1 * u1[j];
        }
    }
    return omega / M_PI;
}

static int check_t(float t) {
    return (t >= 0.0f && t <= 1.0f) ? MINICACHE_OK : MINICACHE_ERR_PARAM; // false for NaN
}

static int check_rot(const float * rot, int64_t n) {
    if (rot == NULL) {
        return MINICACHE_OK;
    }
    for (int64_t i = 0; i < n * n; i++) {
        if (!isfinite(rot[i])) {
            return MINICACHE_ERR_NONFINITE;
        }
    }
    return MINICACHE_OK;
}

int32_t minicache_row_norms(const struct minicache_view * x, int64_t n_rows, int64_t n_embd, float * norms) {
    int rc;
    if (n_rows < 0 || n_embd < 1) {
        return MINICACHE_ERR_SIZE;
    }
    if ((rc = check_view(x)) != MINICACHE_OK) {
        return rc;
    }
    if (norms == NULL) {
        return MINICACHE_ERR_NULL;
    }
    double * buf = malloc((size_t) n_embd * sizeof(double));
    if (buf == NULL) {
        return MINICACHE_ERR_ALLOC;
    }
    for (int64_t i = 0; i < n_rows; i++) {
        load_row(x, i, n_embd, buf);
        norms[i] = (float) norm2(buf, n_embd);
    }
    free(buf);
    return MINICACHE_OK;
}

int32_t minicache_slerp(const float * u0, const float * u1, int64_t n, float t, float * out, float * dist) {
    if (u0 == NULL || u1 == NULL || out == NULL) {
        return MINICACHE_ERR_NULL;
    }
    if (n < 1) {
        return MINICACHE_ERR_SIZE;
    }
    if (check_t(t) != MINICACHE_OK) {
        return MINICACHE_ERR_PARAM;
    }
    double * buf = malloc((size_t) n * 3 * sizeof(double));
    if (buf == NULL) {
        return MINICACHE_ERR_ALLOC;
    }
    double * a = buf, * b = buf + n, * e = buf + 2 * n;
    for (int64_t j = 0; j < n; j++) {
        a[j] = u0[j];
        b[j] = u1[j];
    }
    const double na = norm2(a, n);
    const double nb = norm2(b, n);
    unit(a, na, n, a);
    unit(b, nb, n, b);
    const double d = slerp_units(a, na, b, nb, n, t, e);
    for (int64_t j = 0; j < n; j++) {
        out[j] = (float) e[j];
    }
    if (dist) {
        *dist = (float) d;
    }
    free(buf);
    return MINICACHE_OK;
}

// shared by merge and angular_distance: dir == NULL computes distances only
static int32_t merge_impl(const struct minicache_view * x0, const struct minicache_view * x1,
                          int64_t n_rows, int64_t n_embd, float t, const float * rot,
                          const struct minicache_view * dir, float * norm0, float * norm1, float * dist) {
    int rc;
    if (n_rows < 0 || n_embd < 1) {
        return MINICACHE_ERR_SIZE;
    }
    if ((rc = check_view(x0)) != MINICACHE_OK || (rc = check_view(x1)) != MINICACHE_OK) {
        return rc;
    }
    if ((rc = check_t(t)) != MINICACHE_OK || (rc = check_rot(rot, n_embd)) != MINICACHE_OK) {
        return rc;
    }
    double * buf = malloc((size_t) n_embd * 4 * sizeof(double));
    if (buf == NULL) {
        return MINICACHE_ERR_ALLOC;
    }
    double * a = buf, * b = buf + n_embd, * r = buf + 2 * n_embd, * e = buf + 3 * n_embd;
    for (int64_t i = 0; i < n_rows; i++) {
        load_row(x0, i, n_embd, a);
        load_row(x1, i, n_embd, b);
        const double na = norm2(a, n_embd);
        const double nb = norm2(b, n_embd);
        if (rot != NULL) {
            rotate(a, rot, n_embd, r);
            // the rotated row has norm na up to rounding; normalize by its own norm so e is unit
            const double nr = norm2(r, n_embd);
            unit(r, isfinite(na) ? nr : na, n_embd, a);
        } else {
            unit(a, na, n_embd, a);
        }
        unit(b, nb, n_embd, b);
        const double d = slerp_units(a, na, b, nb, n_embd, (double) t, e);
        if (dir != NULL) {
            store_row(dir, i, n_embd, e);
        }
        if (norm0) norm0[i] = (float) na;
        if (norm1) norm1[i] = (float) nb;
        if (dist)  dist[i]  = (float) d;
    }
    free(buf);
    return MINICACHE_OK;
}

int32_t minicache_merge(const struct minicache_view * x0, const struct minicache_view * x1,
                        int64_t n_rows, int64_t n_embd, float t, const float * rot,
                        const struct minicache_view * dir, float * norm0, float * norm1, float * dist) {
    int rc;
    if ((rc = check_view(dir)) != MINICACHE_OK) {
        return rc;
    }
    return merge_impl(x0, x1, n_rows, n_embd, t, rot, dir, norm0, norm1, dist);
}

int32_t minicache_angular_distance(const struct minicache_view * x0, const struct minicache_view * x1,
                                   int64_t n_rows, int64_t n_embd, const float * rot, float * dist) {
    if (dist == NULL) {
        return MINICACHE_ERR_NULL;
    }
    return merge_impl(x0, x1, n_rows, n_embd, 0.5f, rot, NULL, NULL, NULL, dist);
}

int32_t minicache_restore(const struct minicache_view * dir, const float * norm, int64_t n_rows,
                          int64_t n_embd, const float * rot, const struct minicache_view * out) {
    int rc;
    if (n_rows < 0 || n_embd < 1) {
        return MINICACHE_ERR_SIZE;
    }
    if ((rc = check_view(dir)) != MINICACHE_OK || (rc = check_view(out)) != MINICACHE_OK) {
        return rc;
    }
    if (norm == NULL) {
        return MINICACHE_ERR_NULL;
    }
    if ((rc = check_rot(rot, n_embd)) != MINICACHE_OK) {
        return rc;
    }
    double * buf = malloc((size_t) n_embd * 2 * sizeof(double));
    if (buf == NULL) {
        return MINICACHE_ERR_ALLOC;
    }
    double * e = buf, * y = buf + n_embd;
    for (int64_t i = 0; i < n_rows; i++) {
        load_row(dir, i, n_embd, e);
        if (rot != NULL) {
            rotate_t(e, rot, n_embd, y);
        } else {
            memcpy(y, e, (size_t) n_embd * sizeof(double));
        }
        const double s = norm[i];
        for (int64_t j = 0; j < n_embd; j++) {
            y[j] *= s;
        }
        store_row(out, i, n_embd, y);
    }
    free(buf);
    return MINICACHE_OK;
}

//
// retention
//

int64_t minicache_retain_count(int64_t n, float gamma) {
    if (n <= 0 || !(gamma > 0.0f)) {
        return 0;
    }
    // gamma arrives as float: 0.2f * 10 = 2.00000003, which must give 2, not 3. The float
    // rounding of gamma is below n * 2^-24 in gamma * n; forgive up to 1e-7 * n of excess.
    double k = ceil((double) gamma * (double) n - 1e-7 * (double) n);
    if (k > (double) n) {
        k = (double) n;
    }
    return (int64_t) k;
}

struct dist_idx {
    float   d;
    int64_t i;
};

static int cmp_dist_desc(const void * pa, const void * pb) {
    const struct dist_idx * a = pa;
    const struct dist_idx * b = pb;
    if (a->d != b->d) {
        return a->d > b->d ? -1 : 1;
    }
    return a->i < b->i ? -1 : (a->i > b->i ? 1 : 0);
}

int64_t minicache_retain_select(const float * dist, int64_t n, float gamma, int32_t mode, uint8_t * keep) {
    if (n < 0) {
        return MINICACHE_ERR_SIZE;
    }
    if (n > 0 && (dist == NULL || keep == NULL)) {
        return MINICACHE_ERR_NULL;
    }
    if (!(gamma >= 0.0f && gamma <= 1.0f)) {
        return MINICACHE_ERR_PARAM;
    }
    if (mode != MINICACHE_RETAIN_TOPK && mode != MINICACHE_RETAIN_THRESHOLD) {
        return MINICACHE_ERR_PARAM;
    }
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(dist[i])) {
            return MINICACHE_ERR_NONFINITE;
        }
    }
    for (int64_t i = 0; i < n; i++) {
        keep[i] = 0;
    }
    if (n == 0) {
        return 0;
    }

    int64_t kept = 0;
    if (mode == MINICACHE_RETAIN_THRESHOLD) {
        double dmin = dist[0], dmax = dist[0];
        for (int64_t i = 1; i < n; i++) {
            if (dist[i] < dmin) dmin = dist[i];
            if (dist[i] > dmax) dmax = dist[i];
        }
        const double thr = dmin + (dmax - dmin) * (1.0 - (double) gamma);
        for (int64_t i = 0; i < n; i++) {
            if ((double) dist[i] > thr) {
                keep[i] = 1;
                kept++;
            }
        }
        return kept;
    }

    const int64_t k = minicache_retain_count(n, gamma);
    if (k == 0) {
        return 0;
    }
    struct dist_idx * order = malloc((size_t) n * sizeof(*order));
    if (order == NULL) {
        return MINICACHE_ERR_ALLOC;
    }
    for (int64_t i = 0; i < n; i++) {
        order[i].d = dist[i];
        order[i].i = i;
    }
    qsort(order, (size_t) n, sizeof(*order), cmp_dist_desc);
    for (int64_t r = 0; r < k; r++) {
        keep[order[r].i] = 1;
    }
    free(order);
    return k;
}
