"""One model with a merged cache, local and on an rpc-server (loopback), side by side: run as a
script in its own process (llama.cpp's RPC devices stay registered in the process that adds them).

    python tests/rpc_probe.py HOST:PORT MODEL {paper|aligned} {0|1 flash attention} OUT.json
"""

import json
import sys

import numpy as np
import pydoc_data.topics

from minicache_gguf import Llama, MergeConfig
from minicache_gguf.calfile import find_auto
from minicache_gguf.model import ModelInfo


def run(endpoint, model, layout, flash_attn, out):
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    # aligned: the shipped calibration's file with a window of 32 (calibration="auto" would re-score
    # a selection for window 32: minutes, and not what this test is about)
    shipped = find_auto(ModelInfo.of(model), MergeConfig())
    cfg = MergeConfig(window=32, calibration=str(shipped) if layout == "aligned" else "paper")
    res = {}
    runs = {}
    for where in ("local", "rpc"):
        kw = dict(rpc_servers=endpoint, n_gpu_layers=-1) if where == "rpc" else {}
        llm = Llama(model, n_ctx=512, flash_attn=flash_attn, logits_all=True, verbose=where == "rpc", kv_merge=cfg, **kw)
        toks = llm.tokenize(text[:20000].encode())[:200]
        llm.eval(toks)
        for t in toks[:24]:  # decoding steps: the first merges the staged tokens beyond the window, on the cache's backend
            llm.eval([t])
        logits = np.array(llm.scores[:llm.n_tokens], dtype=np.float32)
        st = llm.kv_stats()
        gen = llm.create_completion(text[:600], max_tokens=16, temperature=0)["choices"][0]["text"]
        runs[where] = logits
        res[where] = dict(host_rows=st.host_rows, merge_graphs=st.merge_graphs, tokens_merged=st.tokens_merged,
                          tokens_retained=st.tokens_retained, aligned_pools=st.aligned_pools, text=gen)
        llm.close()
    diff = np.abs(runs["local"] - runs["rpc"])
    res["max_abs_diff"] = float(diff.max())
    res["argmax_equal"] = bool((runs["local"].argmax(1) == runs["rpc"].argmax(1)).all())
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    ep, model, layout, fa, out = sys.argv[1:6]
    run(ep, model, layout, fa == "1", out)
