// llama_kv_minicache, the merge step on the device: the backends and allocators of the merge graphs,
// the merge (minicache_gguf/reference.py's, in f32 ggml ops), merge_cells() (norms and distances of
// the tokens leaving the staging window) and flush() (the pending device writes: demoted directions,
// zeroed rows, norms)

#include "llama-kv-cache-minicache.h"

#include "llama-impl.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <stdexcept>
#include <string>

// nodes of one merge-step graph: at most this many per pool (gathers, the merge, scatters), plus a fixed part
static constexpr size_t MC_GRAPH_NODES_PER_POOL = 256;
static constexpr size_t MC_GRAPH_NODES_FIXED    = 64;

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

std::vector<size_t> llama_kv_minicache::pools_on(size_t ib) {
    std::vector<size_t> res;
    for (size_t ip = 0; ip < pools.size(); ++ip) {
        if (backend_of(pools[ip].dir) == ib) {
            res.push_back(ip);
        }
    }
    return res;
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

bool llama_kv_minicache::backend_has_op(size_t ib, ggml_tensor * node) const {
    const bool refused = !refuse_ops.empty() && refuse_ops.find(std::string(",") + ggml_op_name(node->op) + ",") != std::string::npos;
    return !refused && ggml_backend_supports_op(backends[ib].backend, node);
}

// one line per node: op type src0 src1 and, per source, contiguous / contiguous rows / unit element stride
void llama_kv_minicache::log_nodes(const std::vector<const ggml_tensor *> & nodes) const {
    FILE * f = ops_log.empty() || nodes.empty() ? nullptr : fopen(ops_log.c_str(), "a");
    if (!f) {
        return;
    }
    for (const ggml_tensor * t : nodes) {
        fprintf(f, "%s %s", ggml_op_desc(t), ggml_type_name(t->type));
        for (int i = 0; i < 2; ++i) {
            const ggml_tensor * s = t->src[i];
            if (s) {
                fprintf(f, " %s %d%d%d", ggml_type_name(s->type), ggml_is_contiguous(s), ggml_is_contiguous_rows(s),
                        s->nb[0] == ggml_type_size(s->type));
            } else {
                fprintf(f, " - -");
            }
        }
        fprintf(f, "\n");
    }
    fclose(f);
}

ggml_tensor * llama_kv_minicache::logged(ggml_tensor * out, std::initializer_list<const ggml_tensor *> stop) const {
    if (ops_log.empty()) {
        return out;
    }
    std::vector<const ggml_tensor *> todo = { out }, nodes;
    std::set<const ggml_tensor *> seen(stop.begin(), stop.end());
    while (!todo.empty()) {
        const ggml_tensor * t = todo.back();
        todo.pop_back();
        if (!t || t->op == GGML_OP_NONE || !seen.insert(t).second) {
            continue;
        }
        nodes.push_back(t);
        for (const ggml_tensor * s : t->src) {
            todo.push_back(s);
        }
    }
    log_nodes(nodes);
    return out;
}

void llama_kv_minicache::check_ops(size_t ib, ggml_cgraph * gf) const {
    const merge_backend & be = backends[ib];
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (!backend_has_op(ib, node)) {
            throw std::runtime_error(format("the %s backend cannot run %s of %s rows (the merge step of %s)", ggml_backend_name(be.backend),
                    ggml_op_desc(node), ggml_type_name(node->src[0] ? node->src[0]->type : node->type), node->name));
        }
    }
}

void llama_kv_minicache::check_merge_ops() {
    if (!pools[0].dir->buffer) {
        return;
    }
    try {
        check_merge_graphs();
        check_fold_ops();
    } catch (const std::exception & e) {
        llama_minicache_set_error(e.what());
        throw std::runtime_error(std::string("MiniCache: ") + e.what());
    }
}

