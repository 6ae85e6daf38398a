// MiniCache C API (include/llama-minicache.h): the params armed for the next context on this
// thread, the errors it reports, and the llama_kv_cache members that hand its calls to the merged
// cache (declared in llama-kv-cache.h)

#include "llama-kv-cache-minicache.h"
#include "llama-kv-cache-minicache-impl.h"

#include "llama-context.h"
#include "llama-hparams.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cells.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
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

std::string mc_check_params(const llama_minicache_params & p) {
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
        if (n_stream > 1) {
            throw std::runtime_error(format("n_seq_max=%u with one KV stream per sequence is not supported: MiniCache merges "
                    "a unified KV cache (kv_unified = true)", n_seq_max));
        }
        return std::make_unique<llama_kv_minicache>(hparams, config, type_k, type_v, kv_size, v_trans, n_seq_max);
    } catch (const std::exception & e) {
        llama_minicache_set_error(e.what());
        throw std::runtime_error(std::string("MiniCache: ") + e.what());
    }
}

bool llama_kv_cache::minicache_prepare(const slot_info & sinfo, const llama_ubatch & ubatch) {
    if (!mc) {
        return true;
    }
    try {
        mc->prepare(v_cells[sinfo.strm[0]], sinfo.idxs[0], ubatch);
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
    if (!(mk || mv) || !mc_inp || !mc->can_fold(il)) {
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
        mc->init_norms();
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
    const std::string err = mc_check_params(*params);
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

bool llama_minicache_set_pending_file(const char * path, int32_t n_ubatch) {
    g_last_error.clear();
    g_pending_set = false;
    if (path == nullptr) {
        g_last_error = "no params file given";
        return false;
    }
    std::unique_ptr<FILE, int (*)(FILE *)> f(fopen(path, "rb"), fclose);
    if (!f) {
        g_last_error = format("cannot open the params file '%s'", path);
        return false;
    }
    auto read = [&](void * dst, size_t n) { return fread(dst, 1, n, f.get()) == n; };
    auto bad  = [&](const char * what) {
        g_last_error = format("'%s' is not a MiniCache params file (%s)", path, what);
        return false;
    };

    char magic[8];
    if (!read(magic, sizeof(magic)) || memcmp(magic, "MCKVPAR1", sizeof(magic)) != 0) {
        return bad("its first 8 bytes are not MCKVPAR1");
    }
    llama_minicache_params p = llama_minicache_default_params();
    int32_t merge_k = 0;
    int32_t merge_v = 0;
    if (!read(&p.start_layer, 4) || !read(&p.t, 4) || !read(&p.gamma, 4) || !read(&p.window, 4) ||
        !read(&merge_k, 4) || !read(&merge_v, 4) || !read(&p.retention, 4) || !read(&p.n_pairs, 4)) {
        return bad("the header is cut short");
    }
    if (p.n_pairs < 0 || p.n_pairs > 65536) {
        return bad(format("n_pairs=%d", p.n_pairs).c_str());
    }
    p.merge_k  = merge_k != 0;
    p.merge_v  = merge_v != 0;
    p.n_ubatch = n_ubatch;

    std::vector<llama_minicache_pair> pairs(p.n_pairs);
    std::vector<std::vector<float>>   rots(p.n_pairs);
    for (int32_t i = 0; i < p.n_pairs; ++i) {
        llama_minicache_pair & q = pairs[i];
        if (!read(&q.kind, 4) || !read(&q.il, 4) || !read(&q.rot, 4) || !read(&q.n_r, 4)) {
            return bad(format("pair %d is cut short", i).c_str());
        }
        if (q.n_r < 0 || q.n_r > (1 << 26)) {
            return bad(format("pair %d: n_r=%d", i, q.n_r).c_str());
        }
        rots[i].resize(q.n_r);
        if (q.n_r > 0 && !read(rots[i].data(), sizeof(float) * q.n_r)) {
            return bad(format("pair %d: the rotation is cut short", i).c_str());
        }
        q.r = q.n_r > 0 ? rots[i].data() : nullptr;
    }
    if (fgetc(f.get()) != EOF) {
        return bad("bytes after the last pair");
    }
    p.pairs = pairs.empty() ? nullptr : pairs.data();
    return llama_minicache_set_pending(&p);
}

const char * llama_minicache_last_error(void) {
    return g_last_error.c_str();
}

// the bytes of every buffer of a KV cache
static int64_t kv_buffer_bytes(const llama_kv_cache & kv) {
    int64_t total = 0;
    for (const auto & [_, size] : kv.memory_breakdown()) {
        total += size;
    }
    return total;
}

bool llama_minicache_get_stats(const llama_context * ctx, llama_minicache_stats * out) {
    // an iSWA cache (interleaved sliding-window models): the full-attention layers' cache, plus the
    // bytes of the sliding-window layers' cache (merging does not apply to it)
    const auto * iswa = ctx ? dynamic_cast<const llama_kv_cache_iswa *>(ctx->get_memory()) : nullptr;
    auto * kv = iswa ? iswa->get_base() : kv_of(ctx);
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
    out->kv_bytes       = kv_buffer_bytes(*kv);
    out->kv_bytes_dense = kv->size_dense_bytes();
    out->n_cells_used   = kv->get_cells(0).get_used();
    if (iswa) {
        out->kv_bytes       += kv_buffer_bytes(*iswa->get_swa());
        out->kv_bytes_dense += iswa->get_swa()->size_dense_bytes();
    }
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
