#pragma once

// MiniCache merged layer pairs inside llama_kv_cache (see include/llama-minicache.h)
//
// Per merged pair (a, b = a + 1) and per merged kind (K or V), a "pool" holds:
//   dir     [n_embd, kv_size]     per cell, in the cache type: the shared unit direction of a merged
//                                 cell, or layer b's exact row while the cell owns a slot (staged or
//                                 retained; a retained cell's direction is merged again from its exact
//                                 rows when it gives the slot up)
//                                 (V of a float type: transposed, [kv_size, n_embd]: the attention
//                                 sums over cells; quantized V is stored by rows, as llama.cpp does)
//   norm[x] [1, kv_size] F32      the per-cell factor of layer a (x = 0) and b (x = 1) on dir: the norm
//                                 of a merged cell without a slot; for a cell with a slot 0 (a) and 1 (b)
//   rows    [n_embd, n_rows]      layer a's exact rows of the cells that own a slot; rows n_slots.. stay 0
//                                 (laid out like the directions)
//   rot     F32                   aligned pools: the rotation R of layer a (merged as x_a * R), laid out
//                                 for the decoding fold (K: R^T row-major, V: R row-major; per-head
//                                 blocks [n_embd_head, n_embd_head, n_head_kv] for ROT_HEAD)
// and, on the host, the slot <-> cell maps. New tokens are written to slots (staging); tokens
// leaving the staging window are merged between ubatches by small ggml graphs computed on the
// backend that holds the pool (CPU, CUDA, RPC, ...: the merge of the NumPy reference,
// minicache_gguf/reference.py, in f32 ggml ops); only per-cell scalars (norms, distances, slot and
// cell ids) cross to the host, which keeps the most distinct merged pairs in their slots (retention).
// Layer b is read back in the graph as dir * norm; layer a as dir * norm (merged cells) + rows
// gathered by slot (exact cells).
//
// llama_kv_minicache is implemented in llama-kv-cache-minicache.cpp (construction, tensors,
// rotations, slot bookkeeping, retention, prepare, clear), -graph.cpp (graph inputs, writes,
// restored K/V, the folded attention), -merge.cpp (the merge step on the device, flush) and
// -state.cpp (state save/load, introspection); the C API, the armed params and the llama_kv_cache
// glue in llama-minicache.cpp.

#include "llama-minicache.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

struct llama_hparams;
struct llama_memory_i;
class llama_kv_cells;
struct llama_ubatch;
class llama_io_write_i;
class llama_io_read_i;

// Quantized and bf16 cache types: the merge dequantizes the exact rows, merges them in f32 (the merge
// graphs) and quantizes the direction with the CPU backend's own conversion (the rounding of
// llama.cpp writing that type); norms stay F32. Rows written with llama.cpp's Hadamard rotation
// (attn_rot_k/v) are merged in that basis: an aligned pool's R becomes H R H (set_attn_rot).

// ubatches up to this many tokens attend merged layers with the norms folded in (with or without flash
// attention: the folded attention is the plain softmax one); larger ones restore K/V
#define LLAMA_MINICACHE_FOLD_MAX_TOKENS 32

// tokens a sequence stages beyond its window before it merges: it merges only when it would stage more
// than window + block tokens, then everything beyond its window at once, so a decoding sequence merges
// once per block (staging capacity max(window + block, n_ubatch); minicache_gguf.config.MERGE_BLOCK)
#define LLAMA_MINICACHE_MERGE_BLOCK 32

// nodes one merged pool adds to the main graph at most (both attention paths, rotations, gathers)
#define LLAMA_MINICACHE_ATTN_NODES_PER_POOL 64

// one merged (layer pair, kind) as configured, with its rotation (see llama_minicache_pair)
struct llama_minicache_pair_spec {
    int32_t            kind;
    int32_t            il;
    int32_t            rot;
    std::vector<float> r;
};

// params + the explicit pairs (empty: pairs from start_layer, kinds from merge_k/merge_v)
struct llama_minicache_config {
    llama_minicache_params                 params;
    std::vector<llama_minicache_pair_spec> pairs;
};

// marks the layer count of a KV state written by a merged cache (the stock reader refuses it)
#define LLAMA_MINICACHE_STATE_TAG 0x4D430000u

