#include "llama-kv-cache-minicache.h"

#include "llama-context.h"
#include "llama-hparams.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache.h"
#include "llama-kv-cells.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#ifdef LLAMA_MINICACHE
#include "minicache.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

//
// the params armed for the next context on this thread
//

static thread_local bool                     g_pending_set = false;
static thread_local llama_minicache_config   g_pending;
static thread_local std::string              g_last_error;
// set by llama_minicache_memory_scope::arm() for the one llama_kv_cache create_memory() builds next
static thread_local llama_minicache_config * g_armed = nullptr;
static thread_local bool                     g_armed_taken = false;

static std::string check_params(const llama_minicache_params & p) {
    if (!(p.t >= 0.0f && p.t <= 1.0f)) {
        return format("t=%g is not valid: expected a number in [0, 1]", p.t);
    }
    if (!(p.gamma >= 0.0f && p.gamma <= 1.0f)) {
        return format("gamma=%g is not valid: expected a number in [0, 1]", p.gamma);
    }
    if (p.window < 1) {
        return format("window=%d is not valid: expected an integer >= 1", p.window);
    }
    if (p.n_ubatch < 1) {
        return format("n_ubatch=%d is not valid: expected an integer >= 1", p.n_ubatch);
    }
    if (!p.merge_k && !p.merge_v) {
        return "merge_k and merge_v are both false: nothing to merge";
    }
    if (p.retention != LLAMA_MINICACHE_RETAIN_TOPK && p.retention != LLAMA_MINICACHE_RETAIN_THRESHOLD) {
        return format("retention=%d is not valid: expected 0 (topk) or 1 (threshold)", p.retention);
    }
    if (p.start_layer < -1) {
        return format("start_layer=%d is not valid: expected -1 (n_layer/2) or a layer index", p.start_layer);
    }
    if (p.n_pairs < 0 || (p.n_pairs > 0 && p.pairs == nullptr)) {
        return format("n_pairs=%d is not valid: expected 0, or the number of entries of pairs (not NULL)", p.n_pairs);
    }
    for (int32_t i = 0; i < p.n_pairs; ++i) {
        const llama_minicache_pair & q = p.pairs[i];
        if (q.kind != 0 && q.kind != 1) {
            return format("pairs[%d].kind=%d is not valid: expected 0 (K) or 1 (V)", i, q.kind);
        }
        if (q.il < 0) {
            return format("pairs[%d].il=%d is not valid: expected a layer index >= 0", i, q.il);
        }
        if (q.rot != LLAMA_MINICACHE_ROT_NONE && q.rot != LLAMA_MINICACHE_ROT_FULL && q.rot != LLAMA_MINICACHE_ROT_HEAD) {
            return format("pairs[%d].rot=%d is not valid: expected 0 (none), 1 (full) or 2 (per head)", i, q.rot);
        }
        if ((q.rot == LLAMA_MINICACHE_ROT_NONE) != (q.r == nullptr || q.n_r == 0) || q.n_r < 0) {
            return format("pairs[%d]: rot=%d with n_r=%d and r %s: a rotation needs its matrix, ROT_NONE none",
                    i, q.rot, q.n_r, q.r ? "set" : "NULL");
        }
        for (int32_t j = 0; j < q.n_r; ++j) {
            if (!std::isfinite(q.r[j])) {
                return format("pairs[%d]: the rotation holds a non-finite value at %d", i, j);
            }
        }
    }
    return "";
}

static uint64_t fnv1a(const void * data, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
    const uint8_t * b = (const uint8_t *) data;
    for (size_t i = 0; i < n; ++i) {
        h = (h ^ b[i])*0x100000001b3ull;
    }
    return h;
}

llama_minicache_memory_scope::llama_minicache_memory_scope() {
    if (g_pending_set) {
        pending = true;
        config  = std::move(g_pending);
        g_pending = {};
        g_pending_set = false;
    }
}

llama_minicache_memory_scope::~llama_minicache_memory_scope() {
    if (g_armed == &config) {
        g_armed = nullptr;
    }
}

void llama_minicache_memory_scope::arm() {
    if (pending) {
        g_armed       = &config;
        g_armed_taken = false;
    }
}

llama_memory_i * llama_minicache_memory_scope::finish(llama_memory_i * mem) {
    const bool taken = g_armed == &config && g_armed_taken;
    if (g_armed == &config) {
        g_armed = nullptr;
    }
    if (pending && !taken) {
        delete mem;
        const std::string msg = "this model's memory is not a plain KV cache (recurrent, hybrid, sliding-window, "
                                "shared or sparse-attention memory): MiniCache cannot merge it";
        llama_minicache_set_error(msg);
        throw std::runtime_error("MiniCache: " + msg);
    }
    return mem;
}

// the params armed for the llama_kv_cache being constructed (nullptr if none); consumes them
static const llama_minicache_config * take_armed() {
    if (g_armed == nullptr || g_armed_taken) {
        return nullptr;
    }
    g_armed_taken = true;
    return g_armed;
}

void llama_minicache_set_error(const std::string & msg) {
    g_last_error = msg;
}

//
// native core calls (the core is linked by LLAMA_MINICACHE_DIR, see src/CMakeLists.txt)
//

#ifdef LLAMA_MINICACHE
static int32_t mc_type(ggml_type type) {
    return type == GGML_TYPE_F16 ? MINICACHE_TYPE_F16 : MINICACHE_TYPE_F32;
}
#endif

// the core reads and writes f16/f32 rows itself; other cache types go through f32
static bool mc_native(ggml_type type) {
    return type == GGML_TYPE_F16 || type == GGML_TYPE_F32;
}

// the cache types a merged pool can have (llama.cpp's KV cache types)
static bool mc_supported(ggml_type type) {
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

static void row_to_f32(ggml_type type, const void * src, int64_t n, float * dst) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, sizeof(float)*n);
    } else if (type == GGML_TYPE_F16) {
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) src, dst, n);
    } else {
        ggml_get_type_traits(type)->to_float(src, dst, n);
    }
}

// one restored row: the cache type's rounding of dir * norm (* rot^T); f32 for other types
static void mc_restore_row(ggml_type type, const void * dir, float norm, int64_t n_embd, const float * rot, float * out) {
    if (!mc_native(type)) {
        std::vector<float> f(n_embd);
        row_to_f32(type, dir, n_embd, f.data());
        mc_restore_row(GGML_TYPE_F32, f.data(), norm, n_embd, rot, out);
        return;
    }
#ifdef LLAMA_MINICACHE
    const int64_t es = ggml_type_size(type);
    std::vector<uint8_t> tmp(es*n_embd);
    const minicache_view vd = { const_cast<void *>(dir), mc_type(type), es, es*n_embd };
    const minicache_view vo = { tmp.data(),              mc_type(type), es, es*n_embd };
    if (minicache_restore(&vd, &norm, 1, n_embd, rot, &vo) != MINICACHE_OK) {
        throw std::runtime_error("minicache_restore failed");
    }
    if (type == GGML_TYPE_F16) {
        minicache_fp16_to_fp32_row((const uint16_t *) tmp.data(), out, n_embd);
    } else {
        memcpy(out, tmp.data(), sizeof(float)*n_embd);
    }
#else
    GGML_UNUSED(type); GGML_UNUSED(dir); GGML_UNUSED(norm); GGML_UNUSED(n_embd); GGML_UNUSED(rot); GGML_UNUSED(out);
    throw std::runtime_error("this libllama was built without the MiniCache core (LLAMA_MINICACHE_DIR)");
#endif
}

// max |B B^T - I| over the b x b row-major blocks of r (NaN if any value is not finite): b^3 per block.
// A block wider than MC_ORTHO_EXACT_MAX (a full rotation of a wide model: 7e10 products at 4096) is
// checked on MC_ORTHO_PROBES fixed pseudo-random vectors x instead: max |x B B^T - x| / |x|
static constexpr uint32_t MC_ORTHO_EXACT_MAX = 512;
static constexpr int      MC_ORTHO_PROBES    = 16;

static double mc_orthogonality_error(const std::vector<float> & r, uint32_t b) {
    double err = 0.0;
    for (float v : r) {
        if (!std::isfinite(v)) {
            return NAN;
        }
    }
    std::vector<double> y(b), z(b), x(b);
    for (size_t off = 0; off + (size_t) b*b <= r.size(); off += (size_t) b*b) {
        const float * m = r.data() + off;
        if (b <= MC_ORTHO_EXACT_MAX) {
            for (uint32_t i = 0; i < b; ++i) {
                for (uint32_t j = i; j < b; ++j) {
                    double acc = 0.0;
                    for (uint32_t k = 0; k < b; ++k) {
                        acc += (double) m[(size_t) i*b + k]*m[(size_t) j*b + k];
                    }
                    err = std::max(err, std::fabs(acc - (i == j ? 1.0 : 0.0)));
                }
            }
            continue;
        }
        uint64_t state = 0x9e3779b97f4a7c15ull;
        for (int t = 0; t < MC_ORTHO_PROBES; ++t) {
            double nx = 0.0;
            for (uint32_t i = 0; i < b; ++i) {
                state = state*6364136223846793005ull + 1442695040888963407ull;
                x[i] = (double) (state >> 11)/(double) (1ull << 53) - 0.5;
                nx += x[i]*x[i];
            }
            nx = std::sqrt(nx);
            std::fill(y.begin(), y.end(), 0.0);
            for (uint32_t i = 0; i < b; ++i) {      // y = x B
                for (uint32_t j = 0; j < b; ++j) {
                    y[j] += x[i]*m[(size_t) i*b + j];
                }
            }
            for (uint32_t i = 0; i < b; ++i) {      // z = y B^T
                double acc = 0.0;
                for (uint32_t j = 0; j < b; ++j) {
                    acc += y[j]*m[(size_t) i*b + j];
                }
                z[i] = acc;
            }
            for (uint32_t i = 0; i < b; ++i) {
                err = std::max(err, std::fabs(z[i] - x[i])/nx);
            }
        }
    }
    return err;
}

// one restored row of a rotated layer or not (rot: the pool's blocks of width r_block, or null)
static void mc_restore_row_blocks(ggml_type type, const void * dir, float norm, int64_t n_embd, const float * rot, uint32_t r_block,
        float * out) {
    if (rot == nullptr || (int64_t) r_block == n_embd) {
        mc_restore_row(type, dir, norm, n_embd, rot, out);
        return;
    }
    // a block diagonal R restores each head on its own (the same rounding per value as a full R)
    std::vector<float> f;
    ggml_type t = type;
    const uint8_t * src = (const uint8_t *) dir;
    if (!mc_native(type)) {
        f.resize(n_embd);
        row_to_f32(type, dir, n_embd, f.data());
        src = (const uint8_t *) f.data();
        t   = GGML_TYPE_F32;
    }
    const size_t es = ggml_type_size(t);
    for (int64_t h = 0; h*r_block < n_embd; ++h) {
        mc_restore_row(t, src + (size_t) h*r_block*es, norm, r_block, rot + (size_t) h*r_block*r_block, out + h*r_block);
    }
}

static uint32_t mc_retain_count(uint32_t n, float gamma) {
#ifdef LLAMA_MINICACHE
    return (uint32_t) minicache_retain_count(n, gamma);
#else
    return (uint32_t) std::min<double>(n, std::ceil((double) gamma*n - 1e-7*n));
#endif
}

//
// llama_kv_minicache
//

