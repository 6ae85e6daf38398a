// llama_kv_minicache, the attention side: the graph inputs of the merged layers and their values,
// the writes of new rows to slots and cells, merged K/V restored as views (prompt ubatches), and the
// attention with the norms and rotations folded in (decoding ubatches)

#include "llama-kv-cache-minicache.h"
#include "llama-kv-cache-minicache-impl.h"

#include "ggml-backend.h"

#include <cstring>

//
// graph
//

ggml_type llama_kv_minicache::restored_type(int kind, bool rotated) const {
    const ggml_type type = type_of(kind);
    if (!ggml_is_quantized(type)) {
        return type;
    }
    return !rotated && (type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0) ? type : GGML_TYPE_F16;
}

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
    ggml_tensor * const cur_in = cur;

    // layer a's row goes to its slot, layer b's to its cell of dir
    ggml_tensor * dst  = x == 0 ? p.rows : p.dir;
    ggml_tensor * idxs = x == 0 ? inp.write_idxs[ip] : inp.write_cells[ip];

    if (dir_trans(p)) {
        // one "row" per element, as llama_kv_cache::cpy_v does for its transposed V
        if (!ggml_is_contiguous(cur)) {
            cur = ggml_cont(ctx, cur);
        }
        return logged(ggml_set_rows(ctx,
                ggml_reshape_2d(ctx, dst, 1, ggml_nelements(dst)),
                ggml_reshape_2d(ctx, cur, 1, ggml_nelements(cur)),
                idxs), { cur_in });
    }

    return logged(ggml_set_rows(ctx, dst, cur, idxs), { cur_in });
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

    // computed in F32 (directions converted first, each op then in place) and rounded to
    // restored_type() once, as the reference rounds; both operands of each MUL/ADD in one type, as
    // ggml-metal requires
    const bool rotated = x == 0 && p.rot != LLAMA_MINICACHE_ROT_NONE;
    const ggml_type type_out = restored_type(p.kind, rotated);

    if (dir_trans(p)) {
        // [n_kv, n_embd]: dir * norm per cell
        ggml_tensor * dir = ggml_view_2d(ctx, p.dir, n_kv, p.n_embd, p.dir->nb[1], 0);
        ggml_tensor * cur = dir->type != GGML_TYPE_F32
            ? ggml_mul_inplace(ctx, ggml_cast(ctx, dir, GGML_TYPE_F32), ggml_reshape_2d(ctx, norm, n_kv, 1))
            : ggml_mul(ctx, dir, ggml_reshape_2d(ctx, norm, n_kv, 1));

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
                cur = ggml_add_inplace(ctx, cur, exact);
            }
            if (cur->type != type_out) {
                cur = ggml_cast(ctx, cur, type_out);
            }

            return logged(ggml_view_4d(ctx, cur,
                    n_embd_head, n_head_kv, n_kv, 1,
                    ggml_row_size(cur->type, n_embd_head),
                    ggml_row_size(cur->type, p.n_embd),
                    ggml_row_size(cur->type, p.n_embd)*n_kv,
                    0), {});
        }

        if (exact) {
            cur = ggml_add_inplace(ctx, cur, ggml_cont(ctx, ggml_transpose(ctx, exact)));
        }
        if (cur->type != type_out) {
            cur = ggml_cast(ctx, cur, type_out);
        }

        const size_t es = ggml_element_size(cur);

        return logged(ggml_view_4d(ctx, cur,
                n_kv, n_head_kv, n_embd_head, 1,
                es*n_kv*n_embd_head,
                es*n_kv,
                es*n_kv*p.n_embd,
                0), {});
    }

    ggml_tensor * dir = ggml_view_2d(ctx, p.dir, p.n_embd, n_kv, p.dir->nb[1], 0);
    ggml_tensor * cur = dir->type != GGML_TYPE_F32
        ? ggml_mul_inplace(ctx, ggml_cast(ctx, dir, GGML_TYPE_F32), ggml_reshape_2d(ctx, norm, 1, n_kv))
        : ggml_mul(ctx, dir, ggml_reshape_2d(ctx, norm, 1, n_kv));
    if (rotated) {
        cur = unrotate(ctx, p, cur);
    }
    if (exact) {
        cur = ggml_add_inplace(ctx, cur, exact);
    }
    if (cur->type != type_out) {
        cur = ggml_cast(ctx, cur, type_out);
    }

    // quantized rows: whole blocks per head (the layer's heads hold whole blocks, checked at creation)
    return logged(ggml_view_4d(ctx, cur,
            n_embd_head, n_head_kv, n_kv, 1,
            ggml_row_size(cur->type, n_embd_head),
            ggml_row_size(cur->type, p.n_embd),
            ggml_row_size(cur->type, p.n_embd)*n_kv,
            0), {});
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

    return res;
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

ggml_tensor * llama_kv_minicache::fold_scores(ggml_context * ctx, ggml_tensor * q, int32_t il, uint32_t n_kv,
        uint32_t n_embd_head_k, uint32_t n_head_kv, const llama_kv_minicache_inputs & inp) const {
    const int32_t ipk = pool_of[2*il + KIND_K];
    const auto & p = pools[ipk];
    ggml_tensor * kq;
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
    return kq;
}

ggml_tensor * llama_kv_minicache::fold_values(ggml_context * ctx, ggml_tensor * kq, int32_t il, uint32_t n_kv,
        uint32_t n_embd_head_v, uint32_t n_head_kv, const llama_kv_minicache_inputs & inp) const {
    const int32_t ipv = pool_of[2*il + KIND_V];
    const auto & p = pools[ipv];
    ggml_tensor * kqv;
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
    return kqv;
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
        kq = fold_scores(ctx, q, il, n_kv, n_embd_head_k, n_head_kv, inp);
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
        kqv = fold_values(ctx, kq, il, n_kv, n_embd_head_v, n_head_kv, inp);
    }

    ggml_tensor * cur = ggml_permute(ctx, kqv, 0, 2, 1, 3); // [n_embd_head_v, n_head, n_tokens]

    return logged(ggml_cont_2d(ctx, cur, cur->ne[0]*cur->ne[1], n_tokens), { q_cur, kq_mask, k_dense, v_dense });
}