// graph inputs of the merged layers, one entry per pool
struct llama_kv_minicache_inputs {
    std::vector<ggml_tensor *> write_idxs;  // [n_tokens] I64: slot of each ubatch token (V: [n_tokens*n_embd], one per element)
    std::vector<ggml_tensor *> write_cells; // the same for the cell of each ubatch token (layer b's row goes to dir)
    std::vector<ggml_tensor *> gather_idxs; // [n_kv]     I32: slot of each cell, n_slots (the zero row) if none
    // the folded attention's cell of each slot (nullptr for ubatches that restore K/V). K pools: [n_rows],
    // n_kv (a spare cell) for free slots: the exact scores are scattered to their cells. V pools:
    // [n_rows, n_tokens*n_head], 0 for free slots (zero rows): the weights are gathered per (token, head)
    std::vector<ggml_tensor *> fold_idxs;
    std::vector<ggml_tensor *> fold_zero;   // K pools: [1, n_kv + 1, n_tokens*n_head] F32 zeros (a fill node), the scatter's target
};

class llama_kv_minicache {
public:
    static constexpr int KIND_K = 0;
    static constexpr int KIND_V = 1;

    // throws std::runtime_error naming the problem when this model/cache cannot be merged
    llama_kv_minicache(
            const llama_hparams & hparams,
   const llama_minicache_config & config,
                      ggml_type   type_k,
                      ggml_type   type_v,
                       uint32_t   kv_size,
                           bool   v_trans,
                       uint32_t   n_seq_max);
    ~llama_kv_minicache();

    llama_kv_minicache(const llama_kv_minicache &) = delete;
    llama_kv_minicache & operator=(const llama_kv_minicache &) = delete;

    bool is_merged(int32_t il, int kind) const;

    // a decoding ubatch of layer il may fold the norms into the attention (build_attn); otherwise the
    // layer's merged K/V are restored and the stock attention runs (see check_merge_ops)
    bool can_fold(int32_t il) const;

    // number of tensors create_tensors() adds (to size the no_alloc contexts)
    size_t n_tensors() const;

    // graph nodes the merged layers add at most (both attention paths, rotations, gathers)
    uint32_t n_graph_nodes() const { return LLAMA_MINICACHE_ATTN_NODES_PER_POOL*(uint32_t) pools.size(); }

    // create the tensors in the (no_alloc) context of each layer's buffer type
    void create_tensors(const std::function<ggml_context * (int32_t il)> & ctx_of_layer);

    // write the rotations of aligned pools to their tensors (after the buffers are allocated or cleared)
    // builds the merge step's graphs for one cell per pool and checks every op on the backend holding
    // the pools: throws, naming op, type and backend, if one is not supported (after the buffers exist).
    // Throws likewise if the backend cannot restore a pool's rows (CPY to F32, GET_ROWS of its type).
    // Turns the decoding fold off for the layers whose fold sums rows with an OUT_PROD that backend
    // lacks for their row type (V stored by rows: quantized, or dense V with flash attention on)
    void check_merge_ops();

    void upload_rotations();

    // the norm tensors' values of empty cells (0 for layer a, 1 for layer b: a staged cell reads that
    // too, so a new token's slot needs no norm write); after the buffers are allocated or cleared
    void init_norms();

    // llama.cpp rotates quantized K (V) rows with a Hadamard matrix before caching them (attn_rot_k/v,
    // the matrices by size): aligned pools move their rotation into that basis. Call once, before
    // the first ubatch, then upload_rotations()
    void set_attn_rot(bool rot_k, bool rot_v, uint32_t n_embd_head_k_all,
            const std::unordered_map<int64_t, std::vector<float>> & hadamard);

    // staging slots of all sequences together: the most tokens one ubatch may place
    uint32_t get_n_stage() const { return n_stage_all; }

    // merged storage of one kind, and what the same layers would take dense
    size_t size_bytes (int kind) const;
    size_t dense_bytes(int kind) const;

    //
    // graph
    //

    void build_inputs(ggml_context * ctx, uint32_t n_tokens, uint32_t n_kv, llama_kv_minicache_inputs & inp) const;
    void set_inputs(const llama_kv_minicache_inputs & inp, const std::vector<uint32_t> & ubatch_cells, uint32_t n_kv) const;

    // write the rows of a ubatch [n_embd, n_tokens] to their slots
    ggml_tensor * cpy(ggml_context * ctx, ggml_tensor * cur, int32_t il, int kind, const llama_kv_minicache_inputs & inp) const;