llama_kv_minicache::llama_kv_minicache(
        const llama_hparams & hparams,
        const llama_minicache_config & config,
        ggml_type type_k,
        ggml_type type_v,
        uint32_t kv_size,
        bool v_trans) :
    hparams(hparams), params(config.params), specs(config.pairs), type_k(type_k), type_v(type_v), kv_size(kv_size), v_trans(v_trans) {
    const std::string err = check_params(params);
    if (!err.empty()) {
        throw std::runtime_error(err);
    }

    const int32_t n_layer = (int32_t) hparams.n_layer();

    if (const char * s = getenv("LLAMA_MINICACHE_FAIL_GRAPH")) {
        fail_graph = atoll(s);
    }

    if (hparams.swa_type != LLAMA_SWA_TYPE_NONE || hparams.is_swa_any()) {
        throw std::runtime_error("models with sliding-window attention (iSWA caches, e.g. Gemma 3) are not supported yet");
    }
    if (hparams.is_mla()) {
        throw std::runtime_error("models with multi-head latent attention (MLA) are not supported");
    }

    // the merged (pair, kind) list: explicit, or every pair from start_layer up in the kinds asked for
    std::vector<llama_minicache_pair_spec> todo = specs;
    if (todo.empty()) {
        const int32_t s0 = params.start_layer < 0 ? n_layer/2 : params.start_layer;
        if (n_layer < 2 || s0 > n_layer - 2) {
            throw std::runtime_error(format("start_layer=%d is not valid for this model (%d layers): expected 0 <= start_layer <= %d",
                    s0, n_layer, n_layer - 2));
        }
        for (int32_t a = s0; a + 1 < n_layer; a += 2) {
            for (int kind = 0; kind < 2; ++kind) {
                if (kind == KIND_K ? params.merge_k : params.merge_v) {
                    todo.push_back({ kind, a, LLAMA_MINICACHE_ROT_NONE, {} });
                }
            }
        }
    }

    for (const auto & q : todo) {
        const char kc = q.kind == KIND_K ? 'K' : 'V';
        const ggml_type type = type_of(q.kind);
        if (!mc_supported(type)) {
            throw std::runtime_error(format("type_%c=%s is not supported when merging %c: "
                    "use f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1 or iq4_nl",
                    q.kind == KIND_K ? 'k' : 'v', ggml_type_name(type), kc));
        }
        if (q.kind == KIND_V && ggml_is_quantized(type) && v_trans) {
            throw std::runtime_error(format("type_v=%s needs flash attention (a quantized V cache is not stored transposed)",
                    ggml_type_name(type)));
        }
    }

    // a ubatch never holds more tokens than the cache has cells
    n_stage      = std::min<uint32_t>(std::max(params.window, params.n_ubatch), kv_size);
    n_retain_max = std::min<uint32_t>(mc_retain_count(kv_size, params.gamma), kv_size);
    n_slots      = n_stage + n_retain_max;

    // the row past the slots stays zero: cells without a slot gather row n_slots
    n_rows       = n_slots + 1;

    pool_of.assign(2*n_layer, -1);

    std::vector<uint8_t> pair_used(n_layer, 0);
    start_layer = n_layer;

    for (const auto & q : todo) {
        const int kind = q.kind;
        const char kc  = kind == KIND_K ? 'K' : 'V';
        const int32_t a = q.il;
        const int32_t b = a + 1;
        if (b >= n_layer) {
            throw std::runtime_error(format("%c pair (%d, %d) is not valid for this model (%d layers): expected 0 <= layer <= %d",
                    kc, a, b, n_layer, n_layer - 2));
        }
        if (pool_of[2*a + kind] >= 0 || pool_of[2*b + kind] >= 0) {
            throw std::runtime_error(format("%c pair (%d, %d) overlaps another %c pair: each layer is merged at most once per kind",
                    kc, a, b, kc));
        }
        if (!hparams.has_kv(a) || !hparams.has_kv(b)) {
            throw std::runtime_error(format("layers %d and %d do not both have a KV cache: cannot merge them", a, b));
        }
        const uint32_t ne_a = kind == KIND_K ? hparams.n_embd_k_gqa(a) : hparams.n_embd_v_gqa(a);
        const uint32_t ne_b = kind == KIND_K ? hparams.n_embd_k_gqa(b) : hparams.n_embd_v_gqa(b);
        const uint32_t nh_a = kind == KIND_K ? hparams.n_embd_head_k(a) : hparams.n_embd_head_v(a);
        const uint32_t nh_b = kind == KIND_K ? hparams.n_embd_head_k(b) : hparams.n_embd_head_v(b);
        if (ne_a != ne_b || nh_a != nh_b) {
            throw std::runtime_error(format("layers %d and %d have different %c widths (%u, %u): cannot merge them",
                    a, b, kc, ne_a, ne_b));
        }
        if (nh_a % ggml_blck_size(type_of(kind)) != 0) {
            throw std::runtime_error(format("%c heads of %u values do not hold whole %s blocks of %lld: cannot merge layers %d and %d in this type",
                    kc, nh_a, ggml_type_name(type_of(kind)), (long long) ggml_blck_size(type_of(kind)), a, b));
        }

        pool p;
        p.kind        = kind;
        p.il[0]       = a;
        p.il[1]       = b;
        p.n_embd      = ne_a;
        p.n_embd_head = nh_a;
        p.n_head_kv   = ne_a/nh_a;
        p.n_head      = hparams.n_head(a);
        if (hparams.n_head(b) != p.n_head) {
            throw std::runtime_error(format("layers %d and %d have different head counts (%u, %u): cannot merge them",
                    a, b, p.n_head, hparams.n_head(b)));
        }
        p.rot         = q.rot;

        if (q.rot != LLAMA_MINICACHE_ROT_NONE) {
            const uint32_t d  = p.n_embd;
            const uint32_t dh = p.n_embd_head;
            const size_t   n_expected = q.rot == LLAMA_MINICACHE_ROT_FULL ? (size_t) d*d : (size_t) d*dh;
            if (q.r.size() != n_expected) {
                throw std::runtime_error(format("%c pair (%d, %d): the rotation holds %zu values, expected %zu (%s, %c rows of %u = %u heads x %u)",
                        kc, a, b, q.r.size(), n_expected, q.rot == LLAMA_MINICACHE_ROT_FULL ? "full" : "per head", kc, d, p.n_head_kv, dh));
            }
            p.r       = q.r;
            p.r_block = q.rot == LLAMA_MINICACHE_ROT_FULL ? d : dh;
            const double err_max = mc_orthogonality_error(p.r, p.r_block);
            if (!(err_max <= 1e-3)) {
                throw std::runtime_error(format("%c pair (%d, %d): the rotation is not orthogonal (max |R R^T - I| = %.3g, expected <= 1e-3)",
                        kc, a, b, err_max));
            }
            p.r_hash = fnv1a(q.r.data(), q.r.size()*sizeof(float), fnv1a(&q.rot, sizeof(q.rot)));
        }

        p.slot_of_cell.assign(kv_size, -1);
        p.cell_of_slot.assign(n_slots, -1);
        p.dist.assign(kv_size, 0.0f);
        p.norm_host[0].assign(kv_size, 0.0f);
        p.norm_host[1].assign(kv_size, 0.0f);
        p.norm_pending.assign(kv_size, 0);
        for (uint32_t s = 0; s < n_slots; ++s) {
            p.free_slots.push((int32_t) s);
        }

        pool_of[2*a + kind] = pool_of[2*b + kind] = (int32_t) pools.size();
        pools.push_back(std::move(p));

        if (!pair_used[a]) {
            pair_used[a] = 1;
            n_pairs++;
        }
        start_layer = std::min(start_layer, a);
    }

    if (pools.empty()) {
        throw std::runtime_error("no layer pair to merge");
    }

    staged.assign(kv_size, 0);
    merged.assign(kv_size, 0);
    stage_seq.assign(kv_size, 0);
}

llama_kv_minicache::~llama_kv_minicache() {
    for (auto & be : backends) {
        ggml_gallocr_free(be.galloc);
        ggml_backend_free(be.backend);
    }
}

bool llama_kv_minicache::is_merged(int32_t il, int kind) const {
    if (il < 0 || (kind != KIND_K && kind != KIND_V)) {
        return false;
    }
    const int64_t i = 2*(int64_t) il + kind;
    return i < (int64_t) pool_of.size() && pool_of[i] >= 0;
}

size_t llama_kv_minicache::n_tensors() const {
    return 5*pools.size();
}

void llama_kv_minicache::create_tensors(const std::function<ggml_context * (int32_t il)> & ctx_of_layer) {
    for (auto & p : pools) {
        const ggml_type type = type_of(p.kind);
        const char kc = p.kind == KIND_K ? 'k' : 'v';

        p.dir = dir_trans(p) ? ggml_new_tensor_2d(ctx_of_layer(p.il[0]), type, kv_size, p.n_embd)
                             : ggml_new_tensor_2d(ctx_of_layer(p.il[0]), type, p.n_embd, kv_size);
        ggml_format_name(p.dir, "cache_mc_%c_dir_l%d_%d", kc, p.il[0], p.il[1]);

        for (int x = 0; x < 2; ++x) {
            p.norm[x] = ggml_new_tensor_2d(ctx_of_layer(p.il[x]), GGML_TYPE_F32, 1, kv_size);
            ggml_format_name(p.norm[x], "cache_mc_%c_norm_l%d", kc, p.il[x]);
        }

        // layer a's exact rows (layer b's live in dir)
        p.rows = dir_trans(p) ? ggml_new_tensor_2d(ctx_of_layer(p.il[0]), type, n_rows, p.n_embd)
                              : ggml_new_tensor_2d(ctx_of_layer(p.il[0]), type, p.n_embd, n_rows);
        ggml_format_name(p.rows, "cache_mc_%c_rows_l%d", kc, p.il[0]);

        if (p.rot == LLAMA_MINICACHE_ROT_FULL) {
            p.rot_t = ggml_new_tensor_2d(ctx_of_layer(p.il[0]), GGML_TYPE_F32, p.n_embd, p.n_embd);
        } else if (p.rot == LLAMA_MINICACHE_ROT_HEAD) {
            p.rot_t = ggml_new_tensor_3d(ctx_of_layer(p.il[0]), GGML_TYPE_F32, p.n_embd_head, p.n_embd_head, p.n_head_kv);
        }
        if (p.rot_t) {
            ggml_format_name(p.rot_t, "cache_mc_%c_rot_l%d", kc, p.il[0]);
        }
    }
}

void llama_kv_minicache::upload_rotations() {
    for (auto & p : pools) {
        if (!p.rot_t || !p.rot_t->buffer || ggml_backend_buffer_get_size(p.rot_t->buffer) == 0) {
            continue;
        }
        // K: the decoding fold computes q * R, which reads R by columns (element (i, j) = R[i][j] with i
        // contiguous): R^T row-major. V: the fold computes u * R^T: R row-major as given
        std::vector<float> buf(ggml_nelements(p.rot_t));
        GGML_ASSERT(buf.size() == p.r.size());
        const uint32_t b = p.r_block;
        for (size_t off = 0; off < p.r.size(); off += (size_t) b*b) {
            const float * m = p.r.data() + off;
            for (uint32_t i = 0; i < b; ++i) {
                for (uint32_t j = 0; j < b; ++j) {
                    buf[off + (size_t) j*b + i] = p.kind == KIND_K ? m[(size_t) i*b + j] : m[(size_t) j*b + i];
                }
            }
        }
        ggml_backend_tensor_set(p.rot_t, buf.data(), 0, ggml_nbytes(p.rot_t));
    }
}

void llama_kv_minicache::set_attn_rot(bool rot_k, bool rot_v, uint32_t n_embd_head_k_all,
        const std::unordered_map<int64_t, std::vector<float>> & hadamard) {
    // the block sizes of llama_kv_cache::build_input_k_rot / build_input_v_rot
    uint32_t nrot_k = 0;
    if (rot_k) {
        nrot_k = 64;
        do {
            nrot_k *= 2;
        } while (n_embd_head_k_all % nrot_k == 0);
        nrot_k /= 2;
    }
    n_attn_rot[KIND_K] = nrot_k;
    n_attn_rot[KIND_V] = rot_v ? 64 : 0;

    for (auto & p : pools) {
        const uint32_t n = n_attn_rot[p.kind];
        if (n == 0) {
            continue;
        }
        p.r_hash = fnv1a(&n, sizeof(n), p.r_hash);
        if (p.rot == LLAMA_MINICACHE_ROT_NONE) {
            continue; // the same orthogonal H on both layers commutes with the plain merge
        }
        const auto it = hadamard.find(n);
        if (it == hadamard.end() || p.n_embd_head % n != 0) {
            throw std::runtime_error(format("no %ux%u Hadamard rotation for %c rows of %u-wide heads",
                    n, n, p.kind == KIND_K ? 'K' : 'V', p.n_embd_head));
        }
        // the cache holds x H (H symmetric and orthogonal, one block of n per n values of a row):
        // x_a R merged with x_b is (x_a H)(H R H) merged with x_b H. Per-head R stays per head (n | n_embd_head)
        const std::vector<float> & h = it->second;
        const uint32_t b = p.r_block;
        std::vector<double> tmp((size_t) b*b);
        for (size_t off = 0; off < p.r.size(); off += (size_t) b*b) {
            float * m = p.r.data() + off;
            for (uint32_t i = 0; i < b; ++i) {
                const uint32_t bi = i - i % n;
                for (uint32_t j = 0; j < b; ++j) {
                    double acc = 0.0;
                    for (uint32_t k = 0; k < n; ++k) {
                        acc += (double) h[(size_t) (i - bi)*n + k]*m[(size_t) (bi + k)*b + j];
                    }
                    tmp[(size_t) i*b + j] = acc; // (H R)[i][j]
                }
            }
            for (uint32_t i = 0; i < b; ++i) {
                for (uint32_t j = 0; j < b; ++j) {
                    const uint32_t bj = j - j % n;
                    double acc = 0.0;
                    for (uint32_t k = 0; k < n; ++k) {
                        acc += tmp[(size_t) i*b + bj + k]*h[(size_t) k*n + (j - bj)];
                    }
                    m[(size_t) i*b + j] = (float) acc;
                }
            }
        }
    }
}

ggml_type llama_kv_minicache::restored_type(int kind, bool rotated) const {
    const ggml_type type = type_of(kind);
    if (!ggml_is_quantized(type)) {
        return type;
    }
    return !rotated && (type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0) ? type : GGML_TYPE_F16;
}

size_t llama_kv_minicache::size_bytes(int kind) const {
    size_t res = 0;
    for (const auto & p : pools) {
        if (p.kind == kind) {
            res += ggml_nbytes(p.dir);
            res += ggml_nbytes(p.norm[0]) + ggml_nbytes(p.norm[1]);
            res += ggml_nbytes(p.rows);
            res += p.rot_t ? ggml_nbytes(p.rot_t) : 0;
        }
    }
    return res;
}

size_t llama_kv_minicache::dense_bytes(int kind) const {
    size_t res = 0;
    for (const auto & p : pools) {
        if (p.kind == kind) {
            res += 2*ggml_row_size(type_of(kind), p.n_embd)*kv_size;
        }
    }
    return res;
}

//
// graph
//

void llama_kv_minicache::build_inputs(ggml_context * ctx, uint32_t n_tokens, uint32_t n_kv, llama_kv_minicache_inputs & inp) const {
    inp.write_idxs.clear();
    inp.write_cells.clear();
    inp.gather_idxs.clear();
    inp.fold_idxs.clear();
    inp.fold_zero.clear();

    for (size_t i = 0; i < pools.size(); ++i) {
        const int64_t n_write = dir_trans(pools[i]) ? n_tokens*pools[i].n_embd : n_tokens;
        ggml_tensor * w  = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_write);
        ggml_tensor * wc = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_write);
        ggml_tensor * g  = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_kv);
        ggml_tensor * f  = nullptr;
        ggml_tensor * fz = nullptr;
        if (n_tokens <= LLAMA_MINICACHE_FOLD_MAX_TOKENS) {
            const int64_t nth = (int64_t) n_tokens*pools[i].n_head;
            f = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_rows, pools[i].kind == KIND_K ? 1 : nth);
            ggml_set_input(f);
            ggml_format_name(f, "mc_inp_fold_%zu", i);
            if (pools[i].kind == KIND_K) {
                // zeroed on the backend that runs the attention (not a host input: the scatter writes
                // into it, and a scheduler splitting the graph across backends copies inputs as given)
                fz = ggml_fill(ctx, ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, n_kv + 1, nth), 0.0f);
                ggml_format_name(fz, "mc_fold_zero_%zu", i);
            }
        }

        ggml_set_input(w);
        ggml_set_input(wc);
        ggml_set_input(g);

        ggml_format_name(w,  "mc_inp_write_%zu",  i);
        ggml_format_name(wc, "mc_inp_write_cells_%zu", i);
        ggml_format_name(g,  "mc_inp_gather_%zu", i);

        inp.write_idxs.push_back(w);
        inp.write_cells.push_back(wc);
        inp.gather_idxs.push_back(g);
        inp.fold_idxs.push_back(f);
        inp.fold_zero.push_back(fz);
    }
}

