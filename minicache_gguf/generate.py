"""`minicache-gguf generate`: one reply (or raw completion), streamed, then a line saying how long
it took and what the KV cache holds and allocates next to a stock cache of the same type.

With a document (a file, or "builtin": several thousand tokens of Python's own documentation),
the prompt is the document followed by the question: long enough that the merged cache really
merges and retains tokens, which is what the demo shows."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from . import corpus
from .llama import Llama

MIB = 1 << 20
#: tokens of the built-in document (leaves room for the question and the reply in an 8k context)
BUILTIN_DOC_TOKENS = 5000


def document(llm: Llama, doc: str, n_tokens: int = BUILTIN_DOC_TOKENS) -> str:
    """The text of --doc: a file, or "builtin" (the start of the built-in eval text, n_tokens long)."""
    if doc != "builtin":
        return corpus.read_text(doc)
    toks = corpus.tokens_for(llm, corpus.builtin_text("eval"), n_tokens, "the built-in document")
    return llm.detokenize(toks[:n_tokens]).decode("utf-8", errors="ignore")


def run(llm: Llama, prompt: str, *, n: int, temp: float, raw: bool = False, doc: Optional[str] = None,
        out: TextIO = sys.stdout) -> dict:
    """Stream the reply to `out`; return the timing and KV summary."""
    if doc is not None:
        prompt = f"{document(llm, doc)}\n\n{prompt}"
    t0 = time.perf_counter()
    first = None
    n_prompt = n_gen = 0
    if raw:
        stream = llm.create_completion(prompt, max_tokens=n, temperature=temp, stream=True)
        pieces = (c["choices"][0]["text"] for c in stream)
    else:
        stream = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=n, temperature=temp,
                                            stream=True)
        pieces = (c["choices"][0]["delta"].get("content", "") for c in stream)
    for piece in pieces:
        if first is None:
            first = time.perf_counter()
            n_prompt = llm.n_tokens  # the prompt is evaluated before the first token is yielded
        if piece:
            n_gen += 1
            out.write(piece)
            out.flush()
    t1 = time.perf_counter()
    out.write("\n")
    kv = llm.kv_stats()
    return {
        "prompt_tokens": n_prompt,
        "generated_tokens": n_gen,
        "prompt_s": round((first or t1) - t0, 3),
        # tokens after the first, over the time after the first (the first one includes the prompt)
        "generate_tok_per_s": round((n_gen - 1) / (t1 - first), 1) if n_gen > 1 and t1 > first else None,
        "kv": {"kv_merge": llm.merge_config is not None, "kv_bytes": kv.kv_bytes, "kv_bytes_dense": kv.kv_bytes_dense,
               "tokens": kv.tokens, "tokens_merged": kv.tokens_merged, "tokens_staged": kv.tokens_staged,
               "tokens_retained": kv.tokens_retained, "merged_pools": kv.merged_pools, "aligned_pools": kv.aligned_pools},
    }


def summary_line(s: dict) -> str:
    kv = s["kv"]
    if kv["kv_merge"]:
        kv_line = (f"KV {kv['kv_bytes'] / MIB:.1f} MiB allocated vs {kv['kv_bytes_dense'] / MIB:.1f} MiB for a stock cache "
                   f"of the same type ({kv['kv_bytes_dense'] / kv['kv_bytes']:.2f}x); of {kv['tokens']} tokens: "
                   f"{kv['tokens_merged']} merged ({kv['tokens_retained']:.0f} of them kept exact), {kv['tokens_staged']} "
                   f"in the exact window; {kv['merged_pools']} (layer pair, K/V) pools"
                   + (f", {kv['aligned_pools']} aligned" if kv["aligned_pools"] else ""))
    else:
        kv_line = f"KV {kv['kv_bytes'] / MIB:.1f} MiB, kv_merge off"
    return (f"[prompt {s['prompt_tokens']} tok in {s['prompt_s']} s | generation {s['generate_tok_per_s']} tok/s | "
            f"{kv_line}]")
