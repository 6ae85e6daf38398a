"""A seeded sequence of mixed operations (new prompt, continuation, reset, save, load) and the greedy
tokens it produces; run in-process on the patched engine, or as a script on another engine:

    python tests/soak.py LIB_DIR MODEL N_STEPS OUT.json     # stock llama_cpp.Llama on LIB_DIR
"""

import json
import os
import sys

import numpy as np


def steps(n):
    rng = np.random.default_rng(7)
    return [(int(rng.integers(0, 5)), int(rng.integers(0, 400)), int(rng.integers(1, 40))) for _ in range(n)]


def tokens(llm):
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return llm.tokenize(text[:20000].encode())


def _gen(llm, prompt, n):
    out = []
    for t in llm.generate(prompt, temp=0.0):
        out.append(int(t))
        if len(out) == n:
            break
    return out


def run(llm, n_steps):
    toks = tokens(llm)
    saved, out = None, []
    for op, start, length in steps(n_steps):
        if op == 0:    # a new prompt: two greedy tokens
            out += _gen(llm, toks[start:start + length], 2)
        elif op == 1:  # a continuation of what is cached
            if llm.n_tokens + 4 < llm.n_ctx():
                out += _gen(llm, list(llm._input_ids) + toks[start:start + 2], 1)
        elif op == 2:
            llm.reset()
        elif op == 3:
            saved = llm.save_state()
        elif op == 4 and saved is not None:
            llm.load_state(saved)
    return out


OPTIONS = dict(n_ctx=512, n_batch=64, n_ubatch=64, verbose=False)

if __name__ == "__main__":
    lib, model, n, out = sys.argv[1:5]
    os.environ["LLAMA_CPP_LIB_PATH"] = lib
    import llama_cpp

    with open(out, "w") as f:
        json.dump(run(llama_cpp.Llama(model, **OPTIONS), int(n)), f)