void llama_kv_minicache::set_inputs(const llama_kv_minicache_inputs & inp, const std::vector<uint32_t> & ubatch_cells, uint32_t n_kv) const {
    for (size_t i = 0; i < pools.size(); ++i) {
        const auto & p = pools[i];

        if (inp.write_idxs[i]->buffer) {
            GGML_ASSERT(ggml_backend_buffer_is_host(inp.write_idxs[i]->buffer));
            const int64_t ne = dir_trans(p) ? p.n_embd : 1;
            GGML_ASSERT((size_t) inp.write_idxs[i]->ne[0] == ne*ubatch_cells.size());
            int64_t * w = (int64_t *) inp.write_idxs[i]->data;
            for (size_t j = 0; j < ubatch_cells.size(); ++j) {
                const int32_t slot = p.slot_of_cell[ubatch_cells[j]];
                GGML_ASSERT(slot >= 0 && "a new token has no staging slot");
                if (dir_trans(p)) {
                    // element e of the token's row goes to e*n_rows + slot (transposed, as llama.cpp's V)
                    for (int64_t e = 0; e < ne; ++e) {
                        w[j*ne + e] = e*n_rows + slot;
                    }
                } else {
                    w[j] = slot;
                }
            }
        }

        if (inp.write_cells[i]->buffer) {
            GGML_ASSERT(ggml_backend_buffer_is_host(inp.write_cells[i]->buffer));
            const int64_t ne = dir_trans(p) ? p.n_embd : 1;
            GGML_ASSERT((size_t) inp.write_cells[i]->ne[0] == ne*ubatch_cells.size());
            int64_t * w = (int64_t *) inp.write_cells[i]->data;
            for (size_t j = 0; j < ubatch_cells.size(); ++j) {
                for (int64_t e = 0; e < ne; ++e) {
                    w[j*ne + e] = e*kv_size + ubatch_cells[j]; // transposed V: element e at e*kv_size + cell
                }
            }
        }

        // each input is set only when the graph uses it (allocated)
        if (inp.gather_idxs[i]->buffer) {
            GGML_ASSERT(ggml_backend_buffer_is_host(inp.gather_idxs[i]->buffer));
            GGML_ASSERT(inp.gather_idxs[i]->ne[0] == n_kv);
            int32_t * g = (int32_t *) inp.gather_idxs[i]->data;
            for (uint32_t c = 0; c < n_kv; ++c) {
                const int32_t slot = p.slot_of_cell[c];
                g[c] = slot >= 0 ? slot : (int32_t) n_slots;
            }
        }

        ggml_tensor * f = inp.fold_idxs[i];
        if (f && f->buffer) {
            GGML_ASSERT(ggml_backend_buffer_is_host(f->buffer));
            // K: free slots and the zero row scatter their 0 to the spare cell n_kv; V: they gather any weight
            const int32_t unused = p.kind == KIND_K ? (int32_t) n_kv : 0;
            int32_t * sc = (int32_t *) f->data;
            for (uint32_t s = 0; s < n_slots; ++s) {
                const int32_t c = p.cell_of_slot[s];
                GGML_ASSERT(c < (int32_t) n_kv);
                sc[s] = c >= 0 ? c : unused;
            }
            sc[n_slots] = unused;
            for (int64_t j = 1; j < f->ne[1]; ++j) {
                memcpy(sc + j*n_rows, sc, sizeof(int32_t)*n_rows);
            }
        }

    }
}

ggml_tensor * llama_kv_minicache::cpy(ggml_context * ctx, ggml_tensor * cur, int32_t il, int kind, const llama_kv_minicache_inputs & inp) const {
    const int32_t ip = pool_of[2*il + kind];
    const auto & p = pools[ip];
    const int x = il == p.il[0] ? 0 : 1;

    GGML_ASSERT(cur->ne[0] == p.n_embd);

    // layer a's row goes to its slot, layer b's to its cell of dir
    ggml_tensor * dst  = x == 0 ? p.rows : p.dir;
    ggml_tensor * idxs = x == 0 ? inp.write_idxs[ip] : inp.write_cells[ip];

    if (dir_trans(p)) {
        // one "row" per element, as llama_kv_cache::cpy_v does for its transposed V
        if (!ggml_is_contiguous(cur)) {
            cur = ggml_cont(ctx, cur);
        }
        return ggml_set_rows(ctx,
                ggml_reshape_2d(ctx, dst, 1, ggml_nelements(dst)),
                ggml_reshape_2d(ctx, cur, 1, ggml_nelements(cur)),
                idxs);
    }

    return ggml_set_rows(ctx, dst, cur, idxs);
}

ggml_tensor * llama_kv_minicache::get(ggml_context * ctx, int32_t il, int kind, uint32_t n_kv, uint32_t n_embd_head, uint32_t n_head_kv,
        const llama_kv_minicache_inputs & inp) const {
    const int32_t ip = pool_of[2*il + kind];
    const auto & p = pools[ip];
    const int x = il == p.il[0] ? 0 : 1;

    GGML_ASSERT(n_embd_head*n_head_kv == p.n_embd);

    // layer a's norms are 0 for cells read from a slot (no mask arithmetic: 0 * Inf would be NaN);
    // layer b's are 1 there (dir holds its exact row)
    ggml_tensor * norm = ggml_view_1d(ctx, p.norm[x], n_kv, 0);

    // layer a's exact cells: their slot's row, every other cell gathers the zero row
    ggml_tensor * exact = nullptr;
    if (x == 0) {
        ggml_tensor * rows = dir_trans(p) ? ggml_cont(ctx, ggml_transpose(ctx, p.rows)) : p.rows;
        exact = ggml_get_rows(ctx, rows, inp.gather_idxs[ip]);
    }

    // the rotated layer is computed in F32 and rounded to the cache type once, after R^T; other
    // than f16/f32 directions are converted to F32 first and the result rounded to restored_type()
    const bool rotated = x == 0 && p.rot != LLAMA_MINICACHE_ROT_NONE;
    const bool to_f32  = rotated || !mc_native(p.dir->type);
    const ggml_type type_out = restored_type(p.kind, rotated);

    if (dir_trans(p)) {
        // [n_kv, n_embd]: dir * norm per cell
        ggml_tensor * dir = ggml_view_2d(ctx, p.dir, n_kv, p.n_embd, p.dir->nb[1], 0);
        if (to_f32 && dir->type != GGML_TYPE_F32) {
            dir = ggml_cast(ctx, dir, GGML_TYPE_F32);
        }
        ggml_tensor * cur = ggml_mul(ctx, dir, ggml_reshape_2d(ctx, norm, n_kv, 1));

        if (rotated) {
            // rows [n_embd, n_kv] * R^T, back in the cache type
            cur = unrotate(ctx, p, ggml_cont(ctx, ggml_transpose(ctx, cur)));
            if (v_trans) {
                cur = ggml_cont(ctx, ggml_transpose(ctx, cur));
            }
        } else if (!v_trans) {
            cur = ggml_cont(ctx, ggml_transpose(ctx, cur));
        }

        if (!v_trans) {
            // flash attention reads V as rows [n_embd, n_kv]
            if (exact) {
                cur = ggml_add(ctx, cur, exact);
            }
            if (cur->type != type_out) {
                cur = ggml_cast(ctx, cur, type_out);
            }

            return ggml_view_4d(ctx, cur,
                    n_embd_head, n_head_kv, n_kv, 1,
                    ggml_row_size(cur->type, n_embd_head),
                    ggml_row_size(cur->type, p.n_embd),
                    ggml_row_size(cur->type, p.n_embd)*n_kv,
                    0);
        }

        if (exact) {
            cur = ggml_add(ctx, cur, ggml_cont(ctx, ggml_transpose(ctx, exact)));
        }
        if (cur->type != type_out) {
            cur = ggml_cast(ctx, cur, type_out);
        }

        const size_t es = ggml_element_size(cur);

        return ggml_view_4d(ctx, cur,
                n_kv, n_head_kv, n_embd_head, 1,
                es*n_kv*n_embd_head,
                es*n_kv,
                es*n_kv*p.n_embd,
                0);
    }

    ggml_tensor * dir = ggml_view_2d(ctx, p.dir, p.n_embd, n_kv, p.dir->nb[1], 0);
    if (to_f32 && dir->type != GGML_TYPE_F32) {
        dir = ggml_cast(ctx, dir, GGML_TYPE_F32);
    }
    ggml_tensor * cur = ggml_mul(ctx, dir, ggml_reshape_2d(ctx, norm, 1, n_kv));
    if (rotated) {
        cur = unrotate(ctx, p, cur);
    }
    if (exact) {
        cur = ggml_add(ctx, cur, exact);
    }
    if (cur->type != type_out) {
        cur = ggml_cast(ctx, cur, type_out);
    }

    // quantized rows: whole blocks per head (the layer's heads hold whole blocks, checked at creation)
    return ggml_view_4d(ctx, cur,
            n_embd_head, n_head_kv, n_kv, 1,
            ggml_row_size(cur->type, n_embd_head),
            ggml_row_size(cur->type, p.n_embd),
            ggml_row_size(cur->type, p.n_embd)*n_kv,
            0);
}

ggml_tensor * llama_kv_minicache::unrotate(ggml_context * ctx, const pool & p, ggml_tensor * cur) const {
    const int64_t n  = cur->ne[1];
    const int64_t dh = p.n_embd_head;
    const int64_t nh = p.n_head_kv;

    if (cur->type != GGML_TYPE_F32) {
        cur = ggml_cast(ctx, cur, GGML_TYPE_F32);
    }

    // out[j] = sum_i r[i] R[j][i]: src0 element (i, j) = R[j][i], which is the V layout; K stores R^T
    ggml_tensor * res;
    if (p.rot == LLAMA_MINICACHE_ROT_FULL) {
        ggml_tensor * a = p.kind == KIND_K ? ggml_cont(ctx, ggml_transpose(ctx, p.rot_t)) : p.rot_t;
        res = ggml_mul_mat(ctx, a, cur);
    } else {
        ggml_tensor * a = p.kind == KIND_K ? ggml_cont(ctx, ggml_permute(ctx, p.rot_t, 1, 0, 2, 3)) : p.rot_t;
        ggml_tensor * b = ggml_permute(ctx, ggml_reshape_3d(ctx, cur, dh, nh, n), 0, 2, 1, 3); // [dh, n, nh]
        res = ggml_mul_mat(ctx, a, b);                                                          // [dh, n, nh]
        res = ggml_reshape_2d(ctx, ggml_cont(ctx, ggml_permute(ctx, res, 0, 2, 1, 3)), dh*nh, n);
    }

    return ggml_cast(ctx, res, restored_type(p.kind, true));
}

// gather along dim 0 of x [n0, n1, n2] (contiguous) with idx [m, n1*n2] (values < n0, the same index
// for every (i1, i2)): [m, n1, n2]. each element is a one-value row of x: no transposes
static ggml_tensor * gather_dim0(ggml_context * ctx, ggml_tensor * x, ggml_tensor * idx) {
    GGML_ASSERT(idx->ne[1] == x->ne[1]*x->ne[2]);
    ggml_tensor * t = ggml_get_rows(ctx, ggml_reshape_3d(ctx, x, 1, x->ne[0], x->ne[1]*x->ne[2]), idx); // [1, m, n1*n2]
    return ggml_reshape_3d(ctx, t, idx->ne[0], x->ne[1], x->ne[2]);
}

// sum over n rows weighted per token and query head, for rows stored untransposed (quantized V):
// x [dh, n, n_head_kv] (rows of dh values), w [n, n_tokens, n_head] contiguous -> [dh, n_tokens, n_head].
// query head h reads KV head h / (n_head / n_head_kv), as llama.cpp broadcasts them
static ggml_tensor * weighted_rows(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w) {
    const int64_t n         = w->ne[0];
    const int64_t n_tokens  = w->ne[1];
    const int64_t n_head    = w->ne[2];
    const int64_t n_head_kv = x->ne[2];
    const int64_t g         = n_head/n_head_kv;

    ggml_tensor * wt = ggml_reshape_4d(ctx, w, n, n_tokens, g, n_head_kv);
    wt = ggml_cont(ctx, ggml_permute(ctx, wt, 2, 0, 1, 3));   // [n_tokens, g, n, n_head_kv]
    wt = ggml_reshape_3d(ctx, wt, n_tokens*g, n, n_head_kv);
    ggml_tensor * res = ggml_out_prod(ctx, x, wt);            // [dh, n_tokens*g, n_head_kv]
    return ggml_reshape_3d(ctx, res, x->ne[0], n_tokens, n_head);
}

