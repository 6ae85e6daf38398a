"""How far llama-server's greedy completions move when two clients are served at once instead of one
at a time, stock and merged, on the same prompts (llama.cpp's arithmetic depends on how a server
batches a sequence's tokens with other slots').

    .venv/bin/python scripts/server_batching.py [--reps 6] [--n-predict 24]

Per mode: one llama-server (`minicache-gguf llama-server -np 2 -c 4096 --cache-ram 0`, f16 cache,
default model) answers two ~600-token prompts of the built-in docs text one at a time, then both
at once `--reps` times (`cache_prompt: false`). Printed: completions whose tokens differ from the
one-at-a-time ones, the largest |log-probability difference| before a difference, and the largest
top-2 gap of the one-at-a-time run where a difference starts (a near tie flipped).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from minicache_gguf import corpus

CLI = str(Path(sys.executable).with_name("minicache-gguf"))
MODES = {
    "stock (-kvu)": (["--no-kv-merge", "-kvu"], {}),
    "merged": ([], {}),
    "merged, K/V restored, flash": (["-fa", "on"], {"LLAMA_MINICACHE_RESTORE": "1"}),
}


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.load(r)


def _start(argv, env, log):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([CLI, "llama-server", "--host", "127.0.0.1", "--port", str(port)] + argv,
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **env))
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return proc, base
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"llama-server exited: see {log.name}")
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"llama-server did not start: see {log.name}")


def measure(argv, env, prompts, reps, n_predict, log) -> dict:
    proc, base = _start(["-c", "4096", "-np", "2", "--cache-ram", "0"] + argv, env, log)
    try:
        def ask(p):
            return _post(base + "/completion", {"prompt": p, "n_predict": n_predict, "temperature": 0, "n_probs": 2,
                                                "cache_prompt": False, "return_tokens": True})

        alone = [ask(p) for p in prompts]
        n_diff, d_max, gap_max = 0, 0.0, 0.0
        for _ in range(reps):
            out = [None] * len(prompts)
            th = [threading.Thread(target=lambda i=i: out.__setitem__(i, ask(prompts[i]))) for i in range(len(prompts))]
            for t in th:
                t.start()
            for t in th:
                t.join()
            for a, b in zip(alone, out):
                ta, tb = a["tokens"], b["tokens"]
                k = next((j for j in range(min(len(ta), len(tb))) if ta[j] != tb[j]), len(ta))
                pa, pb = a["completion_probabilities"], b["completion_probabilities"]
                d_max = max([d_max] + [abs(pa[j]["logprob"] - pb[j]["logprob"]) for j in range(k)])
                if k < len(ta):
                    n_diff += 1
                    top = pa[k]["top_logprobs"]
                    gap_max = max(gap_max, top[0]["logprob"] - top[1]["logprob"])
        return {"n": reps * len(prompts), "diff": n_diff, "d_max": d_max, "gap_max": gap_max}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--n-predict", type=int, default=24)
    a = ap.parse_args()
    text = corpus.eval_text("docs")
    prompts = [text[i * 4000:i * 4000 + 2600] + "\n\nIn one sentence, this text is about" for i in range(2)]
    print("| llama-server | completions differing from one at a time | max abs. logprob difference before | "
          "largest top-2 gap where they differ |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (argv, env) in MODES.items():
            with open(Path(tmp) / "server.log", "w") as log:
                r = measure(argv, env, prompts, a.reps, a.n_predict, log)
            gap = f"{r['gap_max']:.3f}" if r["diff"] else "-"
            print(f"| {name} | {r['diff']} of {r['n']} | {r['d_max']:.3f} | {gap} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
