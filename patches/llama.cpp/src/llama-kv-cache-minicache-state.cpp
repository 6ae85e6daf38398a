// llama_kv_minicache, state and introspection: the MiniCache section of a KV state (format, write,
// checked read), bulk row copies between the pool tensors and the host, and the getters behind the
// C API (stats, pairs, restored rows, rotations, cell states)

#include "llama-kv-cache-minicache.h"
#include "llama-kv-cache-minicache-impl.h"

#include "llama-hparams.h"
#include "llama-impl.h"
#include "llama-io.h"

#include "ggml-backend.h"

#ifdef LLAMA_MINICACHE
#include "minicache.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

//
// native core calls (the core is linked by LLAMA_MINICACHE_DIR, see src/CMakeLists.txt)
//

#ifdef LLAMA_MINICACHE
static int32_t mc_type(ggml_type type) {
    return type == GGML_TYPE_F16 ? MINICACHE_TYPE_F16 : MINICACHE_TYPE_F32;
}
#endif

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

//
// rows between the pool tensors and the host
//

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

//
// state
//

static constexpr uint32_t MC_STATE_MAGIC   = 0x564B434D; // "MCKV"
static constexpr uint32_t MC_STATE_VERSION = 7;

// what a state depends on: retention, window, the slot capacities (from n_ctx and n_ubatch), the
// cache types and llama.cpp's Hadamard blocks (the basis of the stored rows), the pools
static constexpr size_t MC_LAYOUT_HEAD = 10;

std::vector<int32_t> llama_kv_minicache::layout_desc() const {
    std::vector<int32_t> res = { params.retention, params.window, (int32_t) kv_size, (int32_t) n_stage_all, (int32_t) n_retain_max,
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
        rebuild_stage_list();
        flush();
    } catch (...) {
        // a refused state leaves no trace: its cells read as empty
        rebuild_free_slots();
        for (uint32_t c : cells) {
            release_cell(c);
        }
        rebuild_stage_list();
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
            if (n_staged_cur >= n_stage_all) {
                throw std::runtime_error(format("MiniCache state: more staged tokens than the staging pool holds (%u)", n_stage_all));
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
                // NaN/Inf (the merge's marker for a non-finite row)
                if (!(d >= 0.0f && d <= 1.0f) || n[0] < 0.0f || n[1] < 0.0f) {
                    throw std::runtime_error(format("MiniCache state: cell %u has distance %g and norms %g, %g "
                            "(expected a distance in [0, 1] and norms >= 0)", c, d, n[0], n[1]));
                }
                // a non-finite row is at distance 1 (the merge's rule), whatever the state says
                p.dist[c]         = std::isfinite(n[0]) && std::isfinite(n[1]) ? d : 1.0f;
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
                    throw std::runtime_error(format("MiniCache state: slot %d holds two cells (the state names it twice, "
                            "or another sequence holds it: one sequence's state loads only while the slots "
                            "it was saved with are free)", s));
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
    st.merge_uploads = n_uploads;
    st.merge_syncs  = n_syncs;
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
    const std::string seqs = n_seq > 1 ? format(" for %u sequences", n_seq) : "";
    return format("MiniCache: %s, t = %.2f, gamma = %.3f (%s), "
            "%u exact slots per layer (%u staging, window %d%s; %u retention)",
            list.c_str(), params.t, params.gamma,
            params.retention == LLAMA_MINICACHE_RETAIN_TOPK ? "top-k" : "threshold",
            n_slots, n_stage_all, params.window, seqs.c_str(), n_retain_max);
}
