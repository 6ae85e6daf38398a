"""Greedy tokens and logits of a fixed prompt, for comparing two engine builds.

In-process: run_probe(llama_class, model_path, flash_attn). As a script it runs the STOCK
llama_cpp.Llama on the library directory given (LLAMA_CPP_LIB_PATH), e.g. the unpatched build:

    python tests/engine_probe.py LIB_DIR MODEL OUT.npz {0|1}
"""

import os
import sys

import numpy as np

PROMPT = "The MiniCache paper observes that the key-value cache of adjacent layers"
N_GEN = 32


def run_probe(llama_cls, model_path, flash_attn: bool):
    llm = llama_cls(str(model_path), n_ctx=256, n_batch=64, logits_all=True, flash_attn=flash_attn,
                    seed=0, verbose=False)
    prompt = llm.tokenize(PROMPT.encode())
    tokens = []
    for tok in llm.generate(prompt, temp=0.0, reset=True):
        tokens.append(tok)
        if len(tokens) == N_GEN:
            break
    logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    llm.close()
    return np.array(prompt), np.array(tokens), logits


if __name__ == "__main__":
    lib, model, out, flash = sys.argv[1:5]
    os.environ["LLAMA_CPP_LIB_PATH"] = lib
    import llama_cpp

    prompt, tokens, logits = run_probe(llama_cpp.Llama, model, flash == "1")
    np.savez(out, prompt=prompt, tokens=tokens, logits=logits, lib=str(llama_cpp.llama_cpp._base_path))
