#pragma once

// helpers shared by the MiniCache units (llama-kv-cache-minicache*.cpp, llama-minicache.cpp)

#include "llama-minicache.h"

#include "ggml.h"

#include <cstring>
#include <string>

// "" if the params are valid, else what is wrong with them (llama-minicache.cpp)
std::string mc_check_params(const llama_minicache_params & p);

// the core reads and writes f16/f32 rows itself; other cache types go through f32
static inline bool mc_native(ggml_type type) {
    return type == GGML_TYPE_F16 || type == GGML_TYPE_F32;
}

// the cache types a merged pool can have (llama.cpp's KV cache types)
static inline bool mc_supported(ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_IQ4_NL:
            return true;
        default:
            return false;
    }
}

static inline void row_to_f32(ggml_type type, const void * src, int64_t n, float * dst) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, sizeof(float)*n);
    } else if (type == GGML_TYPE_F16) {
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) src, dst, n);
    } else {
        ggml_get_type_traits(type)->to_float(src, dst, n);
    }
}