ggml_tensor * llama_kv_minicache::build_attn(ggml_context * ctx, ggml_tensor * q_cur, ggml_tensor * k_dense, ggml_tensor * v_dense,
        ggml_tensor * kq_mask, float kq_scale, float max_bias, int32_t il, uint32_t n_kv,
        uint32_t n_embd_head_k, uint32_t n_embd_head_v, uint32_t n_head_kv, const llama_kv_minicache_inputs & inp) const {
    const int32_t ipk = pool_of[2*il + KIND_K];
    const int32_t ipv = pool_of[2*il + KIND_V];

    GGML_ASSERT((ipk >= 0) == (k_dense == nullptr));
    GGML_ASSERT((ipv >= 0) == (v_dense == nullptr));

    const uint32_t n_tokens = q_cur->ne[2];

    ggml_tensor * q = ggml_permute(ctx, q_cur, 0, 2, 1, 3); // [n_embd_head_k, n_tokens, n_head]

    // scores [n_kv, n_tokens, n_head]
    ggml_tensor * kq;
    if (ipk < 0) {
        kq = ggml_mul_mat(ctx, ggml_permute(ctx, k_dense, 0, 2, 1, 3), q);
        ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
    } else {
        const auto & p = pools[ipk];
        const int x = il == p.il[0] ? 0 : 1;
        const size_t rh = ggml_row_size(p.dir->type, n_embd_head_k); // one head of a row (whole blocks)

        // merged cells: norm_c * (dir_c . q), or norm_c * (dir_c . q R) for the rotated layer
        const int32_t rot = x == 0 ? p.rot : LLAMA_MINICACHE_ROT_NONE;
        if (rot == LLAMA_MINICACHE_ROT_FULL) {
            // each head's query becomes a whole row: q_h R[rows of kv head h] [n_embd, n_tokens, n_head]
            const size_t ef = ggml_element_size(p.rot_t);
            ggml_tensor * w  = ggml_view_3d(ctx, p.rot_t, n_embd_head_k, p.n_embd, n_head_kv, ef*p.n_embd, ef*n_embd_head_k, 0);
            ggml_tensor * qr = ggml_mul_mat(ctx, w, q);
            ggml_tensor * dir = ggml_view_2d(ctx, p.dir, p.n_embd, n_kv, p.dir->nb[1], 0);
            kq = ggml_mul_mat(ctx, dir, ggml_reshape_2d(ctx, qr, p.n_embd, qr->ne[1]*qr->ne[2]));
            ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
            kq = ggml_reshape_3d(ctx, kq, n_kv, qr->ne[1], qr->ne[2]);
        } else {
            // per head: q_h R_h
            ggml_tensor * qr = rot == LLAMA_MINICACHE_ROT_HEAD ? ggml_mul_mat(ctx, p.rot_t, q) : q;
            ggml_tensor * dir = ggml_view_3d(ctx, p.dir, n_embd_head_k, n_head_kv, n_kv, rh, p.dir->nb[1], 0);
            kq = ggml_mul_mat(ctx, ggml_permute(ctx, dir, 0, 2, 1, 3), qr);
            ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
        }
        kq = ggml_mul(ctx, kq, ggml_view_1d(ctx, p.norm[x], n_kv, 0)); // a: 0, b: 1 for cells with a slot

        if (x == 0) {
            // layer a's exact cells: x_c . q per slot, added to the cells that own the slots (the others get 0)
            ggml_tensor * rows = ggml_view_3d(ctx, p.rows, n_embd_head_k, n_head_kv, n_rows, rh, p.rows->nb[1], 0);
            ggml_tensor * kq_x = ggml_mul_mat(ctx, ggml_permute(ctx, rows, 0, 2, 1, 3), q); // [n_rows, n_tokens, n_head]
            ggml_mul_mat_set_prec(kq_x, GGML_PREC_F32);
            // scattered to their cells in a zeroed [n_kv + 1, n_tokens, n_head] (free slots write the spare cell)
            const int64_t nth = kq_x->ne[1]*kq_x->ne[2];
            ggml_tensor * sc = ggml_set_rows(ctx, inp.fold_zero[ipk], ggml_reshape_3d(ctx, kq_x, 1, n_rows, nth), inp.fold_idxs[ipk]);
            sc = ggml_view_3d(ctx, sc, n_kv, kq_x->ne[1], kq_x->ne[2], sc->nb[1]*(n_kv + 1), sc->nb[1]*(n_kv + 1)*kq_x->ne[1], 0);
            kq = ggml_add(ctx, kq, sc);
        }
    }

    kq = ggml_soft_max_ext(ctx, kq, kq_mask, kq_scale, max_bias);

    // output [n_embd_head_v, n_tokens, n_head]
    ggml_tensor * kqv;
    if (ipv < 0 && v_trans) {
        kqv = ggml_mul_mat(ctx, ggml_permute(ctx, v_dense, 0, 2, 1, 3), kq);
    } else if (ipv < 0) {
        // V stored by rows (flash attention on): weighted sums of the rows, read in place
        kqv = weighted_rows(ctx, ggml_permute(ctx, v_dense, 0, 2, 1, 3), kq);
    } else {
        const auto & p = pools[ipv];
        const int x = il == p.il[0] ? 0 : 1;

        // merged cells: sum_c (p_c norm_c) dir_c, rotated back once per output row for the rotated layer
        const int32_t rot = x == 0 ? p.rot : LLAMA_MINICACHE_ROT_NONE;
        ggml_tensor * kqn  = ggml_mul(ctx, kq, ggml_view_1d(ctx, p.norm[x], n_kv, 0)); // a: 0, b: 1 for cells with a slot
        if (!dir_trans(p)) {
            // quantized V, stored by rows: weighted sums of whole rows (blocks run along the row)
            const size_t rh = ggml_row_size(p.dir->type, n_embd_head_v);
            if (rot == LLAMA_MINICACHE_ROT_FULL) {
                ggml_tensor * dir = ggml_view_3d(ctx, p.dir, p.n_embd, n_kv, 1, p.dir->nb[1], p.dir->nb[1]*n_kv, 0);
                ggml_tensor * u = weighted_rows(ctx, dir,
                        ggml_reshape_3d(ctx, kqn, n_kv, kqn->ne[1], kqn->ne[2])); // [n_embd, n_tokens, n_head]
                const size_t ef = ggml_element_size(p.rot_t);
                ggml_tensor * w = ggml_view_3d(ctx, p.rot_t, p.n_embd, n_embd_head_v, n_head_kv, ef*p.n_embd, ef*p.n_embd*n_embd_head_v, 0);
                kqv = ggml_mul_mat(ctx, w, u);
            } else {
                ggml_tensor * dir = ggml_view_3d(ctx, p.dir, n_embd_head_v, n_kv, n_head_kv, p.dir->nb[1], rh, 0);
                kqv = weighted_rows(ctx, dir, kqn);
                if (rot == LLAMA_MINICACHE_ROT_HEAD) {
                    kqv = ggml_mul_mat(ctx, p.rot_t, kqv);
                }
            }
            if (x == 0) {
                ggml_tensor * rows = ggml_view_3d(ctx, p.rows, n_embd_head_v, n_rows, n_head_kv, p.rows->nb[1], rh, 0);
                kqv = ggml_add(ctx, kqv, weighted_rows(ctx, rows, gather_dim0(ctx, kq, inp.fold_idxs[ipv])));
            }
        } else if (rot == LLAMA_MINICACHE_ROT_FULL) {
            // each head sums whole direction rows [n_embd, n_tokens, n_head], then R^T maps them to its head
            ggml_tensor * dir = ggml_view_2d(ctx, p.dir, n_kv, p.n_embd, p.dir->nb[1], 0);
            ggml_tensor * u = ggml_mul_mat(ctx, dir, ggml_reshape_2d(ctx, kqn, n_kv, kqn->ne[1]*kqn->ne[2]));
            u = ggml_reshape_3d(ctx, u, p.n_embd, kqn->ne[1], kqn->ne[2]);
            const size_t ef = ggml_element_size(p.rot_t);
            ggml_tensor * w = ggml_view_3d(ctx, p.rot_t, p.n_embd, n_embd_head_v, n_head_kv, ef*p.n_embd, ef*p.n_embd*n_embd_head_v, 0);
            kqv = ggml_mul_mat(ctx, w, u);
        } else {
            ggml_tensor * dir = ggml_view_3d(ctx, p.dir, n_kv, n_embd_head_v, n_head_kv, p.dir->nb[1], p.dir->nb[1]*n_embd_head_v, 0);
            kqv = ggml_mul_mat(ctx, dir, kqn);
            if (rot == LLAMA_MINICACHE_ROT_HEAD) {
                kqv = ggml_mul_mat(ctx, p.rot_t, kqv);
            }
        }

        if (dir_trans(p) && x == 0) {
            // layer a's exact cells: sum_s p_cell(s) x_s (free slots hold zero rows)
            ggml_tensor * rows_t = ggml_view_3d(ctx, p.rows, n_rows, n_embd_head_v, n_head_kv,
                    p.rows->nb[1], p.rows->nb[1]*n_embd_head_v, 0); // [n_rows, n_embd] stored transposed
            kqv = ggml_add(ctx, kqv, ggml_mul_mat(ctx, rows_t, gather_dim0(ctx, kq, inp.fold_idxs[ipv])));
        }
    }

    ggml_tensor * cur = ggml_permute(ctx, kqv, 0, 2, 1, 3); // [n_embd_head_v, n_head, n_tokens]

    return ggml_cont_2d(ctx, cur, cur->ne[0]*cur->ne[1], n_tokens);
}

//
// host side
//

int32_t llama_kv_minicache::take_slot(pool & p, uint32_t c) {
    if (p.free_slots.empty()) {
        return -1;
    }
    const int32_t s = p.free_slots.top();
    p.free_slots.pop();
    p.slot_of_cell[c] = s;
    p.cell_of_slot[s] = c;
    sync_norm(p, c);
    return s;
}

void llama_kv_minicache::free_slot(pool & p, int32_t s) {
    const int32_t c = p.cell_of_slot[s];
    p.cell_of_slot[s] = -1;
    p.free_slots.push(s);
    if (c >= 0) {
        p.slot_of_cell[c] = -1;
        sync_norm(p, c); // a merged cell is read as dir * norm from now on
    }

    // a free slot holds a zero row: the attention gathers weights for every slot
    p.pend_zero_slots.push_back(s);
}

float llama_kv_minicache::norm_value(const pool & p, uint32_t c, int x) const {
    if (p.slot_of_cell[c] >= 0) {
        return x == 0 ? 0.0f : 1.0f;
    }
    return merged[c] ? p.norm_host[x][c] : 0.0f;
}

void llama_kv_minicache::sync_norm(pool & p, uint32_t c) const {
    if (!p.norm_pending[c]) {
        p.norm_pending[c] = 1;
        p.pend_norm.push_back(c);
    }
}

void llama_kv_minicache::demote(pool & p, uint32_t c) {
    const int32_t s = p.slot_of_cell[c];
    GGML_ASSERT(s >= 0 && merged[c]);
    p.pend_demote.emplace_back(c, s);
    free_slot(p, s);
}

// maximal runs of consecutive ascending values: (first, count)
static std::vector<std::pair<uint32_t, uint32_t>> mc_runs(const std::vector<uint32_t> & v) {
    std::vector<std::pair<uint32_t, uint32_t>> res;
    for (uint32_t x : v) {
        if (!res.empty() && res.back().first + res.back().second == x) {
            res.back().second++;
        } else {
            res.emplace_back(x, 1);
        }
    }
    return res;
}

void llama_kv_minicache::row_ranges(const pool & p, const ggml_tensor * t, const std::vector<std::pair<uint32_t, uint32_t>> & runs,
        const std::function<void(size_t, size_t)> & fn) const {
    for (const auto & r : runs) {
        n_host_rows += r.second;
    }
    if (!dir_trans(p)) {
        for (const auto & [i0, n] : runs) {
            fn((size_t) i0*t->nb[1], (size_t) n*t->nb[1]);
        }
        return;
    }
    // element j of row i at j*nb[1] + i*es, as llama.cpp's transposed V
    const size_t es = ggml_type_size(t->type);
    for (uint32_t j = 0; j < p.n_embd; ++j) {
        for (const auto & [i0, n] : runs) {
            fn(j*t->nb[1] + (size_t) i0*es, (size_t) n*es);
        }
    }
}

std::vector<uint8_t> llama_kv_minicache::get_row_block(const pool & p, ggml_tensor * t, uint32_t i0, uint32_t n) const {
    std::vector<uint8_t> res((size_t) n*ggml_row_size(t->type, p.n_embd));
    size_t off = 0;
    row_ranges(p, t, { { i0, n } }, [&](size_t o, size_t size) {
        ggml_backend_tensor_get(t, res.data() + off, o, size);
        off += size;
    });
    return res;
}

void llama_kv_minicache::block_row(const pool & p, const uint8_t * block, uint32_t n, uint32_t i, uint8_t * row) const {
    const ggml_type type = type_of(p.kind);
    if (!dir_trans(p)) {
        const size_t rs = ggml_row_size(type, p.n_embd);
        memcpy(row, block + (size_t) i*rs, rs);
        return;
    }
    const size_t es = ggml_type_size(type);
    for (uint32_t j = 0; j < p.n_embd; ++j) {
        memcpy(row + j*es, block + ((size_t) j*n + i)*es, es);
    }
}


void llama_kv_minicache::release_cell(uint32_t c) {
    // only a staged or merged cell holds anything (a slot, a direction, norms)
    if (!staged[c] && !merged[c]) {
        return;
    }
    if (staged[c]) {
        staged[c] = 0;
        n_staged_cur--;
    }
    if (merged[c]) {
        merged[c] = 0;
        n_merged_cur--;
    }
    // nothing of the cell survives: a released cell reads as zero (not as old, maybe non-finite, data)
    for (auto & p : pools) {
        p.dist[c]         = 0.0f;
        p.norm_host[0][c] = 0.0f;
        p.norm_host[1][c] = 0.0f;
        const int32_t s = p.slot_of_cell[c];
        if (s >= 0) {
            free_slot(p, s); // the cell's (now 0) norms are written
        } else {
            sync_norm(p, c);
        }
        p.pend_zero_cells.push_back(c);
    }
}

void llama_kv_minicache::release_freed(const llama_kv_cells & cells) {
    for (uint32_t c = 0; c < kv_size; ++c) {
        if (cells.is_empty(c)) {
            release_cell(c);
        }
    }
}

void llama_kv_minicache::forget_freed(const llama_kv_cells & cells) {
    release_freed(cells);
    flush();
}

void llama_kv_minicache::prepare(const llama_kv_cells & cells, const std::vector<uint32_t> & new_cells) {
    // cells freed since the last ubatch (seq_rm, clear, ...) give their slots back
    release_freed(cells);

    for (uint32_t c : new_cells) {
        release_cell(c); // overwritten
    }

    const uint32_t n_new = (uint32_t) new_cells.size();
    if (n_new > n_stage) {
        throw std::runtime_error(format("a ubatch of %u tokens exceeds the staging pool (%u)", n_new, n_stage));
    }

    // tokens leaving the window, and enough of the oldest to make room for the new ones
    const int64_t n_over_window = (int64_t) n_staged_cur - params.window;
    const int64_t n_over_pool   = (int64_t) n_staged_cur + n_new - n_stage;
    const int64_t n_merge       = std::max<int64_t>({ 0, n_over_window, n_over_pool });

    if (n_merge > 0) {
        std::vector<uint32_t> order;
        order.reserve(n_staged_cur);
        for (uint32_t c = 0; c < kv_size; ++c) {
            if (staged[c]) {
                order.push_back(c);
            }
        }
        std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return stage_seq[a] < stage_seq[b]; });
        order.resize(n_merge);
        merge_cells(order);
    }

    for (const auto & p : pools) {
        if (p.free_slots.size() < n_new) {
            throw std::runtime_error(format("the exact-slot pool of %c layers %d-%d has %zu free slots for %u new tokens",
                    p.kind == KIND_K ? 'K' : 'V', p.il[0], p.il[1], p.free_slots.size(), n_new));
        }
    }

    for (uint32_t c : new_cells) {
        staged[c]    = 1;
        stage_seq[c] = stage_counter++;
        n_staged_cur++;
        for (auto & p : pools) {
            take_slot(p, c);
        }
    }

    // demoted directions, zeroed rows and norms reach the cache before the ubatch's graph reads it
    flush();
}