void llama_kv_minicache::check_merge_graphs() {
    init_backends();
    // the graphs of merge_cells() and flush() for one cell and slot per pool: every op and type the merge
    // step runs on each backend, checked before the context is used
    for (size_t ib = 0; ib < backends.size(); ++ib) {
        const std::vector<size_t> mine = pools_on(ib);
        const size_t n_graph = MC_GRAPH_NODES_FIXED + MC_GRAPH_NODES_PER_POOL*pools.size();
        ggml_init_params ip0 = { ggml_tensor_overhead()*n_graph + ggml_graph_overhead_custom(n_graph, false), nullptr, true };
        ggml_context_ptr ctx_ptr(ggml_init(ip0));
        ggml_context * ctx = ctx_ptr.get();
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_graph, false);
        std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> inputs;
        for (const auto & g : width_groups(mine)) {
            const std::vector<std::vector<int32_t>> one(g.size(), std::vector<int32_t>(1, 0));
            ggml_tensor * x[3];
            merge_inputs(ctx, g, one, one, inputs, x);
            ggml_tensor * d = nullptr;
            ggml_build_forward_expand(gf, build_merge(ctx, x[0], x[1], x[2], &d));
            for (size_t k = 0; k < g.size(); ++k) {
                const pool & p = pools[g[k]];
                ggml_tensor * dk = ggml_view_2d(ctx, d, d->ne[0], 1, d->nb[1], k*d->nb[1]);
                ggml_build_forward_expand(gf, scatter(ctx, p.dir, dk, { 0 }, dir_trans(p), inputs));
            }
        }
        for (size_t ip : mine) {
            const pool & p = pools[ip];
            ggml_tensor * z = ggml_fill(ctx, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, p.n_embd, 1), 0.0f);
            ggml_build_forward_expand(gf, scatter(ctx, p.rows, z, { 0 }, dir_trans(p), inputs));
            ggml_tensor * v = ggml_reshape_2d(ctx, mc_input(ctx, GGML_TYPE_F32, std::vector<float>(1, 0.0f), inputs), 1, 1);
            ggml_build_forward_expand(gf, scatter(ctx, p.norm[0], v, { 0 }, false, inputs));
        }
        if (!ops_log.empty()) {
            std::vector<const ggml_tensor *> nodes;
            for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
                nodes.push_back(ggml_graph_node(gf, i));
            }
            log_nodes(nodes);
        }
        check_ops(ib, gf);
    }
}

void llama_kv_minicache::check_fold_ops() {
    // the decoding fold sums rows stored by rows (quantized V directions and exact rows; dense V of a
    // K-only layer with flash attention on) with OUT_PROD [dh, n] x [m, n], which not every backend has
    // (CUDA: F32 only; Metal: none): those layers restore their merged K/V for decoding too
    ggml_init_params ip0 = { ggml_tensor_overhead()*(3*fold_ok.size() + 4*pools.size() + 8), nullptr, true };
    ggml_context_ptr ctx_ptr(ggml_init(ip0));
    ggml_context * ctx = ctx_ptr.get();

    // restoring (prompt ubatches, and decoding where the fold is off) converts a pool's directions to
    // F32 and gathers layer a's exact rows: a backend without those ops for the pool's type cannot read
    // the cache (e.g. iq4_nl: no CPY to F32 on CUDA or Metal)
    for (const auto & p : pools) {
        const size_t ib = backend_of(p.dir);
        ggml_tensor * x = ggml_new_tensor_2d(ctx, p.dir->type, p.n_embd, 2);
        ggml_tensor * need[2] = {
            p.dir->type == GGML_TYPE_F32 ? nullptr : ggml_cast(ctx, x, GGML_TYPE_F32),
            ggml_get_rows(ctx, x, ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 1)),
        };
        for (ggml_tensor * node : need) {
            if (node && !backend_has_op(ib, node)) {
                throw std::runtime_error(format("the %s backend cannot run %s of %s rows (restoring the merged %s of layers %d, %d)",
                        ggml_backend_name(backends[ib].backend), ggml_op_desc(node), ggml_type_name(p.dir->type),
                        p.kind == KIND_K ? "K" : "V", p.il[0], p.il[1]));
            }
        }
    }

    std::string off;
    for (int32_t il = 0; il < (int32_t) fold_ok.size(); ++il) {
        const int32_t ipk = pool_of[2*il + KIND_K];
        const int32_t ipv = pool_of[2*il + KIND_V];
        if (!fold_ok[il] || (ipk < 0 && ipv < 0)) {
            continue;
        }
        ggml_type rows_type = GGML_TYPE_COUNT;
        size_t ib = 0;
        if (ipv >= 0 && !dir_trans(pools[ipv])) {
            rows_type = type_v;
            ib = backend_of(pools[ipv].dir);
        } else if (ipv < 0 && !v_trans) {
            rows_type = type_v; // the layer's dense V, on the device of its own norms (its layer's)
            const pool & p = pools[ipk];
            ib = backend_of(p.norm[il == p.il[0] ? 0 : 1]);
        }
        if (rows_type == GGML_TYPE_COUNT) {
            continue;
        }
        const int64_t blck = ggml_blck_size(rows_type);
        ggml_tensor * x = ggml_new_tensor_2d(ctx, rows_type, blck, 2);
        ggml_tensor * w = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, 2);
        if (!backend_has_op(ib, ggml_out_prod(ctx, x, w))) {
            fold_ok[il] = 0;
            off += (off.empty() ? "" : ",") + std::to_string(il);
        }
    }
    if (!off.empty()) {
        LLAMA_LOG_INFO("%s: MiniCache: no OUT_PROD of %s rows on the cache's backend: layers %s restore merged K/V for decoding\n",
                __func__, ggml_type_name(type_v), off.c_str());
    }
}