    // restored K (or V) of layer il, viewed like llama_kv_cache::get_k/get_v
    ggml_tensor * get(ggml_context * ctx, int32_t il, int kind, uint32_t n_kv, uint32_t n_embd_head, uint32_t n_head_kv,
            const llama_kv_minicache_inputs & inp) const;

    // attention of layer il without restoring merged K/V (the plain softmax attention, whether flash
    // attention is on or off): norms scale the
    // scores and the softmax weights, exact rows are gathered by slot; an aligned pool's rotation
    // is folded into the query (K) and the output (V). k_dense/v_dense: the
    // stock views of a kind that is not merged (nullptr if merged). returns [n_embd_v, n_tokens]
    ggml_tensor * build_attn(ggml_context * ctx, ggml_tensor * q_cur, ggml_tensor * k_dense, ggml_tensor * v_dense,
            ggml_tensor * kq_mask, float kq_scale, float max_bias, int32_t il, uint32_t n_kv,
            uint32_t n_embd_head_k, uint32_t n_embd_head_v, uint32_t n_head_kv, const llama_kv_minicache_inputs & inp) const;

    //
    // host side, before a ubatch is placed (the previous graph has completed)
    //

    // forget cells that were freed, merge the tokens leaving the staging window of each sequence of the
    // ubatch, give the new cells (new_cells[i]: the cell of the ubatch's token i) slots
    void prepare(const llama_kv_cells & cells, const std::vector<uint32_t> & new_cells, const llama_ubatch & ubatch);

    // forget cells that were freed (seq_rm, ...): their slots return to the pools
    void forget_freed(const llama_kv_cells & cells);

    // rows copied between the host and the pool tensors (state save/load, its size query, and
    // introspection: the merge step never copies rows), and merge-step graphs computed
    int64_t get_n_host_rows() const { return n_host_rows; }
    int64_t get_n_graphs()    const { return n_graphs; }

    void clear();

    //
    // state (after llama_kv_cache's own K/V records; merged kinds have none there)
    //

    void state_write(llama_io_write_i & io, const std::vector<uint32_t> & cells) const;

    // cells: destination of each saved cell, in order; throws on a state saved with another layout
    void state_read(llama_io_read_i & io, const llama_kv_cells & kv_cells, const std::vector<uint32_t> & cells);
    void state_read_checked(llama_io_read_i & io, const llama_kv_cells & kv_cells, const std::vector<uint32_t> & cells);
    void state_read_cells(llama_io_read_i & io, const std::vector<uint32_t> & cells);

    //
    // introspection (C API)
    //

    void    fill_stats(llama_minicache_stats & st) const;
    int32_t get_pairs(llama_minicache_pair * out, int32_t n_max) const;
    int32_t get_rows (int32_t il, int kind, int32_t c0, int32_t n, float * out) const;
    int32_t get_rotation(int32_t il, int kind, float * out, int32_t n) const;
    int32_t get_cells(int32_t il, int kind, int32_t c0, int32_t n, uint8_t * state, float * dist) const;

    std::string describe() const;

private:
    struct pool {
        int      kind;
        int32_t  il[2];
        uint32_t n_embd;
        uint32_t n_embd_head;
        uint32_t n_head_kv;
        uint32_t n_head; // query heads of the pair's layers

        int32_t            rot = LLAMA_MINICACHE_ROT_NONE;
        std::vector<float> r;           // R's diagonal blocks, row-major: one n_embd x n_embd (ROT_FULL) or
                                        // n_head_kv of n_embd_head x n_embd_head (ROT_HEAD)
        uint32_t           r_block = 0; // the width of one block
        uint64_t           r_hash = 0;

        ggml_tensor * rot_t   = nullptr;
        ggml_tensor * dir     = nullptr;
        ggml_tensor * norm[2] = { nullptr, nullptr };
        ggml_tensor * rows    = nullptr;

        std::vector<int32_t> slot_of_cell; // -1: no slot
        std::vector<int32_t> cell_of_slot; // -1: free
        std::vector<float>   dist;         // angular distance of merged cells
        std::vector<float>   norm_host[2]; // the norms of merged cells; the norm tensors hold them only
                                           // for cells without a slot (see sync_norm)
        std::vector<float>   norm_dev[2];  // what the norm tensors hold (flush() writes only what differs)