void llama_kv_minicache::merge_cells(const std::vector<uint32_t> & cells_to_merge) {
    const int64_t n = (int64_t) cells_to_merge.size();

    // norms and distances of the cells leaving the window, computed where the pools live: one graph per
    // backend, one [3n] block of scalars per pool comes back
    std::vector<std::vector<float>> stats(pools.size());
    if (pools[0].dir->buffer) {
        init_backends();
    }
    for (size_t ib = 0; ib < backends.size(); ++ib) {
        std::vector<size_t> mine;
        for (size_t ip = 0; ip < pools.size(); ++ip) {
            if (backend_of(pools[ip].dir) == ib) {
                mine.push_back(ip);
            }
        }
        if (mine.empty()) {
            continue;
        }
        ggml_init_params ip0 = { ggml_tensor_overhead()*(256*mine.size() + 16) + ggml_graph_overhead_custom(256*mine.size(), false), nullptr, true };
        ggml_context_ptr ctx_ptr(ggml_init(ip0)); // freed on every path out, errors included
        ggml_context * ctx = ctx_ptr.get();
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, 256*mine.size(), false);
        std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> inputs;
        // the pools of one row width share the merge's ops (their rows side by side): while decoding
        // each pool merges one row, and a graph of per-pool ops is mostly per-op overhead
        const std::vector<std::vector<size_t>> groups = width_groups(mine);
        ggml_tensor * out = nullptr;
        for (const auto & g : groups) {
            std::vector<std::vector<int32_t>> slots(g.size(), std::vector<int32_t>(n)), cells(g.size(), std::vector<int32_t>(n));
            for (size_t k = 0; k < g.size(); ++k) {
                const auto & p = pools[g[k]];
                for (int64_t i = 0; i < n; ++i) {
                    const uint32_t c = cells_to_merge[i];
                    if (p.slot_of_cell[c] < 0) {
                        throw std::runtime_error(format("cell %u is staged without an exact slot", c));
                    }
                    slots[k][i] = p.slot_of_cell[c];
                    cells[k][i] = (int32_t) c;
                }
            }
            ggml_tensor * x[3];
            merge_inputs(ctx, g, slots, cells, inputs, x);
            ggml_tensor * st = build_merge(ctx, x[0], x[1], x[2], nullptr); // [3 n |g|]: norms a, norms b, distances
            out = out ? ggml_concat(ctx, out, st, 0) : st;
        }
        ggml_set_output(out);
        ggml_build_forward_expand(gf, out);
        compute(ib, gf, inputs);
        std::vector<float> buf(ggml_nelements(out));
        ggml_backend_tensor_get(out, buf.data(), 0, ggml_nbytes(out));
        size_t off = 0;
        for (const auto & g : groups) {
            const int64_t nn = n*(int64_t) g.size();
            for (size_t k = 0; k < g.size(); ++k) {
                auto & st = stats[g[k]];
                st.resize(3*n);
                for (int x = 0; x < 3; ++x) {
                    std::copy_n(buf.begin() + off + x*nn + k*n, n, st.begin() + x*n);
                }
            }
            off += 3*nn;
        }
    }

    for (size_t ip = 0; ip < pools.size(); ++ip) {
        auto & p = pools[ip];
        const std::vector<float> & st = stats[ip];
        for (int64_t i = 0; i < n; ++i) {
            const uint32_t c = cells_to_merge[i];
            // the norm tensors keep 0 / 1 while the cell keeps its slot (see sync_norm)
            p.norm_host[0][c] = st.empty() ? 0.0f : st[i];
            p.norm_host[1][c] = st.empty() ? 0.0f : st[n + i];
            p.dist[c]         = st.empty() ? 0.0f : st[2*n + i];
        }
    }

    for (uint32_t c : cells_to_merge) {
        staged[c] = 0;
        merged[c] = 1;
    }
    n_staged_cur -= (uint32_t) n;
    n_merged_cur += (uint32_t) n;

    for (auto & p : pools) {
        retain(p);
    }
}

void llama_kv_minicache::retain(pool & p) {
    // candidates: every merged cell that owns a slot, i.e. the retained ones and the newly merged
    // ones (marked merged already, still in their staging slot)
    std::vector<uint32_t> cand;
    for (uint32_t s = 0; s < n_slots; ++s) {
        const int32_t c = p.cell_of_slot[s];
        if (c >= 0 && merged[c]) {
            cand.push_back(c);
        }
    }

    uint32_t k = 0;
    if (params.retention == LLAMA_MINICACHE_RETAIN_TOPK) {
        k = std::min(mc_retain_count(n_merged_cur, params.gamma), n_retain_max);
    } else {
        // the paper's Eq. 4 over every merged token of this pool, bounded by the pool capacity
        float dmin = INFINITY, dmax = -INFINITY;
        for (uint32_t c = 0; c < kv_size; ++c) {
            if (merged[c]) {
                dmin = std::min(dmin, p.dist[c]);
                dmax = std::max(dmax, p.dist[c]);
            }
        }
        const double thr = dmin + (double) (dmax - dmin)*(1.0 - (double) params.gamma);
        k = std::min<uint32_t>((uint32_t) std::count_if(cand.begin(), cand.end(),
                [&](uint32_t c) { return (double) p.dist[c] > thr; }), n_retain_max);
    }

    // most distinct first; ties: the older token first (token order, as the reference)
    std::stable_sort(cand.begin(), cand.end(), [&](uint32_t a, uint32_t b) {
        if (p.dist[a] != p.dist[b]) {
            return p.dist[a] > p.dist[b];
        }
        return stage_seq[a] < stage_seq[b];
    });

    // the rest give their slot up (they fall back to dir * norm)
    for (size_t i = k; i < cand.size(); ++i) {
        demote(p, cand[i]);
    }
}

//
// the merge step on the device: small graphs of ggml ops on the backend holding the pool tensors, so
// that CPU, CUDA, RPC, ... buffers are merged in place (only indices and per-cell scalars cross)
//

size_t llama_kv_minicache::backend_of(const ggml_tensor * t) {
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(t->buffer);
    for (size_t i = 0; i < backends.size(); ++i) {
        if (backends[i].buft == buft) {
            return i;
        }
    }
    merge_backend be;
    be.buft = buft;
    if (ggml_backend_buffer_is_host(t->buffer)) {
        // host memory (CPU or pinned buffers): the CPU backend reads it in place
        be.backend = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    } else if (ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft)) {
        be.backend = ggml_backend_dev_init(dev, nullptr);
    }
    if (!be.backend) {
        throw std::runtime_error(format("no backend can run the merge step on the cache's %s buffer", ggml_backend_buft_name(buft)));
    }
    ggml_backend_dev_t dev = ggml_backend_get_device(be.backend);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    auto * set_n_threads = reg ? (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : nullptr;
    if (set_n_threads) {
        // one thread: the graphs are hundreds of tiny ops (a few rows each while decoding), where a
        // thread barrier per op costs more than the op (measured: 2 threads decode 10% slower at 4k)
        set_n_threads(be.backend, 1);
    }
    be.galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be.backend));
    backends.push_back(be);
    return backends.size() - 1;
}

void llama_kv_minicache::init_backends() {
    for (const auto & p : pools) {
        for (const ggml_tensor * t : { p.dir, p.rows, p.norm[0], p.norm[1] }) {
            backend_of(t);
        }
    }
}

void llama_kv_minicache::compute(size_t ib, ggml_cgraph * gf, const std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs) {
    merge_backend & be = backends[ib];
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        const ggml_tensor * node = ggml_graph_node(gf, i);
        if (!ggml_backend_supports_op(be.backend, node)) {
            throw std::runtime_error(format("the %s backend cannot run %s of %s rows (the merge step of %s)", ggml_backend_name(be.backend),
                    ggml_op_desc(node), ggml_type_name(node->src[0] ? node->src[0]->type : node->type), node->name));
        }
    }
    if (!ggml_gallocr_alloc_graph(be.galloc, gf)) {
        throw std::runtime_error(format("the merge step could not allocate its %s buffer", ggml_backend_name(be.backend)));
    }
    for (const auto & in : inputs) {
        ggml_backend_tensor_set(in.first, in.second.data(), 0, in.second.size());
    }
    if (n_graphs == fail_graph) {
        fail_graph = -1;
        throw std::runtime_error(format("the merge step failed on the %s backend (LLAMA_MINICACHE_FAIL_GRAPH)", ggml_backend_name(be.backend)));
    }
    if (ggml_backend_graph_compute(be.backend, gf) != GGML_STATUS_SUCCESS) {
        throw std::runtime_error(format("the merge step failed on the %s backend", ggml_backend_name(be.backend)));
    }
    n_graphs++;
}

template <typename T>
static ggml_tensor * mc_input(ggml_context * ctx, ggml_type type, const std::vector<T> & v,
        std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs) {
    ggml_tensor * t = ggml_new_tensor_1d(ctx, type, (int64_t) v.size());
    ggml_set_input(t);
    const uint8_t * b = (const uint8_t *) v.data();
    inputs.emplace_back(t, std::vector<uint8_t>(b, b + sizeof(T)*v.size()));
    return t;
}

ggml_tensor * llama_kv_minicache::gather(ggml_context * ctx, const pool & p, ggml_tensor * t, const std::vector<int32_t> & idx,
        std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs) const {
    const int64_t n = (int64_t) idx.size();
    const int64_t d = p.n_embd;
    if (!dir_trans(p)) {
        return ggml_get_rows(ctx, t, mc_input(ctx, GGML_TYPE_I32, idx, inputs)); // F32 [d, n]
    }
    // stored transposed ([rows, d]): each element is a one-value row of t viewed as [1, rows*d]
    std::vector<int32_t> el(n*d);
    for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < d; ++j) {
            el[i*d + j] = (int32_t) (j*t->ne[0] + idx[i]);
        }
    }
    ggml_tensor * r = ggml_get_rows(ctx, ggml_reshape_2d(ctx, t, 1, t->ne[0]*t->ne[1]), mc_input(ctx, GGML_TYPE_I32, el, inputs));
    return ggml_reshape_2d(ctx, r, d, n);
}

ggml_tensor * llama_kv_minicache::scatter(ggml_context * ctx, ggml_tensor * t, ggml_tensor * src, const std::vector<int32_t> & idx, bool trans,
        std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs) const {
    const int64_t n = (int64_t) idx.size();
    const int64_t d = src->ne[0];
    if (!trans) {
        const std::vector<int64_t> rows(idx.begin(), idx.end());
        return ggml_set_rows(ctx, t, src, mc_input(ctx, GGML_TYPE_I64, rows, inputs));
    }
    // stored transposed: one-value rows, as gather()
    std::vector<int64_t> el(n*d);
    for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < d; ++j) {
            el[i*d + j] = j*t->ne[0] + idx[i];
        }
    }
    return ggml_set_rows(ctx, ggml_reshape_2d(ctx, t, 1, t->ne[0]*t->ne[1]), ggml_reshape_2d(ctx, src, 1, n*d),
            mc_input(ctx, GGML_TYPE_I64, el, inputs));
}

ggml_tensor * llama_kv_minicache::rotate(ggml_context * ctx, const pool & p, ggml_tensor * x) const {
    // out[j] = sum_i x[i] R[i][j]: src0 element (i, j) = R[i][j], the K layout (R^T row-major); V stores R
    const int64_t n  = x->ne[1];
    const int64_t dh = p.n_embd_head;
    const int64_t nh = p.n_head_kv;
    if (p.rot == LLAMA_MINICACHE_ROT_FULL) {
        ggml_tensor * a = p.kind == KIND_K ? p.rot_t : ggml_cont(ctx, ggml_transpose(ctx, p.rot_t));
        return ggml_mul_mat(ctx, a, x);
    }
    ggml_tensor * a = p.kind == KIND_K ? p.rot_t : ggml_cont(ctx, ggml_permute(ctx, p.rot_t, 1, 0, 2, 3));
    ggml_tensor * b = ggml_permute(ctx, ggml_reshape_3d(ctx, x, dh, nh, n), 0, 2, 1, 3); // [dh, n, nh]
    ggml_tensor * res = ggml_mul_mat(ctx, a, b);                                          // [dh, n, nh]
    return ggml_reshape_2d(ctx, ggml_cont(ctx, ggml_permute(ctx, res, 0, 2, 1, 3)), dh*nh, n);
}

// a, then b beside it (columns: [d, n_a + n_b])
static ggml_tensor * mc_cat(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b) {
    return a ? ggml_concat(ctx, a, b, 1) : b;
}

void llama_kv_minicache::merge_inputs(ggml_context * ctx, const std::vector<size_t> & group,
        const std::vector<std::vector<int32_t>> & slots, const std::vector<std::vector<int32_t>> & cells,
        std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs, ggml_tensor * out[3]) const {
    out[0] = out[1] = out[2] = nullptr;
    for (size_t k = 0; k < group.size(); ++k) {
        const pool & p = pools[group[k]];
        ggml_tensor * x0 = gather(ctx, p, p.rows, slots[k], inputs);
        out[0] = mc_cat(ctx, out[0], x0);
        out[1] = mc_cat(ctx, out[1], p.rot != LLAMA_MINICACHE_ROT_NONE ? rotate(ctx, p, x0) : x0);
        out[2] = mc_cat(ctx, out[2], gather(ctx, p, p.dir, cells[k], inputs));
    }
}