void llama_kv_minicache::compute(size_t ib, ggml_cgraph * gf, const std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs) {
    merge_backend & be = backends[ib];
    check_ops(ib, gf);
    if (!ggml_gallocr_alloc_graph(be.galloc, gf)) {
        throw std::runtime_error(format("the merge step could not allocate its %s buffer", ggml_backend_name(be.backend)));
    }
    for (const auto & in : inputs) {
        ggml_backend_tensor_set(in.first, in.second.data(), 0, in.second.size());
        n_uploads++;
    }
    if (n_graphs == fail_graph) {
        fail_graph = -1;
        throw std::runtime_error(format("the merge step failed on the %s backend (LLAMA_MINICACHE_FAIL_GRAPH)", ggml_backend_name(be.backend)));
    }
    n_syncs++; // ggml_backend_graph_compute returns once the graph has run
    if (ggml_backend_graph_compute(be.backend, gf) != GGML_STATUS_SUCCESS) {
        throw std::runtime_error(format("the merge step failed on the %s backend", ggml_backend_name(be.backend)));
    }
    n_graphs++;
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
    // the merge of the NumPy reference (minicache_gguf/reference.py: merge) in f32 ops: norms of the
    // unrotated rows, units (an aligned pool's layer a rotated and normalized by its own norm), the
    // angle, SLERP
    const float t   = params.t;
    const float eps = 1e-6f; // reference.ANGLE_EPS

    ggml_tensor * n0 = mc_norm(ctx, x0);
    ggml_tensor * n1 = mc_norm(ctx, x1);
    ggml_tensor * u0 = mc_unit(ctx, r0, mc_norm(ctx, r0)); // r0 = x0 without a rotation: its norm is n0
    ggml_tensor * u1 = mc_unit(ctx, x1, n1);

    ggml_tensor * nz0  = ggml_step(ctx, n0); // 1: layer a's row is not zero
    ggml_tensor * nz1  = ggml_step(ctx, n1);
    ggml_tensor * both = ggml_mul(ctx, nz0, nz1);

    // half angle h = atan2(|u0 - u1|, |u0 + u1|), from the smaller of its sine and cosine (accurate near 0
    // and near pi/2, as the reference's arctan2)
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
        // below eps the blend is linear; within eps of pi no direction serves both rows: 0 (the
        // reference's rule, minicache_gguf/reference.py)
        ggml_tensor * lin0  = ggml_step(ctx, ggml_scale_bias(ctx, omega, -1.0f, eps));
        ggml_tensor * linpi = ggml_step(ctx, ggml_scale_bias(ctx, omega,  1.0f, eps - (float) M_PI));
        ggml_tensor * lin   = ggml_add(ctx, lin0, linpi);
        ggml_tensor * so = ggml_add(ctx, ggml_sin(ctx, omega), lin); // no division by 0 where not SLERP
        ggml_tensor * nl = mc_one_minus(ctx, lin);
        ggml_tensor * w0 = ggml_div(ctx, ggml_sin(ctx, ggml_scale(ctx, omega, 1.0f - t)), so);
        ggml_tensor * w1 = ggml_div(ctx, ggml_sin(ctx, ggml_scale(ctx, omega, t)), so);
        w0 = ggml_add(ctx, ggml_mul(ctx, w0, nl), ggml_scale(ctx, lin0, 1.0f - t));
        w1 = ggml_add(ctx, ggml_mul(ctx, w1, nl), ggml_scale(ctx, lin0, t));
        // a zero row: the other row's direction
        w0 = ggml_add(ctx, ggml_mul(ctx, w0, both), ggml_mul(ctx, nz0, mc_one_minus(ctx, nz1)));
        w1 = ggml_add(ctx, ggml_mul(ctx, w1, both), mc_one_minus(ctx, nz0));
        *dir = ggml_add(ctx, ggml_mul(ctx, u0, w0), ggml_mul(ctx, u1, w1));
    }

    ggml_tensor * st = ggml_concat(ctx, ggml_reshape_1d(ctx, n0, n0->ne[1]), ggml_reshape_1d(ctx, n1, n1->ne[1]), 0);
    return ggml_concat(ctx, st, ggml_reshape_1d(ctx, dist, dist->ne[1]), 0);
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
        const std::vector<size_t> mine = pools_on(ib);
        if (mine.empty()) {
            continue;
        }
        const size_t n_graph = MC_GRAPH_NODES_PER_POOL*mine.size();
        ggml_init_params ip0 = { ggml_tensor_overhead()*(n_graph + 16) + ggml_graph_overhead_custom(n_graph, false), nullptr, true };
        ggml_context_ptr ctx_ptr(ggml_init(ip0)); // freed on every path out, errors included
        ggml_context * ctx = ctx_ptr.get();
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_graph, false);
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
        n_syncs++;
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
            if (!std::isfinite(p.norm_host[0][c]) || !std::isfinite(p.norm_host[1][c])) {
                p.dist[c] = 1.0f; // a row holding NaN/Inf: most distinct, its direction is 0 (see demote)
            }
        }
    }

    for (uint32_t c : cells_to_merge) {
        staged[c] = 0;
        merged[c] = 1;
    }
    n_staged_cur -= (uint32_t) n;
    n_merged_cur += (uint32_t) n;
}

