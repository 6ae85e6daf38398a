// llama_kv_minicache: construction and validation, the pool tensors and their rotations, the
// slot bookkeeping on the host (staging, retention, released cells), prepare() and clear().
// The other units: the attention side (-graph), the merge step on the device (-merge), state
// save/load and introspection (-state); the C API and the llama_kv_cache glue: llama-minicache.cpp

#include "llama-kv-cache-minicache.h"
#include "llama-kv-cache-minicache-impl.h"

#include "llama-batch.h"
#include "llama-hparams.h"
#include "llama-impl.h"
#include "llama-kv-cells.h"

#include "ggml-backend.h"

#ifdef LLAMA_MINICACHE
#include "minicache.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <stdexcept>

static uint64_t fnv1a(const void * data, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
    const uint8_t * b = (const uint8_t *) data;
    for (size_t i = 0; i < n; ++i) {
        h = (h ^ b[i])*0x100000001b3ull;
    }
    return h;
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

//
// native core calls (the core is linked by LLAMA_MINICACHE_DIR, see src/CMakeLists.txt)
//

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
        bool v_trans,
        uint32_t n_seq_max) :
    hparams(hparams), params(config.params), specs(config.pairs), type_k(type_k), type_v(type_v), kv_size(kv_size), v_trans(v_trans) {
    const std::string err = mc_check_params(params);
    if (!err.empty()) {
        throw std::runtime_error(err);
    }

    const int32_t n_layer = (int32_t) hparams.n_layer();

    read_test_env();
    fold_ok.assign(n_layer, force_restore ? 0 : 1);

    if (hparams.swa_type != LLAMA_SWA_TYPE_NONE || hparams.is_swa_any()) {
        throw std::runtime_error("models with sliding-window attention (iSWA caches, e.g. Gemma 3) are not supported yet");
    }
    if (hparams.is_mla()) {
        throw std::runtime_error("models with multi-head latent attention (MLA) are not supported");
    }

    const std::vector<llama_minicache_pair_spec> todo = pair_list(n_layer);
    check_types(todo);

    // a ubatch never holds more tokens than the cache has cells. Each sequence keeps its own window;
    // the sequences' retained tokens share one pool (the sum of their ceil(gamma * merged) counts)
    n_seq        = std::max<uint32_t>(1, n_seq_max);
    n_stage      = std::min<uint32_t>(std::max(params.window + LLAMA_MINICACHE_MERGE_BLOCK, params.n_ubatch), kv_size);
    n_stage_all  = (uint32_t) std::min<uint64_t>((uint64_t) n_seq*n_stage, kv_size);
    n_retain_max = std::min<uint32_t>(mc_retain_count(kv_size, params.gamma) + n_seq - 1, kv_size);
    n_slots      = n_stage_all + n_retain_max;

    // the row past the slots stays zero: cells without a slot gather row n_slots
    n_rows       = n_slots + 1;

    pool_of.assign(2*n_layer, -1);

    std::vector<uint8_t> pair_used(n_layer, 0);
    start_layer = n_layer;

    for (const auto & q : todo) {
        const int32_t a = q.il;
        const int32_t b = a + 1;
        pool p = make_pool(q, n_layer);

        pool_of[2*a + q.kind] = pool_of[2*b + q.kind] = (int32_t) pools.size();
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

void llama_kv_minicache::read_test_env() {
    if (const char * s = getenv("LLAMA_MINICACHE_FAIL_GRAPH")) {
        fail_graph = atoll(s);
    }
    if (const char * s = getenv("LLAMA_MINICACHE_REFUSE_OPS"); s && *s) {
        refuse_ops = std::string(",") + s + ",";
    }
    if (const char * s = getenv("LLAMA_MINICACHE_OPS_LOG")) {
        ops_log = s;
    }
    if (const char * s = getenv("LLAMA_MINICACHE_RESTORE")) {
        force_restore = atoi(s) != 0;
    }
}

std::vector<llama_minicache_pair_spec> llama_kv_minicache::pair_list(int32_t n_layer) const {
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
    return todo;
}

void llama_kv_minicache::check_types(const std::vector<llama_minicache_pair_spec> & todo) const {
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
}

llama_kv_minicache::pool llama_kv_minicache::make_pool(const llama_minicache_pair_spec & q, int32_t n_layer) const {
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
    p.norm_dev[0].assign(kv_size, 0.0f); // the buffers start cleared (init_norms() writes layer b's)
    p.norm_dev[1].assign(kv_size, 0.0f);
    p.norm_pending.assign(kv_size, 0);
    for (uint32_t s = 0; s < n_slots; ++s) {
        p.free_slots.push((int32_t) s);
    }

    return p;
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

bool llama_kv_minicache::can_fold(int32_t il) const {
    return il >= 0 && il < (int32_t) fold_ok.size() && fold_ok[il];
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
    // a cell with a slot, or an empty one (its dir row is zero): layer a 0, layer b 1
    if (p.slot_of_cell[c] >= 0 || !merged[c]) {
        return x == 0 ? 0.0f : 1.0f;
    }
    return p.norm_host[x][c];
}

void llama_kv_minicache::init_norms() {
    for (auto & p : pools) {
        for (int x = 0; x < 2; ++x) {
            std::fill(p.norm_dev[x].begin(), p.norm_dev[x].end(), x == 0 ? 0.0f : 1.0f);
            if (p.norm[x]->buffer) {
                ggml_backend_tensor_set(p.norm[x], p.norm_dev[x].data(), 0, ggml_nbytes(p.norm[x]));
            }
        }
    }
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
    if (!std::isfinite(p.norm_host[0][c]) || !std::isfinite(p.norm_host[1][c])) {
        // a row holding NaN/Inf: direction 0 (the reference's rule), written after the merge that computes it
        p.pend_zero_cells.push_back(c);
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

void llama_kv_minicache::prepare(const llama_kv_cells & cells, const std::vector<uint32_t> & new_cells, const llama_ubatch & ubatch) {
    // cells freed since the last ubatch (seq_rm, clear, ...) give their slots back. Every occupied
    // cell is staged or merged, so while the counts agree no cell was freed and none is scanned
    if (cells.get_used() != n_staged_cur + n_merged_cur) {
        release_freed(cells);
    }

    for (uint32_t c : new_cells) {
        release_cell(c); // overwritten
    }

    const uint32_t n_new = (uint32_t) new_cells.size();
    if (n_new > n_stage_all) {
        throw std::runtime_error(format("a ubatch of %u tokens exceeds the staging pool (%u)", n_new, n_stage_all));
    }

    // the ubatch's sequences and their new tokens (a token of several sequences counts in each)
    std::map<llama_seq_id, uint32_t> n_new_of;
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        for (int32_t j = 0; j < ubatch.n_seq_id[i]; ++j) {
            n_new_of[ubatch.seq_id[i][j]]++;
        }
    }

    // dead entries go once they outnumber the live ones
    if (stage_list.size() > 2*(size_t) n_staged_cur + 64) {
        stage_list.erase(std::remove_if(stage_list.begin(), stage_list.end(),
                [this](const std::pair<uint32_t, uint64_t> & e) { return !is_staged_entry(e); }), stage_list.end());
    }

    // per sequence that receives tokens and would stage more than window + block: its tokens beyond
    // its window, and enough of its oldest to make room for the new ones (a single sequence's rule,
    // applied to each sequence on its own)
    std::vector<uint32_t>     to_merge;
    std::vector<uint8_t>      chosen; // per cell, once a sequence merges
    std::vector<llama_seq_id> stepped;
    for (const auto & [seq_id, n_seq_new] : n_new_of) {
        if (n_seq_new > n_stage) {
            throw std::runtime_error(format("a ubatch of %u tokens of sequence %d exceeds its staging pool (%u)",
                    n_seq_new, seq_id, n_stage));
        }
        std::vector<uint32_t> order;
        for (const auto & e : stage_list) {
            if (is_staged_entry(e) && cells.seq_has(e.first, seq_id)) {
                order.push_back(e.first);
            }
        }
        // merged only once the sequence would stage more than window + block tokens: then every token
        // beyond the window, and more if the new ones need the room; a decoding sequence merges once per block
        const int64_t n_staged      = (int64_t) order.size();
        const int64_t n_over_window = n_staged - params.window;
        const int64_t n_over_pool   = n_staged + n_seq_new - n_stage;
        const bool    due           = n_staged + n_seq_new > (int64_t) params.window + LLAMA_MINICACHE_MERGE_BLOCK;
        const int64_t n_merge       = due ? std::max<int64_t>({ 0, n_over_window, n_over_pool }) : 0;
        if (n_merge == 0) {
            continue;
        }
        std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return stage_seq[a] < stage_seq[b]; });
        chosen.resize(kv_size, 0);
        for (int64_t i = 0; i < n_merge; ++i) {
            if (!chosen[order[i]]) {
                chosen[order[i]] = 1;
                to_merge.push_back(order[i]);
            }
        }
        stepped.push_back(seq_id);
    }

    if (!to_merge.empty()) {
        merge_cells(to_merge);
        // chosen: merged in this step and not through their sequence's retention yet (they hold
        // staging slots, not retention slots)
        for (llama_seq_id seq_id : stepped) {
            for (auto & p : pools) {
                retain(p, cells, seq_id, chosen);
            }
            for (uint32_t c : to_merge) {
                if (cells.seq_has(c, seq_id)) {
                    chosen[c] = 0;
                }
            }
        }
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
        stage_list.emplace_back(c, stage_seq[c]);
        for (auto & p : pools) {
            take_slot(p, c);
        }
    }

    // demoted directions, zeroed rows and norms reach the cache before the ubatch's graph reads it
    flush();
}

void llama_kv_minicache::retain(pool & p, const llama_kv_cells & cells, llama_seq_id seq_id, const std::vector<uint8_t> & pending) {
    // candidates: every merged cell of the sequence that owns a slot, i.e. its retained ones and its
    // newly merged ones (marked merged already, still in their staging slot). Retained cells of other
    // sequences keep their slots; their cells merged in this step (pending) are not retained yet
    std::vector<uint32_t> cand;
    uint32_t n_other = 0;
    for (uint32_t s = 0; s < n_slots; ++s) {
        const int32_t c = p.cell_of_slot[s];
        if (c >= 0 && merged[c]) {
            if (cells.seq_has(c, seq_id)) {
                cand.push_back(c);
            } else if (!pending[c]) {
                n_other++;
            }
        }
    }
    const uint32_t n_free = n_retain_max > n_other ? n_retain_max - n_other : 0;

    uint32_t n_merged_seq = 0;
    float dmin = INFINITY, dmax = -INFINITY;
    for (uint32_t c = 0; c < kv_size; ++c) {
        if (merged[c] && cells.seq_has(c, seq_id)) {
            n_merged_seq++;
            dmin = std::min(dmin, p.dist[c]);
            dmax = std::max(dmax, p.dist[c]);
        }
    }

    uint32_t k = 0;
    if (params.retention == LLAMA_MINICACHE_RETAIN_TOPK) {
        k = std::min(mc_retain_count(n_merged_seq, params.gamma), n_free);
    } else {
        // the paper's Eq. 4 over every merged token of the sequence in this pool, bounded by the pool capacity
        const double thr = dmin + (double) (dmax - dmin)*(1.0 - (double) params.gamma);
        k = std::min<uint32_t>((uint32_t) std::count_if(cand.begin(), cand.end(),
                [&](uint32_t c) { return (double) p.dist[c] > thr; }), n_free);
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

void llama_kv_minicache::rebuild_stage_list() {
    stage_list.clear();
    for (uint32_t c = 0; c < kv_size; ++c) {
        if (staged[c]) {
            stage_list.emplace_back(c, stage_seq[c]);
        }
    }
    std::sort(stage_list.begin(), stage_list.end(),
            [](const std::pair<uint32_t, uint64_t> & a, const std::pair<uint32_t, uint64_t> & b) { return a.second < b.second; });
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
    stage_list.clear();

    // the cache clears its buffers with the data: the rotations and the empty cells' norms are written again
    upload_rotations();
    init_norms();
}