std::vector<std::vector<size_t>> llama_kv_minicache::width_groups(const std::vector<size_t> & ips) const {
    std::vector<std::vector<size_t>> groups;
    for (size_t ip : ips) {
        auto it = std::find_if(groups.begin(), groups.end(), [&](const std::vector<size_t> & g) { return pools[g[0]].n_embd == pools[ip].n_embd; });
        if (it == groups.end()) {
            groups.push_back({ ip });
        } else {
            it->push_back(ip);
        }
    }
    return groups;
}

// 1 - a
static ggml_tensor * mc_one_minus(ggml_context * ctx, ggml_tensor * a) {
    return ggml_scale_bias(ctx, a, -1.0f, 1.0f);
}

// norms of the rows of x [d, n]: [1, n]
static ggml_tensor * mc_norm(ggml_context * ctx, ggml_tensor * x) {
    return ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, x)));
}

// x / nrm, 0 where nrm is 0
static ggml_tensor * mc_unit(ggml_context * ctx, ggml_tensor * x, ggml_tensor * nrm) {
    return ggml_div(ctx, x, ggml_add(ctx, nrm, mc_one_minus(ctx, ggml_step(ctx, nrm))));
}

// acos(x) for x in [0, 1]: sqrt(1 - x) P(x), |error| <= 2e-8 (Abramowitz & Stegun 4.4.46; ggml has no acos)
static ggml_tensor * mc_acos01(ggml_context * ctx, ggml_tensor * x) {
    static const float a[8] = { 1.5707963050f, -0.2145988016f, 0.0889789874f, -0.0501743046f,
                                0.0308918810f, -0.0170881256f, 0.0066700901f, -0.0012624911f };
    ggml_tensor * p = ggml_scale_bias(ctx, x, a[7], a[6]);
    for (int k = 5; k >= 0; --k) {
        p = ggml_scale_bias(ctx, ggml_mul(ctx, p, x), 1.0f, a[k]);
    }
    return ggml_mul(ctx, ggml_sqrt(ctx, ggml_clamp(ctx, mc_one_minus(ctx, x), 0.0f, 1.0f)), p);
}

ggml_tensor * llama_kv_minicache::build_merge(ggml_context * ctx, ggml_tensor * x0, ggml_tensor * r0, ggml_tensor * x1, ggml_tensor ** dir) const {
    // the native core's merge (minicache_merge) in f32 ops: norms of the unrotated rows, units (an
    // aligned pool's layer a rotated and normalized by its own norm), the angle, SLERP
    const float t   = params.t;
    const float eps = 1e-6f; // MINICACHE_ANGLE_EPS

    ggml_tensor * n0 = mc_norm(ctx, x0);
    ggml_tensor * n1 = mc_norm(ctx, x1);
    ggml_tensor * u0 = mc_unit(ctx, r0, mc_norm(ctx, r0)); // r0 = x0 without a rotation: its norm is n0
    ggml_tensor * u1 = mc_unit(ctx, x1, n1);

    ggml_tensor * nz0  = ggml_step(ctx, n0); // 1: layer a's row is not zero
    ggml_tensor * nz1  = ggml_step(ctx, n1);
    ggml_tensor * both = ggml_mul(ctx, nz0, nz1);

    // half angle h = atan2(|u0 - u1|, |u0 + u1|), from the smaller of its sine and cosine (accurate near 0
    // and near pi/2, as the core's atan2)
    ggml_tensor * dm  = ggml_sum_rows(ctx, ggml_sqr(ctx, ggml_sub(ctx, u0, u1)));
    ggml_tensor * dp  = ggml_sum_rows(ctx, ggml_sqr(ctx, ggml_add(ctx, u0, u1)));
    ggml_tensor * tot = ggml_add(ctx, dm, dp);
    tot = ggml_add(ctx, tot, mc_one_minus(ctx, ggml_step(ctx, tot))); // both rows zero: no 0/0
    ggml_tensor * s = ggml_clamp(ctx, ggml_sqrt(ctx, ggml_div(ctx, dm, tot)), 0.0f, 1.0f);
    ggml_tensor * c = ggml_clamp(ctx, ggml_sqrt(ctx, ggml_div(ctx, dp, tot)), 0.0f, 1.0f);
    ggml_tensor * m = ggml_step(ctx, ggml_sub(ctx, c, s)); // 1: h < pi/4, asin(s) = pi/2 - acos(s)
    ggml_tensor * h = ggml_add(ctx,
            ggml_mul(ctx, m,                   ggml_scale_bias(ctx, mc_acos01(ctx, s), -1.0f, (float) M_PI_2)),
            ggml_mul(ctx, mc_one_minus(ctx, m), mc_acos01(ctx, c)));
    ggml_tensor * omega = ggml_scale(ctx, h, 2.0f);
    ggml_tensor * dist  = ggml_mul(ctx, ggml_scale(ctx, omega, (float) (1.0/M_PI)), both); // a zero row: 0

    if (dir) {
        // below eps, or within eps of pi, the blend is linear (the core turns antipodal rows towards a
        // fixed perpendicular instead: rows exactly opposite up to 1e-6 rad)
        ggml_tensor * lin = ggml_add(ctx,
                ggml_step(ctx, ggml_scale_bias(ctx, omega, -1.0f, eps)),
                ggml_step(ctx, ggml_scale_bias(ctx, omega,  1.0f, eps - (float) M_PI)));
        ggml_tensor * so = ggml_add(ctx, ggml_sin(ctx, omega), lin); // no division by 0 where linear
        ggml_tensor * nl = mc_one_minus(ctx, lin);
        ggml_tensor * w0 = ggml_div(ctx, ggml_sin(ctx, ggml_scale(ctx, omega, 1.0f - t)), so);
        ggml_tensor * w1 = ggml_div(ctx, ggml_sin(ctx, ggml_scale(ctx, omega, t)), so);
        w0 = ggml_add(ctx, ggml_mul(ctx, w0, nl), ggml_scale(ctx, lin, 1.0f - t));
        w1 = ggml_add(ctx, ggml_mul(ctx, w1, nl), ggml_scale(ctx, lin, t));
        // a zero row: the other row's direction
        w0 = ggml_add(ctx, ggml_mul(ctx, w0, both), ggml_mul(ctx, nz0, mc_one_minus(ctx, nz1)));
        w1 = ggml_add(ctx, ggml_mul(ctx, w1, both), mc_one_minus(ctx, nz0));
        *dir = ggml_add(ctx, ggml_mul(ctx, u0, w0), ggml_mul(ctx, u1, w1));
    }

    ggml_tensor * st = ggml_concat(ctx, ggml_reshape_1d(ctx, n0, n0->ne[1]), ggml_reshape_1d(ctx, n1, n1->ne[1]), 0);
    return ggml_concat(ctx, st, ggml_reshape_1d(ctx, dist, dist->ne[1]), 0);
}

void llama_kv_minicache::flush() {
    bool any = false;
    for (const auto & p : pools) {
        any = any || !p.pend_demote.empty() || !p.pend_zero_slots.empty() || !p.pend_zero_cells.empty() || !p.pend_norm.empty();
    }
    if (!any) {
        return;
    }
    if (!pools[0].dir->buffer) {
        // no buffers (a model loaded without allocating): nothing to write
        for (auto & p : pools) {
            drop_pending(p);
        }
        return;
    }

    init_backends();

    // two rounds: the demoted cells' directions (reading their exact rows), then what frees, zeroes and
    // scales (the rows read in the first round are zeroed in the second). A round-0 graph overwrites
    // the rows it reads, so its pools' demotions are dropped as soon as it has run; everything else is
    // dropped after round 1. Every write of round 1 is idempotent: a flush that fails anywhere leaves
    // pending exactly what has not been written, and the next flush completes it.
    for (int round = 0; round < 2; ++round) {
        for (size_t ib = 0; ib < backends.size(); ++ib) {
            const size_t n_graph = 64 + 256*pools.size();
            ggml_init_params ip0 = { ggml_tensor_overhead()*n_graph + ggml_graph_overhead_custom(n_graph, false), nullptr, true };
            ggml_context_ptr ctx_ptr(ggml_init(ip0));
            ggml_context * ctx = ctx_ptr.get();
            ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_graph, false);
            std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> inputs;

            std::vector<size_t> mine;
            if (round == 0) {
                for (size_t ip = 0; ip < pools.size(); ++ip) {
                    if (!pools[ip].pend_demote.empty() && backend_of(pools[ip].dir) == ib) {
                        mine.push_back(ip);
                    }
                }
                // one merge per row width, the pools side by side (see merge_cells)
                for (const auto & g : width_groups(mine)) {
                    std::vector<std::vector<int32_t>> slots(g.size()), cells(g.size());
                    for (size_t k = 0; k < g.size(); ++k) {
                        for (const auto & cs : pools[g[k]].pend_demote) {
                            cells[k].push_back((int32_t) cs.first);
                            slots[k].push_back(cs.second);
                        }
                    }
                    ggml_tensor * x[3];
                    merge_inputs(ctx, g, slots, cells, inputs, x);
                    ggml_tensor * d = nullptr;
                    build_merge(ctx, x[0], x[1], x[2], &d);
                    int64_t off = 0;
                    for (size_t k = 0; k < g.size(); ++k) {
                        const pool & p = pools[g[k]];
                        const int64_t m = (int64_t) cells[k].size();
                        ggml_tensor * dk = ggml_view_2d(ctx, d, d->ne[0], m, d->nb[1], off*d->nb[1]);
                        ggml_build_forward_expand(gf, scatter(ctx, p.dir, dk, cells[k], dir_trans(p), inputs));
                        off += m;
                    }
                }
            }
            for (auto & p : pools) {
                if (round == 0) {
                    break;
                }
                const auto zero_rows = [&](ggml_tensor * t, std::vector<int32_t> idx) {
                    std::sort(idx.begin(), idx.end());
                    idx.erase(std::unique(idx.begin(), idx.end()), idx.end());
                    ggml_tensor * z = ggml_fill(ctx, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, p.n_embd, (int64_t) idx.size()), 0.0f);
                    ggml_build_forward_expand(gf, scatter(ctx, t, z, idx, dir_trans(p), inputs));
                };
                if (!p.pend_zero_slots.empty() && backend_of(p.rows) == ib) {
                    zero_rows(p.rows, p.pend_zero_slots);
                }
                if (!p.pend_zero_cells.empty() && backend_of(p.dir) == ib) {
                    zero_rows(p.dir, std::vector<int32_t>(p.pend_zero_cells.begin(), p.pend_zero_cells.end()));
                }
                for (int x = 0; x < 2; ++x) {
                    if (p.pend_norm.empty() || backend_of(p.norm[x]) != ib) {
                        continue;
                    }
                    std::vector<float> v;
                    std::vector<int32_t> idx;
                    for (uint32_t c : p.pend_norm) {
                        v.push_back(norm_value(p, c, x));
                        idx.push_back((int32_t) c);
                    }
                    ggml_tensor * src = ggml_reshape_2d(ctx, mc_input(ctx, GGML_TYPE_F32, v, inputs), 1, (int64_t) v.size());
                    ggml_build_forward_expand(gf, scatter(ctx, p.norm[x], src, idx, false, inputs));
                }
            }

            if (ggml_graph_n_nodes(gf) > 0) {
                compute(ib, gf, inputs);
            }
            for (size_t ip : mine) {
                pools[ip].pend_demote.clear();
            }
        }
    }

    for (auto & p : pools) {
        drop_pending(p);
    }
}

void llama_kv_minicache::drop_pending(pool & p) {
    p.pend_demote.clear();
    p.pend_zero_slots.clear();
    p.pend_zero_cells.clear();
    for (uint32_t c : p.pend_norm) {
        p.norm_pending[c] = 0;
    }
    p.pend_norm.clear();
}

void llama_kv_minicache::clear() {
    // every cell and slot back to the state of a new cache, tensors zeroed in bulk
    for (auto & p : pools) {
        for (ggml_tensor * t : { p.dir, p.norm[0], p.norm[1], p.rows }) {
            if (t->buffer) {
                ggml_backend_tensor_memset(t, 0, 0, ggml_nbytes(t));
            }
        }
        std::fill(p.slot_of_cell.begin(), p.slot_of_cell.end(), -1);
        std::fill(p.cell_of_slot.begin(), p.cell_of_slot.end(), -1);
        std::fill(p.dist.begin(), p.dist.end(), 0.0f);
        std::fill(p.norm_host[0].begin(), p.norm_host[0].end(), 0.0f);
        std::fill(p.norm_host[1].begin(), p.norm_host[1].end(), 0.0f);
        p.free_slots = {};
        for (uint32_t s = 0; s < n_slots; ++s) {
            p.free_slots.push((int32_t) s);
        }
        drop_pending(p);
    }
    std::fill(staged.begin(), staged.end(), 0);
    std::fill(merged.begin(), merged.end(), 0);
    std::fill(stage_seq.begin(), stage_seq.end(), 0);
    n_staged_cur  = 0;
    n_merged_cur  = 0;
    stage_counter = 0;

    // the cache clears its buffers with the data: the rotations are written again
    upload_rotations();
}

//
// state
//

static constexpr uint32_t MC_STATE_MAGIC   = 0x564B434D; // "MCKV"
static constexpr uint32_t MC_STATE_VERSION = 7;

// what a state depends on: retention, window, the slot capacities (from n_ctx and n_ubatch), the
// cache types and llama.cpp's Hadamard blocks (the basis of the stored rows), the pools
static constexpr size_t MC_LAYOUT_HEAD = 10;

std::vector<int32_t> llama_kv_minicache::layout_desc() const {
    std::vector<int32_t> res = { params.retention, params.window, (int32_t) kv_size, (int32_t) n_stage, (int32_t) n_retain_max,
        (int32_t) type_k, (int32_t) type_v, (int32_t) n_attn_rot[KIND_K], (int32_t) n_attn_rot[KIND_V], (int32_t) pools.size() };
    for (const auto & p : pools) {
        res.push_back(p.kind);
        res.push_back(p.il[0]);
        res.push_back(p.rot);
        res.push_back((int32_t) (p.r_hash & 0xffffffffu));
        res.push_back((int32_t) (p.r_hash >> 32));
    }
    return res;
}

