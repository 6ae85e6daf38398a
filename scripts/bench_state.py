#!/usr/bin/env python3
"""Save and load time of a merged cache's state, on the CPU and on an rpc-server on loopback.

    .venv/bin/python scripts/bench_state.py [--tokens 4096] [--reps 3] [--where local,rpc] [--flash-attn on|off]

The default model, n_ctx = tokens, the shipped f16 calibration (8 pools, window 256), filled with
tokens - 64 tokens of Python's documentation. save: Llama.save_state() (llama-cpp-python asks
llama.cpp for the state's size, then copies it); load: Llama.load_state() of that state into the same
context. rpc: the model and its cache on ggml-rpc-server (the engine's own build, started here on
127.0.0.1 with 2 threads), so every copy between host and cache is a network round trip. Prints the
median of --reps for each, and the state's size. To compare engine builds, point
MINICACHE_GGUF_LIB_DIR at each (scripts/build_engine.py prints where it installs them).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydoc_data.topics

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minicache_gguf import Llama, MergeConfig, _engine  # noqa: E402
from minicache_gguf.calfile import find_auto  # noqa: E402
from minicache_gguf.model import ModelInfo, default_model_path  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_rpc():
    port = _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([str(_engine.active_lib_dir() / _engine.RPC_SERVER), "--host", "127.0.0.1", "--port", str(port),
                             "--threads", "2"], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return f"127.0.0.1:{port}", proc


def measure(where: str, tokens: int, reps: int, flash_attn: bool) -> dict:
    model = default_model_path()
    cfg = MergeConfig(calibration=str(find_auto(ModelInfo.of(model), MergeConfig())))
    proc = None
    kw = {}
    if where == "rpc":
        endpoint, proc = _start_rpc()
        kw = dict(rpc_servers=endpoint, n_gpu_layers=-1)
    try:
        llm = Llama(model, n_ctx=tokens, n_batch=512, flash_attn=flash_attn, verbose=False, kv_merge=cfg, **kw)
        text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
        toks = llm.tokenize(text.encode())[:tokens - 64]
        llm.eval(toks)
        saves, loads = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            state = llm.save_state()
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            llm.load_state(state)
            loads.append(time.perf_counter() - t0)
        size = state.llama_state_size
        merged = llm.kv_stats().tokens_merged
        llm.close()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    return dict(save=statistics.median(saves), load=statistics.median(loads), size=size, merged=merged)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--where", default="local,rpc")
    ap.add_argument("--flash-attn", choices=["on", "off"], default="off")
    a = ap.parse_args(argv)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"engine: {_engine.active_lib_dir()}")
    print("| where | tokens | flash attention | merged | state MiB | save s | load s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for where in a.where.split(","):
        r = measure(where, a.tokens, a.reps, a.flash_attn == "on")
        print(f"| {where} | {a.tokens} | {a.flash_attn} | {r['merged']} | {r['size'] / 2**20:.1f} | {r['save']:.3f} | {r['load']:.3f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