        // lowest free slot first: the slot of a token depends only on which slots are free, so a
        // cache emptied and refilled lays its rows out as a fresh one does
        std::priority_queue<int32_t, std::vector<int32_t>, std::greater<int32_t>> free_slots;

        // device writes decided on the host, applied by flush(): merged cells giving their slot up
        // (cell, slot: the direction is merged again from the exact rows), slots and cells to zero,
        // cells whose norm factors changed (see sync_norm)
        std::vector<std::pair<uint32_t, int32_t>> pend_demote;
        std::vector<int32_t>  pend_zero_slots;
        std::vector<uint32_t> pend_zero_cells;
        std::vector<uint32_t> pend_norm;
        std::vector<uint8_t>  norm_pending;
    };

    // construction: the LLAMA_MINICACHE_* test variables, the (pair, kind) list (explicit, or every pair
    // from start_layer), the cache types each merged kind can hold, one pool checked against the model
    void read_test_env();
    std::vector<llama_minicache_pair_spec> pair_list(int32_t n_layer) const;
    void check_types(const std::vector<llama_minicache_pair_spec> & todo) const;
    pool make_pool(const llama_minicache_pair_spec & q, int32_t n_layer) const;

    // where the merge step's graphs run: a backend for the buffer type holding pool tensors
    struct merge_backend {
        ggml_backend_buffer_type_t buft    = nullptr;
        ggml_backend_t             backend = nullptr;
        ggml_gallocr_t             galloc  = nullptr;
    };

    const llama_hparams & hparams;
    const llama_minicache_params params;
    const std::vector<llama_minicache_pair_spec> specs;

    const ggml_type type_k;
    const ggml_type type_v;
    const uint32_t  kv_size;
    const bool      v_trans; // the cache's V is transposed (flash attention off): restored V is returned that way

    uint32_t n_attn_rot[2] = { 0, 0 }; // size of llama.cpp's Hadamard blocks on K and V rows (0: none)

    int32_t  start_layer  = 0;
    int32_t  n_pairs      = 0;
    uint32_t n_seq        = 1; // sequences the cache holds (n_seq_max; one unified stream)
    uint32_t n_stage      = 0; // staging capacity of one sequence: max(window + LLAMA_MINICACHE_MERGE_BLOCK, n_ubatch)
    uint32_t n_stage_all  = 0; // of all sequences: min(n_seq * n_stage, kv_size)
    uint32_t n_retain_max = 0; // retention capacity: ceil(gamma * kv_size) + n_seq - 1 (each sequence's ceil)
    uint32_t n_slots      = 0; // n_stage_all + n_retain_max
    uint32_t n_rows       = 0; // rows of the exact-slot tensors: n_slots + 1 (a zero row)

    std::vector<pool>    pools;
    std::vector<int32_t> pool_of;  // [il * 2 + kind] -> pool index, -1 if not merged

    // shared by all pools: which cells are staged or merged, and the staging order
    std::vector<uint8_t>  staged;
    std::vector<uint8_t>  merged;
    std::vector<uint64_t> stage_seq;
    uint64_t              stage_counter = 0;

    // the staged cells as (cell, staging order), oldest first: an entry is live while its cell is staged
    // with that order (merged and released cells leave dead entries, dropped in bulk), so prepare()
    // visits the staging pools, not every cell
    std::vector<std::pair<uint32_t, uint64_t>> stage_list;
    bool is_staged_entry(const std::pair<uint32_t, uint64_t> & e) const { return staged[e.first] && stage_seq[e.first] == e.second; }
    void rebuild_stage_list();

    uint32_t n_staged_cur = 0;
    uint32_t n_merged_cur = 0;