static std::string layout_str(const std::vector<int32_t> & l, float t, float gamma) {
    const auto type_name = [](int32_t t) { return t >= 0 && t < GGML_TYPE_COUNT ? ggml_type_name((ggml_type) t) : "?"; };
    std::string res = format("retention %d, window %d, %d cells, %d staging + %d retention slots, K %s, V %s, "
            "Hadamard K %d V %d, t %.3f, gamma %.3f, %d pools:",
            l[0], l[1], l[2], l[3], l[4], type_name(l[5]), type_name(l[6]), l[7], l[8], t, gamma, l[9]);
    for (size_t i = MC_LAYOUT_HEAD; i + 4 < l.size(); i += 5) {
        res += format(" %c(%d,%d)%s", l[i] == 0 ? 'K' : 'V', l[i + 1], l[i + 1] + 1,
                l[i + 2] == LLAMA_MINICACHE_ROT_FULL ? "+R" : l[i + 2] == LLAMA_MINICACHE_ROT_HEAD ? "+Rh" : "");
    }
    return res;
}

void llama_kv_minicache::state_write(llama_io_write_i & io, const std::vector<uint32_t> & cells) const {
    io.write(&MC_STATE_MAGIC,   sizeof(MC_STATE_MAGIC));
    io.write(&MC_STATE_VERSION, sizeof(MC_STATE_VERSION));

    // the layout (pools and their rotations): a reader must have the same one
    const std::vector<int32_t> layout = layout_desc();
    const uint32_t n_layout = layout.size();
    io.write(&n_layout, sizeof(n_layout));
    io.write(layout.data(), sizeof(int32_t)*n_layout);
    io.write(&params.t,     sizeof(params.t));
    io.write(&params.gamma, sizeof(params.gamma));

    const uint32_t n_cells = cells.size();
    io.write(&n_cells, sizeof(n_cells));

    for (uint32_t c : cells) {
        const uint8_t  st  = staged[c] ? LLAMA_MINICACHE_CELL_STAGED : merged[c] ? LLAMA_MINICACHE_CELL_MERGED : LLAMA_MINICACHE_CELL_EMPTY;
        const uint64_t seq = stage_seq[c];
        io.write(&st,  sizeof(st));
        io.write(&seq, sizeof(seq));
    }

    // per pool: each cell's slot (-1: none) and distance and norms (0 for a staged cell); the exact rows
    // of layer a in the slots held, by runs of consecutive slots; dir of every cell (layer b's exact row
    // while the cell has a slot, else its direction), by runs of consecutive cells. Rows go straight from
    // the tensors to the writer, one copy per range (a size query reads nothing)
    for (const auto & p : pools) {
        std::vector<int32_t>  slots(n_cells);
        std::vector<float>    meta(3*(size_t) n_cells, 0.0f);
        std::vector<uint32_t> held;
        for (uint32_t i = 0; i < n_cells; ++i) {
            const uint32_t c = cells[i];
            slots[i] = p.slot_of_cell[c];
            if (slots[i] >= 0) {
                held.push_back((uint32_t) slots[i]);
            }
            if (merged[c]) {
                meta[3*i + 0] = p.dist[c];
                meta[3*i + 1] = p.norm_host[0][c];
                meta[3*i + 2] = p.norm_host[1][c];
            }
        }
        io.write(slots.data(), sizeof(int32_t)*slots.size());
        io.write(meta.data(),  sizeof(float)*meta.size());
        std::sort(held.begin(), held.end());
        row_ranges(p, p.rows, mc_runs(held),  [&](size_t off, size_t size) { io.write_tensor(p.rows, off, size); });
        row_ranges(p, p.dir,  mc_runs(cells), [&](size_t off, size_t size) { io.write_tensor(p.dir,  off, size); });
    }
}

void llama_kv_minicache::state_read(llama_io_read_i & io, const llama_kv_cells & kv_cells, const std::vector<uint32_t> & cells) {
    try {
        state_read_checked(io, kv_cells, cells);
    } catch (const std::exception & e) {
        llama_minicache_set_error(std::string("the KV state was refused: ") + e.what());
        throw;
    }
}

void llama_kv_minicache::state_read_checked(llama_io_read_i & io, const llama_kv_cells & kv_cells, const std::vector<uint32_t> & cells) {
    uint32_t magic, version;
    io.read(&magic,   sizeof(magic));
    io.read(&version, sizeof(version));
    if (magic != MC_STATE_MAGIC || version != MC_STATE_VERSION) {
        throw std::runtime_error(format("not a MiniCache KV state of this version (magic %08x, version %u; expected %08x, %u)",
                magic, version, MC_STATE_MAGIC, MC_STATE_VERSION));
    }

    const std::vector<int32_t> mine = layout_desc();
    uint32_t n_layout;
    io.read(&n_layout, sizeof(n_layout));
    if (n_layout < MC_LAYOUT_HEAD || n_layout > MC_LAYOUT_HEAD + 5*4096u || (n_layout - MC_LAYOUT_HEAD) % 5 != 0) {
        throw std::runtime_error(format("MiniCache state: invalid layout size %u", n_layout));
    }
    std::vector<int32_t> layout(n_layout);
    float t, gamma;
    io.read(layout.data(), sizeof(int32_t)*n_layout);
    io.read(&t,     sizeof(t));
    io.read(&gamma, sizeof(gamma));
    if (layout != mine || t != params.t || gamma != params.gamma) {
        throw std::runtime_error(format("the state was saved with another MiniCache layout (%s); this cache: %s "
                "(a state loads into a context with the same n_ctx, n_ubatch and kv_merge settings)",
                layout_str(layout, t, gamma).c_str(), layout_str(mine, params.t, params.gamma).c_str()));
    }

    uint32_t n_cells;
    io.read(&n_cells, sizeof(n_cells));
    if (n_cells != cells.size()) {
        throw std::runtime_error(format("MiniCache state holds %u cells, the KV state %zu", n_cells, cells.size()));
    }

    // cells freed by the restore (seq_rm, clear) and the destination cells start over
    forget_freed(kv_cells);
    for (uint32_t c : cells) {
        if (c >= kv_size) {
            throw std::runtime_error(format("MiniCache state: cell %u is outside the cache (%u cells)", c, kv_size));
        }
        release_cell(c);
    }
    flush(); // the zeroed cells before the state's rows are written over them

    // the state places its cells in given slots: the free ones are the others
    const auto rebuild_free_slots = [this]() {
        for (auto & p : pools) {
            p.free_slots = {};
            for (uint32_t s = 0; s < n_slots; ++s) {
                if (p.cell_of_slot[s] < 0) {
                    p.free_slots.push((int32_t) s);
                }
            }
        }
    };
    try {
        state_read_cells(io, cells);
        rebuild_free_slots();
        flush();
    } catch (...) {
        // a refused state leaves no trace: its cells read as empty
        rebuild_free_slots();
        for (uint32_t c : cells) {
            release_cell(c);
        }
        flush();
        throw;
    }
}

void llama_kv_minicache::state_read_cells(llama_io_read_i & io, const std::vector<uint32_t> & cells) {
    const uint32_t n_cells = cells.size();
    uint64_t seq_max = stage_counter;
    for (uint32_t c : cells) {
        uint8_t  st;
        uint64_t seq;
        io.read(&st,  sizeof(st));
        io.read(&seq, sizeof(seq));
        if (st != LLAMA_MINICACHE_CELL_STAGED && st != LLAMA_MINICACHE_CELL_MERGED) {
            throw std::runtime_error(format("MiniCache state: invalid cell state %u", st));
        }
        if (seq >= (1ull << 62)) {
            throw std::runtime_error(format("MiniCache state: invalid staging order %llu", (unsigned long long) seq));
        }
        if (staged[c] || merged[c]) {
            throw std::runtime_error(format("MiniCache state: cell %u appears twice", c));
        }
        if (st == LLAMA_MINICACHE_CELL_STAGED) {
            if (n_staged_cur >= n_stage) {
                throw std::runtime_error(format("MiniCache state: more staged tokens than the staging pool holds (%u)", n_stage));
            }
            staged[c] = 1;
            n_staged_cur++;
        } else {
            merged[c] = 1;
            n_merged_cur++;
        }
        stage_seq[c] = seq;
        seq_max = std::max(seq_max, seq + 1);
    }

    // the ranges of state_write(), read into the host and copied to the tensor one range at a time
    std::vector<uint8_t> buf;
    const auto read_rows = [&](const pool & p, ggml_tensor * t, const std::vector<uint32_t> & idx) {
        row_ranges(p, t, mc_runs(idx), [&](size_t off, size_t size) {
            buf.resize(size);
            io.read(buf.data(), size);
            ggml_backend_tensor_set(t, buf.data(), off, size);
        });
    };

    for (auto & p : pools) {
        std::vector<int32_t> slots(n_cells);
        std::vector<float>   meta(3*(size_t) n_cells);
        io.read(slots.data(), sizeof(int32_t)*slots.size());
        io.read(meta.data(),  sizeof(float)*meta.size());
        uint32_t n_retained = 0;
        std::vector<uint32_t> held;
        for (uint32_t i = 0; i < n_cells; ++i) {
            const uint32_t c = cells[i];
            const int32_t  s = slots[i];
            if (merged[c]) {
                const float d = meta[3*i + 0];
                const float n[2] = { meta[3*i + 1], meta[3*i + 2] };
                // a distance is in [0, 1] (NaN would break the retention order); a norm is >= 0 or
                // NaN/Inf (the core's marker for a non-finite row)
                if (!(d >= 0.0f && d <= 1.0f) || n[0] < 0.0f || n[1] < 0.0f) {
                    throw std::runtime_error(format("MiniCache state: cell %u has distance %g and norms %g, %g "
                            "(expected a distance in [0, 1] and norms >= 0)", c, d, n[0], n[1]));
                }
                p.dist[c]         = d;
                p.norm_host[0][c] = n[0];
                p.norm_host[1][c] = n[1];
            }
            if (s < -1 || s >= (int32_t) n_slots || (staged[c] && s < 0)) {
                throw std::runtime_error(format("MiniCache state: cell %u has slot %d (expected -1 or a slot below %u; "
                        "a staged cell has one)", c, s, n_slots));
            }
            if (s >= 0) {
                if (merged[c] && n_retained++ >= n_retain_max) {
                    throw std::runtime_error(format("MiniCache state: more retained tokens than the retention pool holds (%u)",
                            n_retain_max));
                }
                if (p.cell_of_slot[s] >= 0) {
                    throw std::runtime_error(format("MiniCache state: slot %d holds two cells", s));
                }
                p.slot_of_cell[c] = s;
                p.cell_of_slot[s] = (int32_t) c;
                held.push_back((uint32_t) s);
            }
            sync_norm(p, c);
        }
        std::sort(held.begin(), held.end());
        read_rows(p, p.rows, held);
        read_rows(p, p.dir,  cells);
    }
    stage_counter = seq_max;
}

//
// introspection
//

void llama_kv_minicache::fill_stats(llama_minicache_stats & st) const {
    st.n_layer      = (int32_t) hparams.n_layer();
    st.start_layer  = start_layer;
    st.n_pairs      = n_pairs;
    st.merge_k      = 0;
    st.merge_v      = 0;
    st.n_rot        = 0;
    st.rot_bytes    = 0;
    for (const auto & p : pools) {
        (p.kind == KIND_K ? st.merge_k : st.merge_v) = 1;
        st.n_rot     += p.rot != LLAMA_MINICACHE_ROT_NONE;
        st.rot_bytes += p.rot_t ? ggml_nbytes(p.rot_t) : 0;
    }
    st.n_pools      = (int32_t) pools.size();
    st.type_k       = type_k;
    st.type_v       = type_v;
    st.attn_rot_k   = (int32_t) n_attn_rot[KIND_K];
    st.attn_rot_v   = (int32_t) n_attn_rot[KIND_V];
    st.kv_size      = kv_size;
    st.n_slots      = n_slots;
    st.n_rows       = n_rows;
    st.n_stage      = n_stage;
    st.n_retain_max = n_retain_max;
    st.n_staged     = n_staged_cur;
    st.n_merged     = n_merged_cur;
    st.n_retained   = 0;
    st.host_rows    = n_host_rows;
    st.merge_graphs = n_graphs;
    for (const auto & p : pools) {
        for (uint32_t s = 0; s < n_slots; ++s) {
            const int32_t c = p.cell_of_slot[s];
            st.n_retained += c >= 0 && merged[c];
        }
    }
}

int32_t llama_kv_minicache::get_pairs(llama_minicache_pair * out, int32_t n_max) const {
    for (int32_t i = 0; i < n_max && i < (int32_t) pools.size(); ++i) {
        out[i].kind = pools[i].kind;
        out[i].il   = pools[i].il[0];
        out[i].rot  = pools[i].rot;
        out[i].n_r  = 0;
        out[i].r    = nullptr;
    }
    return (int32_t) pools.size();
}

int32_t llama_kv_minicache::get_rows(int32_t il, int kind, int32_t c0, int32_t n, float * out) const {
    const auto & p = pools[pool_of[2*il + kind]];
    const int x = il == p.il[0] ? 0 : 1;
    const ggml_type type = type_of(kind);
    const size_t row = ggml_row_size(type, p.n_embd);

    // the cells' dir rows and the exact rows of the slots, copied in bulk (one copy per range)
    const std::vector<uint8_t> dirs = get_row_block(p, p.dir, (uint32_t) c0, (uint32_t) n);
    const std::vector<uint8_t> exact = x == 0 ? get_row_block(p, p.rows, 0, n_rows) : std::vector<uint8_t>();
    std::vector<uint8_t> buf(row);
    for (int32_t i = 0; i < n; ++i) {
        const uint32_t c = c0 + i;
        const int32_t  s = p.slot_of_cell[c];
        float * dst = out + (size_t) i*p.n_embd;
        if (s >= 0) {
            if (x == 0) {
                block_row(p, exact.data(), n_rows, (uint32_t) s, buf.data());
            } else {
                block_row(p, dirs.data(), (uint32_t) n, (uint32_t) i, buf.data());
            }
            row_to_f32(type, buf.data(), p.n_embd, dst);
        } else {
            const float norm = p.norm_host[x][c];
            block_row(p, dirs.data(), (uint32_t) n, (uint32_t) i, buf.data());
            mc_restore_row_blocks(type, buf.data(), norm, p.n_embd, x == 0 && p.rot != LLAMA_MINICACHE_ROT_NONE ? p.r.data() : nullptr,
                    p.r_block, dst);
        }
    }
    return (int32_t) p.n_embd;
}

