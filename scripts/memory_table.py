#!/usr/bin/env python3
"""Allocated KV memory per cache mode and context length, as llama.cpp allocates it (no decoding).

    .venv/bin/python scripts/memory_table.py [--ctx 512,1024,2048,4096,8192,16384]

Each row is a real context of the default model with default settings (merged contexts: window 256,
gamma 0.05, n_ubatch 256); the figure is Llama.kv_stats().kv_bytes (the cache's own buffers), with
the ratio to stock f16 at the same n_ctx.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minicache_gguf import Llama, MergeConfig, default_model_path  # noqa: E402
from minicache_gguf.llama import CalibrationContextWarning  # noqa: E402

ROWS = [
    ("f16", {}),
    ("paper (7 pairs, K+V)", dict(kv_merge=MergeConfig(calibration="paper"))),
    ("aligned (shipped calibration)", dict(kv_merge=MergeConfig(calibration="auto"))),
    ("q8_0", dict(type_k="q8_0", type_v="q8_0", flash_attn=True)),
    ("q8_0 + paper", dict(type_k="q8_0", type_v="q8_0", flash_attn=True, kv_merge=MergeConfig(calibration="paper"))),
    ("q4_0", dict(type_k="q4_0", type_v="q4_0", flash_attn=True)),
    ("q4_0 + paper", dict(type_k="q4_0", type_v="q4_0", flash_attn=True, kv_merge=MergeConfig(calibration="paper"))),
    ("q4_0 + aligned", dict(type_k="q4_0", type_v="q4_0", flash_attn=True, kv_merge=MergeConfig(calibration="auto"))),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", default="512,1024,2048,4096,8192,16384", help="context lengths")
    a = ap.parse_args()
    try:
        ctxs = [int(c) for c in a.ctx.split(",")]
    except ValueError:
        ap.error(f"--ctx {a.ctx!r} is not valid: expected comma-separated integers")
    if any(c < 256 for c in ctxs):
        ap.error(f"--ctx {a.ctx!r} is not valid: expected context lengths >= 256")
    model = str(default_model_path())
    warnings.simplefilter("ignore", CalibrationContextWarning)  # allocation only: nothing is decoded
    res = {}
    for name, kw in ROWS:
        for c in ctxs:
            llm = Llama(model, n_ctx=c, verbose=False, **kw)
            res[name, c] = llm.kv_stats().kv_bytes
            llm.close()
    print("| cache | " + " | ".join(str(c) for c in ctxs) + " |")
    print("|---|" + "---|" * len(ctxs))
    for name, _ in ROWS:
        cells = [f"{res[name, c] / 2**20:.1f} MiB" + ("" if name == "f16" else f" ({res['f16', c] / res[name, c]:.2f}×)")
                 for c in ctxs]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