    std::vector<merge_backend> backends;
    mutable int64_t n_host_rows = 0;
    int64_t         n_graphs    = 0;
    int64_t         n_uploads   = 0; // host-to-device copies of the merge step (its inputs)
    int64_t         n_syncs     = 0; // blocking waits of the merge step (graph computes, read-backs)
    // LLAMA_MINICACHE_FAIL_GRAPH=N (read at creation): the merge graph run as number N fails once, as a
    // backend failure would (tests of the recovery from a failed merge step)
    int64_t         fail_graph  = -1;
    // LLAMA_MINICACHE_REFUSE_OPS=OP[,OP...] (ggml op names, read at creation, kept as ",OP,...,"): the merge
    // step treats those ops as unsupported by every backend, as a backend without them would (tests)
    std::string     refuse_ops;
    // LLAMA_MINICACHE_OPS_LOG=FILE (read at creation): every node the engine builds (attention,
    // restore, writes, the merge step's creation check) is appended to FILE as one line: op, type,
    // source types and layouts (the test that holds them against the GPU backends' supports_op)
    std::string     ops_log;
    // out, after appending the nodes between it and stop (leaves excluded) to ops_log
    ggml_tensor * logged(ggml_tensor * out, std::initializer_list<const ggml_tensor *> stop) const;
    void log_nodes(const std::vector<const ggml_tensor *> & nodes) const;
    // LLAMA_MINICACHE_RESTORE=1 (read at creation): every ubatch restores merged K/V and runs the stock
    // attention (debugging, benchmarks of the two paths)
    bool            force_restore = false;
    // per layer: 0 where a decoding ubatch restores instead of folding (set by check_merge_ops)
    std::vector<uint8_t> fold_ok;

    ggml_type type_of(int kind) const { return kind == KIND_K ? type_k : type_v; }

    // the type merged layers are restored to in the graph: the cache type, so that the attention runs
    // as on the stock cache (a dequantized q8_0/q4_0 row quantizes back to the same bytes); f16 for a
    // rotated layer and for other quantized types (re-quantizing them would add their error again)
    ggml_type restored_type(int kind, bool rotated) const;

    // V directions and exact rows of a float type are stored transposed: the attention sums over
    // cells and slots (quantized V is stored by rows: its blocks run along the row)
    bool dir_trans(const pool & p) const { return p.kind == KIND_V && !ggml_is_quantized(type_v); }

    void release_cell(uint32_t c);
    void release_freed(const llama_kv_cells & cells);
    int32_t take_slot(pool & p, uint32_t c); // -1 when the pool has no free slot
    void free_slot(pool & p, int32_t s);
    // the norm tensors' value of cell c (written by flush()): its norms if merged without a slot (read as
    // dir * norm); with a slot 0 for layer a (its row is gathered) and 1 for layer b (dir holds its row);
    // 0 for an empty cell
    void sync_norm(pool & p, uint32_t c) const;
    float norm_value(const pool & p, uint32_t c, int x) const;
    // merged cell c gives its slot up: its direction, merged again from its exact rows by flush() (the
    // merge is deterministic per row), replaces layer b's row in dir
    void demote(pool & p, uint32_t c);
    // the bytes of the rows of dir (index: cell) or rows (index: slot) in runs of consecutive indices
    // (first, count), as (offset, size) ranges of the tensor in this order: the runs' rows one run after
    // the other, or, stored transposed, for each row element its values in every run. Either way the
    // bytes depend only on the indices' order, not on how they split into runs
    void row_ranges(const pool & p, const ggml_tensor * t, const std::vector<std::pair<uint32_t, uint32_t>> & runs,
            const std::function<void(size_t, size_t)> & fn) const;
    // rows [i0, i0 + n) of t copied to the host, laid out as row_ranges() gives them
    std::vector<uint8_t> get_row_block(const pool & p, ggml_tensor * t, uint32_t i0, uint32_t n) const;
    // row i of such a block (n rows) as one contiguous row
    void block_row(const pool & p, const uint8_t * block, uint32_t n, uint32_t i, uint8_t * row) const;
    void merge_cells(const std::vector<uint32_t> & cells_to_merge);