void llama_kv_minicache::drop_unchanged_norms() {
    // norms the tensors already hold need no write (a new token's slot, a cell released twice)
    for (auto & p : pools) {
        std::vector<uint32_t> stale;
        for (uint32_t c : p.pend_norm) {
            bool same = true;
            for (int x = 0; x < 2; ++x) {
                const float v = norm_value(p, c, x);
                same = same && memcmp(&v, &p.norm_dev[x][c], sizeof(float)) == 0;
            }
            if (same) {
                p.norm_pending[c] = 0;
            } else {
                stale.push_back(c);
            }
        }
        p.pend_norm.swap(stale);
    }
}

std::vector<size_t> llama_kv_minicache::build_demotions(ggml_context * ctx, ggml_cgraph * gf, size_t ib,
        std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs) {
    std::vector<size_t> mine;
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
    return mine;
}

void llama_kv_minicache::build_zeroes_and_norms(ggml_context * ctx, ggml_cgraph * gf, size_t ib,
        std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs) {
    for (const auto & p : pools) {
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
}

void llama_kv_minicache::flush() {
    drop_unchanged_norms();

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
            const size_t n_graph = MC_GRAPH_NODES_FIXED + MC_GRAPH_NODES_PER_POOL*pools.size();
            ggml_init_params ip0 = { ggml_tensor_overhead()*n_graph + ggml_graph_overhead_custom(n_graph, false), nullptr, true };
            ggml_context_ptr ctx_ptr(ggml_init(ip0));
            ggml_context * ctx = ctx_ptr.get();
            ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_graph, false);
            std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> inputs;

            std::vector<size_t> mine;
            if (round == 0) {
                mine = build_demotions(ctx, gf, ib, inputs);
            } else {
                build_zeroes_and_norms(ctx, gf, ib, inputs);
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
        for (uint32_t c : p.pend_norm) {
            for (int x = 0; x < 2; ++x) {
                p.norm_dev[x][c] = norm_value(p, c, x);
            }
        }
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
