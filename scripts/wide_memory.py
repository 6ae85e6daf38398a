#!/usr/bin/env python3
"""What a merged KV cache costs at context creation on a model of 7B/8B layer width, against the stock cache.

    .venv/bin/python scripts/wide_memory.py [--ctx 32768,131072] [--types f16,q8_0,q4_0] [--reps 3] [--model-dir DIR]

The model: a random-weight GGUF of Llama 3 8B's layer width (n_embd 4096, 32 heads, 8 KV heads x 128,
n_ff 256, 4 layers; tests/synth.py layout "llama-8b-width", the default model's tokenizer), written
once under --model-dir (default /tmp/minicache-wide-memory). Per n_ctx and cache type (K and V
the same; flash attention on; n_batch = n_ubatch = 512, llama.cpp's default) it creates contexts for:
  stock         kv_merge=False
  paper         MergeConfig(calibration="paper", start_layer=0): pairs (0,1) and (2,3), K and V
  aligned-head  a calibration file with random orthogonal per-KV-head rotations for the same pairs
  aligned-full  the same with whole-row rotations (written here, no calibration run:
                MINICACHE_GGUF_NO_CALIBRATION=1 is set for this process and its children)
Every configuration runs in its own subprocess (this script with --one), reps interleaved:
  creation s   wall time of llama_init_from_model alone (llama-cpp-python's call that builds the
               llama_context: KV cache allocation and clearing, the compute graph reservation), timed
               by wrapping that function; the model load, the calibration file's checks and the
               Python wrapper's work around it are excluded. Median of --reps.
  KV MiB       Llama.kv_stats().kv_bytes (every buffer of the cache, merged pools and rotations included)
  compute MiB  llama.cpp's "<backend> compute buffer size" log lines (verbose=True, stderr), summed
               over backends, last reservation
  peak RSS     the child's ru_maxrss (the model included: llama.cpp maps its weights resident, ~730 MiB);
               "RSS ctx" is how much the resident set (VmRSS) grew during llama_init_from_model: the pages
               the context wrote (the KV cache is cleared at creation; the compute buffer is only reserved)
Every "... buffer size = N MiB" line llama.cpp logs (model, output, KV, compute) is listed below the table.
The paper's merge measures its premise once per model on first use (a 512-token run, cached by
minicache_gguf): this script warms that in a throwaway child so it does not enter a measured one.
Every child uses the engine build this process resolved (MINICACHE_GGUF_LIB_DIR, printed at the top),
so a rebuild of the source tree during a run does not mix builds; peak RSS is the highest over reps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ["MINICACHE_GGUF_NO_CALIBRATION"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402

LAYOUT = "llama-8b-width"
CONFIGS = ("stock", "paper", "aligned-head", "aligned-full")
PAIRS = (("k", 0), ("k", 2), ("v", 0), ("v", 2))  # every pair of the 4 layers, K and V (the file's order)
BUFFER_RE = re.compile(r"^\w+:\s+(\S+) +(\w+) buffer size = +([\d.]+) MiB", re.M)
MARK = "WIDE_MEMORY_RESULT "


def ensure_model(d: Path) -> Path:
    import synth
    from minicache_gguf.model import default_model_path
    path = d / f"{LAYOUT}-4l.gguf"
    if not path.is_file():
        d.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (once) ...", file=sys.stderr, flush=True)
        tmp = synth.write(path.with_suffix(".tmp"), synth.LAYOUTS[LAYOUT], default_model_path(), n_layer=4)
        os.replace(tmp, path)
    return path


def ensure_calibration(model: Path, d: Path, form: str, tk: str, tv: str) -> Path:
    """A calibration file of random orthogonal rotations for PAIRS (as tests build aligned pairs)."""
    from minicache_gguf import __version__
    from minicache_gguf.calfile import Calibration, load_calibration
    from minicache_gguf.config import CalibrationError, PairSpec
    from minicache_gguf.model import ModelInfo
    info = ModelInfo.of(model)
    path = d / f"{LAYOUT}-{info.sha256[:12]}-{form}-{tk}-{tv}.cal.gguf"
    try:
        load_calibration(path, info)
        return path
    except (CalibrationError, OSError):
        pass
    rng = np.random.default_rng(7)

    def orth(n):
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return (q * np.sign(np.diag(r))).astype(np.float32)

    pairs = []
    for kind, layer in PAIRS:
        w = info.width(kind)
        r = orth(w) if form == "full" else np.stack([orth(w // info.n_head_kv) for _ in range(info.n_head_kv)])
        pairs.append(PairSpec(kind, layer, form, r))
    cal = Calibration(model=info, form=form, pairs=pairs, n_tokens=0, selection_kld=0.0, tool_version=__version__,
                      settings={"type_k": tk, "type_v": tv, "layout": 0, "what": "random rotations (wide_memory.py)"})
    cal.save(path)
    load_calibration(path, info)  # what Llama() will check
    return path


def rss_now() -> int:
    """This process's resident bytes now (VmRSS)."""
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def one(spec: dict) -> None:
    """Child: create one context, print its figures as JSON on stdout."""
    from minicache_gguf import Llama, MergeConfig
    from minicache_gguf.config import GGML_TYPES
    import llama_cpp._internals as lci
    inner, timing = lci.llama_cpp.llama_init_from_model, {}

    def timed(*a):
        timing["rss0"] = rss_now()
        t0 = time.perf_counter()
        try:
            return inner(*a)
        finally:
            timing["s"] = time.perf_counter() - t0
            timing["rss1"] = rss_now()

    lci.llama_cpp.llama_init_from_model = timed
    cfg = spec["config"]
    merge = (False if cfg == "stock" else MergeConfig(calibration="paper", start_layer=0) if cfg == "paper"
             else MergeConfig(calibration=spec["cal"], start_layer=0))
    warnings.simplefilter("ignore")  # the paper's premise fails on random weights, on purpose
    llm = Llama(spec["model"], n_ctx=spec["ctx"], n_batch=512, n_ubatch=512, flash_attn=True, verbose=True,
                type_k=GGML_TYPES[spec["type"]], type_v=GGML_TYPES[spec["type"]], kv_merge=merge)
    st = llm.kv_stats()
    out = dict(s=timing["s"], kv=st.kv_bytes, kv_dense=st.kv_bytes_dense, pools=st.merged_pools,
               aligned=st.aligned_pools, rss_ctx=timing["rss1"] - timing["rss0"], rss_before=timing["rss0"],
               rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(MARK + json.dumps(out), flush=True)
    llm.close()


def run_one(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((l for l in p.stdout.splitlines() if l.startswith(MARK)), None)
    if p.returncode or line is None:
        tail = [l for l in p.stderr.splitlines() if l.strip()][-3:]
        return {"error": f"rc {p.returncode}: " + (tail[-1][-160:] if tail else "no output")}
    res = json.loads(line[len(MARK):])
    bufs = {}
    for dev, kind, mib in BUFFER_RE.findall(p.stderr):
        bufs[f"{dev} {kind}"] = float(mib)  # the last line of each wins (the final reservation)
    res["buffers"] = bufs
    res["compute"] = sum(v for k, v in bufs.items() if k.endswith(" compute")) * 2**20
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", default="32768,131072", help="context lengths, comma-separated")
    ap.add_argument("--types", default="f16", help="KV cache types (K and V), comma-separated: f16,q8_0,q4_0")
    ap.add_argument("--reps", type=int, default=3, help="contexts created per configuration (median)")
    ap.add_argument("--model-dir", default="/tmp/minicache-wide-memory", help="where the model is written once")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per child")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one(json.loads(a.one))
        return 0
    ctxs, types = [int(c) for c in a.ctx.split(",")], a.types.split(",")
    print("command: " + " ".join(shlex.quote(x) for x in [sys.executable] + sys.argv))
    from minicache_gguf import _engine
    os.environ[_engine.LIB_DIR_ENV] = str(_engine.active_lib_dir())  # every child: the same engine build
    print(f"engine: {os.environ[_engine.LIB_DIR_ENV]}")
    d = Path(a.model_dir)
    model = ensure_model(d)
    cals = {(f, t): ensure_calibration(model, d, f, t, t) for f in ("head", "full") for t in types}
    print(f"model: {model} ({model.stat().st_size / 2**20:.0f} MiB, {LAYOUT}: n_embd 4096, 32 heads, 8 KV heads x 128, "
          "4 layers); flash attention on, n_batch = n_ubatch = 512", flush=True)
    t_start = time.perf_counter()
    warm = run_one(dict(config="paper", model=str(model), ctx=512, type="f16"), a.timeout)
    if "error" in warm:
        print(f"warm-up failed: {warm['error']}", file=sys.stderr)
    runs: dict = {}
    for rep in range(a.reps):  # interleaved, so drift hits every configuration alike
        for ctx in ctxs:
            for ty in types:
                for cfg in CONFIGS:
                    spec = dict(config=cfg, model=str(model), ctx=ctx, type=ty,
                                cal=str(cals[cfg.split("-")[1], ty]) if cfg.startswith("aligned") else None)
                    t0 = time.perf_counter()
                    r = run_one(spec, a.timeout)
                    runs.setdefault((ctx, ty, cfg), []).append(r)
                    print(f"rep {rep + 1}/{a.reps} ctx {ctx} {ty} {cfg}: "
                          + (r["error"] if "error" in r else f"{r['s']:.3f} s, peak RSS {r['rss'] / 2**20:.0f} MiB")
                          + f" ({time.perf_counter() - t0:.1f} s with the child's start)", file=sys.stderr, flush=True)
    mib = lambda b: b / 2**20
    print("\n| ctx | type | config | creation s | KV MiB | compute buffer MiB | KV+compute MiB | peak RSS MiB "
          "| RSS ctx MiB | creation vs stock | compute vs stock | KV+compute < stock |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for ctx in ctxs:
        for ty in types:
            base = None
            for cfg in CONFIGS:
                ok = [r for r in runs[ctx, ty, cfg] if "error" not in r]
                if not ok:
                    print(f"| {ctx} | {ty} | {cfg} | error: {runs[ctx, ty, cfg][0]['error']} |" + " |" * 8)
                    continue
                r = dict(ok[-1], s=statistics.median(x["s"] for x in ok), rss=max(x["rss"] for x in ok),
                         rss_ctx=statistics.median(x["rss_ctx"] for x in ok))
                tot = r["kv"] + r["compute"]
                if cfg == "stock":
                    base, cmp = dict(r, tot=tot), ["", "", ""]
                elif base is None:
                    cmp = ["n/a"] * 3
                else:
                    cmp = [f"{r['s'] / base['s']:.2f}x", f"{r['compute'] / base['compute']:.2f}x",
                           "yes" if tot < base["tot"] else "NO"]
                n = f" ({len(ok)}/{len(runs[ctx, ty, cfg])} ok)" if len(ok) < len(runs[ctx, ty, cfg]) else ""
                print(f"| {ctx} | {ty} | {cfg}{n} | {r['s']:.3f} | {mib(r['kv']):.1f} | {mib(r['compute']):.1f} | "
                      f"{mib(tot):.1f} | {mib(r['rss']):.0f} | {mib(r['rss_ctx']):.0f} | " + " | ".join(cmp) + " |")
    print("\nllama.cpp's buffer lines (MiB; last run of each):")
    for (ctx, ty, cfg), rs in runs.items():
        if "buffers" in rs[-1]:
            print(f"  {ctx} {ty} {cfg}: " + ", ".join(f"{k} {v:.2f}" for k, v in rs[-1]["buffers"].items()))
    print(f"\n{sum(len(v) for v in runs.values())} contexts in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
