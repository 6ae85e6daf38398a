// MiniCache native core (the host-side pieces of the merged cache), see minicache.h.
#include "minicache.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MC_STR2(x) #x
#define MC_STR(x) MC_STR2(x)

const char * minicache_version(void) {
    return MC_STR(MINICACHE_VERSION_MAJOR) "." MC_STR(MINICACHE_VERSION_MINOR) "." MC_STR(MINICACHE_VERSION_PATCH);
}

const char * minicache_status_str(int32_t status) {
    switch (status) {
        case MINICACHE_OK:            return "ok";
        case MINICACHE_ERR_NULL:      return "a required pointer is NULL";
        case MINICACHE_ERR_SIZE:      return "row count or width out of range";
        case MINICACHE_ERR_TYPE:      return "unknown element type (valid: 0 = f32, 1 = f16)";
        case MINICACHE_ERR_PARAM:     return "parameter out of range";
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
// restore
//

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
