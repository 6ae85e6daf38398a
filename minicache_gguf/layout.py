"""Closed-form KV memory of a merged cache (what the engine allocates, to the byte, before the
backend's buffer alignment).

For a model with L layers whose K and V rows are e_k and e_v values (a row of e values of the cache
type takes b(e) bytes: f16 2e, q8_0 34e/32, q4_0 18e/32, ...), a context of C cells, merge config
(S, W, gamma, merge_k, merge_v) and ubatch size U:

  pairs         P = floor((L - S) / 2)                  (l, l+1) for l = S, S+2, ...
  staging       s = min(max(W + B, U), C)               (B = MERGE_BLOCK: tokens staged beyond the window)
  retention     r = min(ceil(gamma * C), C)             (bounded top-k capacity)
  exact rows    R = s + r + 1 (one zero row), of layer a only: layer b's exact rows live in the
                direction tensor while the cell holds a slot
  per pair and merged kind with row width e:
                dir  b(e)*C  +  norms (F32) 2*4*C  +  exact rows b(e)*R
  every other (layer, kind): b(e)*C, as a stock cache
  stock cache:  L*(b_k(e_k) + b_v(e_v))*C

Cells without a slot gather a zero row in the restore.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import MERGE_BLOCK, MergeConfig, row_bytes


@dataclass(frozen=True)
class Layout:
    n_ctx: int
    n_pairs: int
    staging: int
    retention: int
    kv_bytes: int
    kv_bytes_dense: int

    @property
    def ratio(self) -> float:
        return self.kv_bytes_dense / self.kv_bytes


def retain_capacity(n_ctx: int, gamma: float) -> int:
    # the same rounding as minicache_retain_count (gamma as float32)
    g = float(np.float32(gamma))
    return 0 if g <= 0 else int(min(n_ctx, math.ceil(g * n_ctx - 1e-7 * n_ctx)))


def expected_layout(n_layer: int, n_embd_k: int, n_embd_v: int, n_ctx: int, cfg: MergeConfig,
                    n_ubatch: int, type_k: str = "f16", type_v: str = "f16") -> Layout:
    s_layer = cfg.resolve_start(n_layer)
    n_pairs = len(range(s_layer, n_layer - 1, 2))
    staging = min(max(cfg.window + MERGE_BLOCK, n_ubatch), n_ctx)
    retention = retain_capacity(n_ctx, cfg.gamma)
    bk, bv = row_bytes(type_k, n_embd_k), row_bytes(type_v, n_embd_v)
    dense = n_layer * (bk + bv) * n_ctx
    total = dense
    for b, merged in ((bk, cfg.merge_k), (bv, cfg.merge_v)):
        if merged:
            rows = staging + retention + 1
            pool = b * n_ctx + 2 * 4 * n_ctx + b * rows
            total += n_pairs * (pool - 2 * b * n_ctx)
    return Layout(n_ctx, n_pairs, staging, retention, total, dense)
