#pragma once

// MiniCache: cross-layer KV cache merging (Liu et al., NeurIPS 2024)
//
// Adjacent layer pairs (S, S+1), (S+2, S+3), ... keep ONE shared unit direction per token (SLERP of
// the two layers' rows) plus each layer's per-token norm, instead of two dense rows. The most recent
// tokens (staging) and the most distinct pairs (retention) are kept exact in a bounded pool of slots.
//
// Aligned merging: a pair may instead be listed explicitly, per kind (K or V), with an orthogonal
// rotation R fitted on calibration text: the lower layer's rows are merged as x * R and restored as
// norm * dir * R^T. Decoding folds R into the query (K) and into the attention output (V), so a
// decoded token never rotates the cached rows.
//
// Several sequences (n_seq_max > 1) need a unified KV cache (kv_unified = true): each sequence keeps
// its own staging window and retention, applied when it receives tokens.
//
// Configuration does not go through llama_context_params (bindings mirror that struct by value):
// llama_minicache_set_pending() arms the next llama_init_from_model() call on this thread.

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

    enum llama_minicache_retention {
        LLAMA_MINICACHE_RETAIN_TOPK      = 0, // keep the ceil(gamma * n_merged) most distinct pairs
        LLAMA_MINICACHE_RETAIN_THRESHOLD = 1, // keep d > d_min + (d_max - d_min) * (1 - gamma), bounded
    };

    enum llama_minicache_cell_state {
        LLAMA_MINICACHE_CELL_EMPTY    = 0,
        LLAMA_MINICACHE_CELL_STAGED   = 1, // recent, exact, not merged yet
        LLAMA_MINICACHE_CELL_MERGED   = 2, // shared direction + norms only
        LLAMA_MINICACHE_CELL_RETAINED = 3, // merged, and kept exact because it is among the most distinct
    };

    enum llama_minicache_rot {
        LLAMA_MINICACHE_ROT_NONE = 0, // the paper's merge
        LLAMA_MINICACHE_ROT_FULL = 1, // r: one n_embd x n_embd row-major orthogonal matrix (whole rows)
        LLAMA_MINICACHE_ROT_HEAD = 2, // r: n_head_kv row-major n_embd_head x n_embd_head orthogonal blocks, head by head
    };

    // one merged (layer pair, kind): layers il and il + 1
    struct llama_minicache_pair {
        int32_t       kind; // 0 = K, 1 = V
        int32_t       il;   // the lower layer
        int32_t       rot;  // enum llama_minicache_rot
        int32_t       n_r;  // floats in r: n_embd^2 (ROT_FULL), n_embd * n_embd_head (ROT_HEAD), 0 (ROT_NONE)
        const float * r;    // the rotation (copied by llama_minicache_set_pending), NULL for ROT_NONE
    };

    struct llama_minicache_params {
        int32_t start_layer; // first merged layer S, -1 = n_layer / 2
        float   t;           // SLERP parameter in [0, 1]
        float   gamma;       // retention fraction in [0, 1]
        int32_t window;      // staging window W (most recent tokens kept exact), >= 1
        int32_t n_ubatch;    // largest ubatch the context decodes: the staging pool holds max(W, n_ubatch)
        bool    merge_k;
        bool    merge_v;
        int32_t retention;   // enum llama_minicache_retention
        int32_t n_pairs;     // > 0: merge exactly these pairs (start_layer, merge_k and merge_v are then ignored)
        const struct llama_minicache_pair * pairs;
    };

    struct llama_minicache_stats {
        int32_t n_layer;
        int32_t start_layer;
        int32_t n_pairs;          // merged layer pairs
        int32_t merge_k;
        int32_t merge_v;
        int32_t n_pools;          // (pair, K/V) combinations merged
        int32_t type_k;           // ggml type of the K cache (merged pools store it too)
        int32_t type_v;           // ggml type of the V cache
        int32_t attn_rot_k;       // size of llama.cpp's Hadamard blocks on cached K rows (0: none)
        int32_t attn_rot_v;       // the same for V
        int64_t kv_size;          // cells
        int64_t n_slots;          // exact slots per merged layer and kind (staging + retention)
        int64_t n_rows;           // rows allocated for them: n_slots + 1 zero row
        int64_t n_stage;          // staging capacity
        int64_t n_retain_max;     // retention capacity
        int64_t kv_bytes;         // bytes of all KV buffers allocated by this cache
        int64_t kv_bytes_dense;   // bytes a stock cache would allocate for the same cells and types
        int64_t n_cells_used;     // occupied cells
        int64_t n_staged;         // cells staged (same in every pool)
        int64_t n_merged;         // cells merged (same in every pool)
        int64_t n_retained;       // retained cells, summed over the pools
        int32_t n_rot;            // pools with an alignment rotation
        int64_t rot_bytes;        // bytes of the rotations (included in kv_bytes)
        int64_t host_rows;        // rows copied between the host and the merged pools so far (state save/load and
                                  // llama_minicache_get_rows only: the merge step runs on the pools' backend)
        int64_t merge_graphs;     // graphs the merge step computed on that backend so far
        int64_t merge_uploads;    // host-to-device copies the merge step made so far (index and value arrays)
        int64_t merge_syncs;      // times the merge step waited for its backend so far (graph computes, read-backs)
    };

    LLAMA_API struct llama_minicache_params llama_minicache_default_params(void);

    // arm (params != NULL) or disarm (NULL) MiniCache for the next context created on this thread;
    // the context consumes it. Returns false (and sets the last error) if params are invalid.
    LLAMA_API bool llama_minicache_set_pending(const struct llama_minicache_params * params);

    // arm the params of a file (the tools' --kv-merge-params; written by minicache-gguf) for the next
    // context created on this thread, with the context's n_ubatch. The file, little-endian:
    //   char[8] "MCKVPAR1"; int32 start_layer; float t; float gamma; int32 window; int32 merge_k;
    //   int32 merge_v; int32 retention; int32 n_pairs; n_pairs x { int32 kind, il, rot, n_r; float r[n_r] }
    // Returns false (and sets the last error) if the file cannot be read or its params are invalid.
    LLAMA_API bool llama_minicache_set_pending_file(const char * path, int32_t n_ubatch);

    // why MiniCache was refused on this thread ("" if it was not); context creation fails then
    LLAMA_API const char * llama_minicache_last_error(void);

    // the getters below only read: they wait for ctx's pending computation (llama_synchronize) and never
    // change the cache (seq_rm and seq_keep release freed cells at once); like llama_decode, they must
    // not be called while another thread uses ctx

    // layout and fill of ctx's KV cache (merged or not: start_layer = -1 when nothing is merged);
    // false if ctx's memory is not a KV cache. An iSWA cache (interleaved sliding-window layers):
    // the full-attention layers' cache, with kv_bytes and kv_bytes_dense adding the sliding-window one's
    LLAMA_API bool llama_minicache_get_stats(const struct llama_context * ctx, struct llama_minicache_stats * out);

    // the merged pools of ctx's KV cache (r is set to NULL): fills up to n_max, returns how many there are
    LLAMA_API int32_t llama_minicache_get_pairs(const struct llama_context * ctx, struct llama_minicache_pair * out, int32_t n_max);

    // restored rows of layer il (kind 0 = K, 1 = V) for cells [c0, c0 + n): n * n_embd_gqa floats.
    // works for merged and ordinary layers; returns the row width, or -1 on bad arguments
    LLAMA_API int32_t llama_minicache_get_rows(
            const struct llama_context * ctx, int32_t il, int32_t kind, int32_t c0, int32_t n, float * out);

    // the rotation an aligned pool applies (layer il / kind), in the basis of the cached rows (after
    // llama.cpp's Hadamard rotation of quantized K/V: H R H): an n_embd x n_embd row-major matrix.
    // copies up to n floats to out; returns n_embd^2, 0 if the pool has no rotation, -1 if not merged
    LLAMA_API int32_t llama_minicache_get_rotation(
            const struct llama_context * ctx, int32_t il, int32_t kind, float * out, int32_t n);

    // per-cell state (enum llama_minicache_cell_state) and angular distance of the pool holding
    // layer il / kind; returns 0, or -1 if that layer/kind is not merged
    LLAMA_API int32_t llama_minicache_get_cells(
            const struct llama_context * ctx, int32_t il, int32_t kind, int32_t c0, int32_t n,
            uint8_t * state, float * dist);

#ifdef __cplusplus
}
#endif