    // the merge step on the device (see flush)
    size_t backend_of(const ggml_tensor * t);
    void init_backends();
    void check_merge_graphs();
    bool backend_has_op(size_t ib, ggml_tensor * node) const;
    void check_fold_ops();
    // the pools whose tensors live on backend ib
    std::vector<size_t> pools_on(size_t ib);
    // every node of gf is an op the backend runs (else an error naming op, type and backend)
    void check_ops(size_t ib, ggml_cgraph * gf) const;
    // compute gf on backends[ib] after uploading inputs (tensor, bytes)
    void compute(size_t ib, ggml_cgraph * gf, const std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs);
    // rows idx (cells of dir, slots of rows) of a pool tensor as F32 [n_embd, n]
    ggml_tensor * gather(ggml_context * ctx, const pool & p, ggml_tensor * t, const std::vector<int32_t> & idx,
            std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs) const;
    // write src F32 [n_embd, n] to rows idx of a pool tensor
    // (trans: t is stored transposed, [rows, n_embd])
    ggml_tensor * scatter(ggml_context * ctx, ggml_tensor * t, ggml_tensor * src, const std::vector<int32_t> & idx, bool trans,
            std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs) const;
    // the merge of x0 (layer a; r0: x0 rotated, or x0) and x1 (layer b), F32 [n_embd, n]: [3n] = norms of
    // x0, norms of x1, angular distances; the direction F32 [n_embd, n] in *dir if dir is not nullptr
    ggml_tensor * build_merge(ggml_context * ctx, ggml_tensor * x0, ggml_tensor * r0, ggml_tensor * x1, ggml_tensor ** dir) const;
    // the merge's operands for the pools of a group (of one row width), side by side: layer a's exact
    // rows (slots), the same rotated (r0: aligned pools; x0 otherwise) and layer b's rows (cells)
    void merge_inputs(ggml_context * ctx, const std::vector<size_t> & group,
            const std::vector<std::vector<int32_t>> & slots, const std::vector<std::vector<int32_t>> & cells,
            std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs, ggml_tensor * out[3]) const;
    // pool indices grouped by row width
    std::vector<std::vector<size_t>> width_groups(const std::vector<size_t> & ips) const;
    // x [n_embd, n] F32 times R (x_a R, the aligned merge)
    ggml_tensor * rotate(ggml_context * ctx, const pool & p, ggml_tensor * x) const;
    // apply the pending device writes of every pool: demoted directions, then zeroed rows and norms
    void flush();
    // forget pending norm writes whose values the norm tensors already hold
    void drop_unchanged_norms();
    // flush's round 0 on backend ib: the demoted cells' directions into gf; returns the pools written
    std::vector<size_t> build_demotions(ggml_context * ctx, ggml_cgraph * gf, size_t ib,
            std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs);
    // flush's round 1 on backend ib: freed slots' and released cells' rows zeroed, changed norms written
    void build_zeroes_and_norms(ggml_context * ctx, ggml_cgraph * gf, size_t ib,
            std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> & inputs);
    // forget a pool's pending writes (applied, or nothing to apply them to)
    static void drop_pending(pool & p);
    // restored merged part of layer a of an aligned pool: cur [n_embd, n] * R^T, in F32
    ggml_tensor * unrotate(ggml_context * ctx, const pool & p, ggml_tensor * cur) const;
    // the folded attention of a merged K (scores [n_kv, n_tokens, n_head] of q [n_embd_head_k, n_tokens,
    // n_head]) and of a merged V (the weighted sum [n_embd_head_v, n_tokens, n_head] of the softmax kq)
    ggml_tensor * fold_scores(ggml_context * ctx, ggml_tensor * q, int32_t il, uint32_t n_kv,
            uint32_t n_embd_head_k, uint32_t n_head_kv, const llama_kv_minicache_inputs & inp) const;
    ggml_tensor * fold_values(ggml_context * ctx, ggml_tensor * kq, int32_t il, uint32_t n_kv,
            uint32_t n_embd_head_v, uint32_t n_head_kv, const llama_kv_minicache_inputs & inp) const;
    std::vector<int32_t> layout_desc() const;
    // keep the most distinct merged cells of sequence seq_id in a pool's slots, demote its others;
    // pending[c]: cell c merged in this step, its sequences' retention still to run
    void retain(pool & p, const llama_kv_cells & cells, llama_seq_id seq_id, const std::vector<uint8_t> & pending);
};

// llama_model::create_memory() takes the params armed on this thread (llama_minicache_set_pending)
// with this scope and hands them only to the plain llama_kv_cache it builds (arm() right before
// constructing it): never to a cache nested in another memory type. finish() refuses a memory
// that did not take them (throws after deleting mem), so armed params are never silently dropped.
struct llama_minicache_memory_scope {
    llama_minicache_memory_scope();
    ~llama_minicache_memory_scope();

    void arm();
    llama_memory_i * finish(llama_memory_i * mem);

    bool                   pending = false;
    llama_minicache_config config;
};

// remember why MiniCache was refused (read by llama_minicache_last_error)
void llama_minicache_set_error(const std::string & msg);

// whether a memory module is a KV cache with merged layers (applying its ubatches runs the merge step)
bool llama_minicache_active(llama_memory_i * mem);

// graph nodes the merged layers of a memory module add to a stock graph (an upper bound, for
// llama_context::graph_max_nodes); 0 for any other memory
uint32_t llama_minicache_graph_nodes(llama_memory_i * mem);
