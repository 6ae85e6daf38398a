"""Random-weight GGUF models of the layouts users run (written with the `gguf` package).

No small real model has these layouts; the engine's arithmetic does not care what the weights
mean, so random weights exercise every code path of a layout: head width, GQA ratio, biases,
fused or separate projections, rope style. The tokenizer is the default model's (copied field by
field), so the same text tokenizes the same way on every layout.

    python tests/synth.py OUT.gguf LAYOUT [--layers N]   # write one (LAYOUT: a key of LAYOUTS)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class Layout:
    arch: str          # llama.cpp architecture name
    n_embd: int
    n_head: int
    n_head_kv: int
    head: int          # per-head width of K and V
    n_ff: int = 256
    bias: bool = False  # q/k/v biases (qwen2)
    what: str = ""

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head


LAYOUTS = {
    # Llama 3.x: 8 KV heads of 128 (n_embd kept small: llama.cpp's llama takes key_length as the head width)
    "llama-gqa": Layout("llama", 256, 16, 8, 128, what="Llama 3.x / Mistral: GQA, 8 KV heads x 128"),
    # Llama 2 7B: 32 heads of 128, no GQA
    "llama-mha": Layout("llama", 256, 32, 32, 128, what="Llama 2: MHA, 32 heads x 128"),
    # Qwen2 / 2.5: q/k/v biases, 2 KV heads of 128 (the head width is n_embd / n_head in llama.cpp's qwen2)
    "qwen2": Layout("qwen2", 512, 4, 2, 128, bias=True, what="Qwen2/2.5: q/k/v biases, GQA, heads of 128"),
    # Phi-3: MHA, heads of 96 (not a power of two: no Hadamard basis for quantized caches)
    "phi3": Layout("phi3", 384, 4, 4, 96, what="Phi-3: MHA, heads of 96, fused q/k/v and gate/up"),
    # Phi-2-like head width 80: not a multiple of a q8_0/q4_0 block (32)
    "llama-h80": Layout("llama", 256, 4, 4, 80, what="head width 80 (not a multiple of a 32-value block)"),
    # Llama 3 8B's layer width (n_embd 4096, 32 heads, 8 KV heads x 128), small n_ff: memory and timing
    # at full layer width (scripts/wide_memory.py); not in tests/test_layouts.py's matrix
    "llama-8b-width": Layout("llama", 4096, 32, 8, 128, what="Llama 3 8B width (4 layers)"),
}


def _tokenizer_fields(reader: gguf.GGUFReader):
    for f in reader.fields.values():
        if f.name.startswith("tokenizer."):
            sub = f.types[1] if len(f.types) > 1 else None
            yield f.name, f.contents(), f.types[0], sub


def write(path, layout: Layout, tokenizer_from, n_layer: int = 4, seed: int = 0) -> Path:
    """Write a random-weight model of `layout` with n_layer layers and the tokenizer of the GGUF at
    `tokenizer_from`; returns the path."""
    path = Path(path)
    src = gguf.GGUFReader(str(tokenizer_from))
    n_vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)
    L = layout
    a = L.arch

    def mat(rows, cols):  # numpy shape (out, in) = ggml {in, out}; scaled so activations stay O(1)
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float16)

    w = gguf.GGUFWriter(str(path), a)
    # the name avoids "phi3": llama.cpp then looks up Phi-3 tokenizer tokens this tokenizer lacks
    w.add_name(f"minicache-synthetic-{L.n_head}x{L.n_head_kv}x{L.head}")
    w.add_block_count(n_layer)
    w.add_context_length(32768)
    w.add_embedding_length(L.n_embd)
    w.add_feed_forward_length(L.n_ff)
    w.add_head_count(L.n_head)
    w.add_head_count_kv(L.n_head_kv)
    if L.head * L.n_head != L.n_embd:
        w.add_key_length(L.head)
        w.add_value_length(L.head)
    w.add_rope_dimension_count(L.head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(n_vocab)
    for name, value, vtype, sub in _tokenizer_fields(src):
        w.add_key_value(name, value, vtype, sub_type=sub)

    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, L.n_embd), dtype=np.float32).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(L.n_embd, np.float32))
    nq = L.n_head * L.head
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(L.n_embd, np.float32))
        if a == "phi3":  # Phi-3 files carry one fused q/k/v projection
            w.add_tensor(p + "attn_qkv.weight", mat(nq + 2 * L.n_embd_kv, L.n_embd))
        else:
            w.add_tensor(p + "attn_q.weight", mat(nq, L.n_embd))
            w.add_tensor(p + "attn_k.weight", mat(L.n_embd_kv, L.n_embd))
            w.add_tensor(p + "attn_v.weight", mat(L.n_embd_kv, L.n_embd))
        if L.bias:
            for t, n in (("q", nq), ("k", L.n_embd_kv), ("v", L.n_embd_kv)):
                w.add_tensor(p + f"attn_{t}.bias", (0.5 * rng.standard_normal(n)).astype(np.float32))
        w.add_tensor(p + "attn_output.weight", mat(L.n_embd, nq))
        w.add_tensor(p + "ffn_norm.weight", np.ones(L.n_embd, np.float32))
        if a == "phi3":  # gate and up fused in one tensor
            w.add_tensor(p + "ffn_up.weight", mat(2 * L.n_ff, L.n_embd))
        else:
            w.add_tensor(p + "ffn_gate.weight", mat(L.n_ff, L.n_embd))
            w.add_tensor(p + "ffn_up.weight", mat(L.n_ff, L.n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(L.n_embd, L.n_ff))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("layout", choices=sorted(LAYOUTS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokenizer-from", default=None, help="a GGUF whose tokenizer to copy (default: the default model)")
    args = ap.parse_args(argv)
    if args.tokenizer_from is None:
        from minicache_gguf import default_model_path
        args.tokenizer_from = default_model_path()
    print(write(args.out, LAYOUTS[args.layout], args.tokenizer_from, args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