int32_t llama_kv_minicache::get_rotation(int32_t il, int kind, float * out, int32_t n) const {
    const auto & p = pools[pool_of[2*il + kind]];
    if (p.rot == LLAMA_MINICACHE_ROT_NONE) {
        return 0;
    }
    // the blocks on the diagonal of an n_embd x n_embd matrix
    const size_t d = p.n_embd;
    const size_t b = p.r_block;
    for (size_t e = 0; out && e < std::min((size_t) n, d*d); ++e) {
        const size_t i = e / d;
        const size_t j = e % d;
        out[e] = i / b == j / b ? p.r[(i / b)*b*b + (i % b)*b + j % b] : 0.0f;
    }
    return (int32_t) (d*d);
}

int32_t llama_kv_minicache::get_cells(int32_t il, int kind, int32_t c0, int32_t n, uint8_t * state, float * dist) const {
    const auto & p = pools[pool_of[2*il + kind]];
    for (int32_t i = 0; i < n; ++i) {
        const uint32_t c = c0 + i;
        uint8_t st = LLAMA_MINICACHE_CELL_EMPTY;
        if (staged[c]) {
            st = LLAMA_MINICACHE_CELL_STAGED;
        } else if (merged[c]) {
            st = p.slot_of_cell[c] >= 0 ? LLAMA_MINICACHE_CELL_RETAINED : LLAMA_MINICACHE_CELL_MERGED;
        }
        if (state) {
            state[i] = st;
        }
        if (dist) {
            dist[i] = merged[c] ? p.dist[c] : 0.0f;
        }
    }
    return 0;
}

std::string llama_kv_minicache::describe() const {
    int n_k = 0, n_v = 0, n_rot = 0;
    std::string list;
    for (const auto & p : pools) {
        (p.kind == KIND_K ? n_k : n_v)++;
        n_rot += p.rot != LLAMA_MINICACHE_ROT_NONE;
    }
    const bool uniform = specs.empty();
    if (uniform) {
        list = format("%d layer pairs from layer %d merge %s%s%s", n_pairs, start_layer, n_k ? "K" : "", n_k && n_v ? "+" : "", n_v ? "V" : "");
    } else {
        list = format("%d K + %d V layer pairs merged (%d aligned):", n_k, n_v, n_rot);
        for (const auto & p : pools) {
            list += format(" %c%d-%d", p.kind == KIND_K ? 'K' : 'V', p.il[0], p.il[1]);
        }
    }
    return format("MiniCache: %s, t = %.2f, gamma = %.3f (%s), "
            "%u exact slots per layer (%u staging, window %d; %u retention)",
            list.c_str(), params.t, params.gamma,
            params.retention == LLAMA_MINICACHE_RETAIN_TOPK ? "top-k" : "threshold",
            n_slots, n_stage, params.window, n_retain_max);
}

//
// llama_kv_cache glue (declared in llama-kv-cache.h)
//

std::unique_ptr<llama_kv_minicache> llama_kv_cache::minicache_init(ggml_type type_k, ggml_type type_v, uint32_t kv_size, bool plain) {
    const llama_minicache_config * armed = take_armed();
    if (armed == nullptr) {
        return nullptr;
    }
    const llama_minicache_config & config = *armed;
    try {
        if (!plain) {
            throw std::runtime_error("only a plain KV cache can be merged (not a shared, filtered, reused or SWA cache)");
        }
        if (n_stream > 1 || n_seq_max > 1) {
            throw std::runtime_error(format("n_seq_max=%u is not supported: MiniCache merges single-sequence caches (n_seq_max = 1)", n_seq_max));
        }
        return std::make_unique<llama_kv_minicache>(hparams, config, type_k, type_v, kv_size, v_trans);
    } catch (const std::exception & e) {
        llama_minicache_set_error(e.what());
        throw std::runtime_error(std::string("MiniCache: ") + e.what());
    }
}

bool llama_kv_cache::minicache_prepare(const slot_info & sinfo) {
    if (!mc) {
        return true;
    }
    try {
        mc->prepare(v_cells[sinfo.strm[0]], sinfo.idxs[0]);
        return true;
    } catch (const std::exception & e) {
        llama_minicache_set_error(e.what());
        LLAMA_LOG_ERROR("%s: MiniCache: %s\n", __func__, e.what());
        return false;
    }
}

ggml_tensor * llama_kv_cache::build_attn_minicache(ggml_context * ctx, ggml_tensor * q_cur, ggml_tensor * kq_mask, float kq_scale,
        float max_bias, int32_t il, uint32_t n_kv, const slot_info & sinfo, const llama_kv_minicache_inputs * mc_inp) const {
    const bool mk = mc && mc->is_merged(il, llama_kv_minicache::KIND_K);
    const bool mv = mc && mc->is_merged(il, llama_kv_minicache::KIND_V);
    // env LLAMA_MINICACHE_RESTORE=1: always restore merged K/V and run the stock attention (debug, benchmarks)
    static const bool force_restore = getenv("LLAMA_MINICACHE_RESTORE") && atoi(getenv("LLAMA_MINICACHE_RESTORE"));
    if (!(mk || mv) || !mc_inp || force_restore) {
        return nullptr;
    }

    // folding gathers scores and weights per token ([n_kv, n_tokens, n_head]); restoring costs
    // [n_kv, n_embd] once per ubatch: fold for decoding, restore for prompt batches
    if (q_cur->ne[2] > LLAMA_MINICACHE_FOLD_MAX_TOKENS) {
        return nullptr;
    }
    return mc->build_attn(ctx, q_cur,
            mk ? nullptr : get_k(ctx, il, n_kv, sinfo),
            mv ? nullptr : get_v(ctx, il, n_kv, sinfo),
            kq_mask, kq_scale, max_bias, il, n_kv,
            hparams.n_embd_head_k(il), hparams.n_embd_head_v(il), hparams.n_head_kv(il), *mc_inp);
}

void llama_kv_cache::minicache_set_attn_rot() {
    if (!mc) {
        return;
    }
    try {
        mc->set_attn_rot(attn_rot_k, attn_rot_v, n_embd_head_k_all, attn_rot_hadamard);
    } catch (const std::exception & e) {
        llama_minicache_set_error(e.what());
        throw std::runtime_error(std::string("MiniCache: ") + e.what());
    }
    if (!hparams.no_alloc) {
        mc->upload_rotations();
    }
}

void llama_kv_cache::minicache_sync() {
    if (mc) {
        try {
            mc->forget_freed(v_cells[0]);
        } catch (const std::exception & e) {
            // the writes stay pending (the next ubatch applies them or fails with this error)
            llama_minicache_set_error(e.what());
            LLAMA_LOG_ERROR("%s: %s\n", __func__, e.what());
        }
    }
}

void llama_kv_cache::build_input_minicache(ggml_context * ctx, const llama_ubatch & ubatch, uint32_t n_kv, llama_kv_minicache_inputs & inp) const {
    if (mc) {
        mc->build_inputs(ctx, ubatch.n_tokens, n_kv, inp);
    }
}

void llama_kv_cache::set_input_minicache(const llama_kv_minicache_inputs & inp, const slot_info & sinfo, uint32_t n_kv) const {
    if (mc && !inp.write_idxs.empty()) {
        mc->set_inputs(inp, sinfo.idxs[0], n_kv);
    }
}

size_t llama_kv_cache::size_dense_bytes() const {
    size_t res = 0;
    const uint64_t kv_size = get_size();
    for (const auto & layer : layers) {
        const uint32_t il = layer.il;
        res += ggml_row_size(type_k_cache, hparams.n_embd_k_gqa(il))*kv_size*n_stream;
        if (!hparams.is_mla()) {
            res += ggml_row_size(type_v_cache, v_trans ? hparams.n_embd_v_gqa_max() : hparams.n_embd_v_gqa(il))*kv_size*n_stream;
        }
    }
    return res;
}

int32_t llama_kv_cache::minicache_get_rows(int32_t il, int kind, int32_t c0, int32_t n, float * out) const {
    if (map_layer_ids.find(il) == map_layer_ids.end() || kind < 0 || kind > 1 || c0 < 0 || n < 0 ||
            (int64_t) c0 + n > (int64_t) get_size()) {
        return -1;
    }
    if (mc && mc->is_merged(il, kind)) {
        return mc->get_rows(il, kind, c0, n, out);
    }

    const auto & layer = layers[map_layer_ids.at(il)];
    ggml_tensor * t = kind == 0 ? layer.k : layer.v;
    if (t == nullptr || !mc_supported(t->type)) {
        return -1;
    }
    const int64_t n_embd = kind == 0 ? hparams.n_embd_k_gqa(il) : hparams.n_embd_v_gqa(il);
    const size_t es = ggml_type_size(t->type);

    std::vector<uint8_t> buf(ggml_row_size(t->type, t->ne[0]));
    if (kind == 1 && v_trans) {
        // element (cell c, dim j) at j*kv_size + c
        const uint64_t kv_size = get_size();
        std::vector<uint8_t> col(es*n);
        for (int64_t j = 0; j < n_embd; ++j) {
            ggml_backend_tensor_get(t, col.data(), es*(j*kv_size + c0), es*n);
            for (int32_t i = 0; i < n; ++i) {
                float v;
                row_to_f32(t->type, col.data() + es*i, 1, &v);
                out[(size_t) i*n_embd + j] = v;
            }
        }
    } else {
        for (int32_t i = 0; i < n; ++i) {
            ggml_backend_tensor_get(t, buf.data(), (c0 + i)*t->nb[1], buf.size());
            row_to_f32(t->type, buf.data(), n_embd, out + (size_t) i*n_embd);
        }
    }
    return (int32_t) n_embd;
}

//
// C API
//

static llama_kv_cache * kv_of(const llama_context * ctx) {
    return ctx ? dynamic_cast<llama_kv_cache *>(ctx->get_memory()) : nullptr;
}

bool llama_minicache_active(llama_memory_i * mem) {
    auto * kv = dynamic_cast<llama_kv_cache *>(mem);
    return kv && kv->get_minicache();
}

uint32_t llama_minicache_graph_nodes(llama_memory_i * mem) {
    auto * kv = dynamic_cast<llama_kv_cache *>(mem);
    return kv && kv->get_minicache() ? kv->get_minicache()->n_graph_nodes() : 0;
}

llama_minicache_params llama_minicache_default_params(void) {
    llama_minicache_params p;
    p.start_layer = -1;
    p.t           = 0.6f;
    p.gamma       = 0.05f;
    p.window      = 256;
    p.n_ubatch    = 512;
    p.merge_k     = true;
    p.merge_v     = true;
    p.retention   = LLAMA_MINICACHE_RETAIN_TOPK;
    p.n_pairs     = 0;
    p.pairs       = nullptr;
    return p;
}

bool llama_minicache_set_pending(const llama_minicache_params * params) {
    g_last_error.clear();
    if (params == nullptr) {
        g_pending_set = false;
        return true;
    }
    const std::string err = check_params(*params);
    if (!err.empty()) {
        g_last_error = err;
        g_pending_set = false;
        return false;
    }
    g_pending.params = *params;
    g_pending.params.n_pairs = 0;
    g_pending.params.pairs   = nullptr;
    g_pending.pairs.clear();
    for (int32_t i = 0; i < params->n_pairs; ++i) {
        const llama_minicache_pair & q = params->pairs[i];
        g_pending.pairs.push_back({ q.kind, q.il, q.rot, std::vector<float>(q.r, q.r + q.n_r) });
    }
    g_pending_set = true;
    return true;
}

const char * llama_minicache_last_error(void) {
    return g_last_error.c_str();
}

bool llama_minicache_get_stats(const llama_context * ctx, llama_minicache_stats * out) {
    auto * kv = kv_of(ctx);
    if (!kv || !out) {
        return false;
    }
    // the previous graph may still be writing the cache (asynchronous backends)
    llama_synchronize(const_cast<llama_context *>(ctx));
    *out = {};
    if (kv->get_minicache()) {
        kv->get_minicache()->fill_stats(*out);
    } else {
        out->n_layer     = (int32_t) ctx->get_model().hparams.n_layer();
        out->start_layer = -1;
        out->kv_size     = kv->get_size();
    }
    int64_t total = 0;
    for (const auto & [_, size] : kv->memory_breakdown()) {
        total += size;
    }
    out->kv_bytes       = total;
    out->kv_bytes_dense = kv->size_dense_bytes();
    out->n_cells_used   = kv->get_cells(0).get_used();
    return true;
}

int32_t llama_minicache_get_pairs(const llama_context * ctx, llama_minicache_pair * out, int32_t n_max) {
    auto * kv = kv_of(ctx);
    if (!kv || n_max < 0 || (n_max > 0 && !out)) {
        return -1;
    }
    return kv->get_minicache() ? kv->get_minicache()->get_pairs(out, n_max) : 0;
}

int32_t llama_minicache_get_rows(const llama_context * ctx, int32_t il, int32_t kind, int32_t c0, int32_t n, float * out) {
    auto * kv = kv_of(ctx);
    if (!kv || !out) {
        return -1;
    }
    llama_synchronize(const_cast<llama_context *>(ctx));
    return kv->minicache_get_rows(il, kind, c0, n, out);
}

int32_t llama_minicache_get_rotation(const llama_context * ctx, int32_t il, int32_t kind, float * out, int32_t n) {
    auto * kv = kv_of(ctx);
    if (!kv || !kv->get_minicache() || !kv->get_minicache()->is_merged(il, kind) || n < 0 || (n > 0 && !out)) {
        return -1;
    }
    return kv->get_minicache()->get_rotation(il, kind, out, n);
}

int32_t llama_minicache_get_cells(const llama_context * ctx, int32_t il, int32_t kind, int32_t c0, int32_t n, uint8_t * state, float * dist) {
    auto * kv = kv_of(ctx);
    if (!kv || !kv->get_minicache() || !kv->get_minicache()->is_merged(il, kind) ||
            c0 < 0 || n < 0 || (int64_t) c0 + n > (int64_t) kv->get_size()) {
        return -1;
    }
    llama_synchronize(const_cast<llama_context *>(ctx));
    return kv->get_minicache()->get_cells(il, kind, c0, n, state, dist);
}
