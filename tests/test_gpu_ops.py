"""Every node the engine builds is one that ggml-cuda and ggml-metal run, for its types and layouts.

The engine writes each node it builds (LLAMA_MINICACHE_OPS_LOG: the attention fold, the restore of
merged K/V, the writes of new rows, the merge step's graphs) as op, type and per source its type and
layout. The CPU backend stands in for a GPU backend: LLAMA_MINICACHE_REFUSE_OPS=OUT_PROD makes it lack
the one op the fold uses that ggml-cuda has for F32 only and ggml-metal not at all, so the engine
builds what it would build there. Each node is then held against the two tables below, transcribed
from the vendored llama.cpp (ggml/src/ggml-cuda/ggml-cuda.cu: ggml_backend_cuda_device_supports_op;
ggml/src/ggml-metal/ggml-metal-device.m: ggml_metal_device_supports_op and
ggml_metal_supports_mul_mat_op, on a GPU family with simdgroup reduction and matrix multiply). A
node that is not in a table fails the test: read that backend's supports_op and extend the table,
or change the engine.
"""

import warnings

import numpy as np
import pytest

from minicache_gguf import ConfigError, Llama, MergeConfig, _internals, corpus
from minicache_gguf.config import PairSpec
from minicache_gguf.llama import llama_cpp
from test_native import random_orthogonal

N_EMBD = 192

FLOAT = {"f32", "f16", "bf16"}
QUANT = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0"}
VIEWS = {"VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"}


class Node:
    def __init__(self, line: str):
        f = line.split()
        self.line = line.strip()
        self.op, self.type = f[0], f[1]
        self.src = []
        for t, flags in ((f[2], f[3]), (f[4], f[5])):
            if t == "-":
                self.src.append(None)
            else:
                c, cr, nb0 = (flag == "1" for flag in flags)
                self.src.append(dict(type=t, contiguous=c, contiguous_rows=cr, unit_stride=nb0))

    def t(self, i):
        return self.src[i]["type"]


def cuda_runs(n: Node) -> bool:
    op = n.op
    if op in VIEWS or op in ("CONT", "DUP", "SOFT_MAX", "SQR", "SQRT", "SIN", "CLAMP", "FILL"):
        return True
    if op == "MUL_MAT":
        a, b = n.src
        if not (a["unit_stride"] and b["unit_stride"]):
            return False
        if b["type"] == "f16" and a["type"] != "f16":
            return False
        return a["type"] in FLOAT | QUANT | {"iq4_nl"}
    if op == "OUT_PROD":
        return n.type == n.t(0) == n.t(1) == "f32"
    if op == "GET_ROWS":
        return n.t(0) in FLOAT | QUANT | {"i32"}
    if op == "SET_ROWS":
        ok = (n.type in FLOAT | QUANT | {"iq4_nl"} and n.t(0) == "f32") or (n.type == n.t(0) == "f16")
        return ok and n.t(1) in ("i32", "i64")
    if op == "CPY":
        s, d = n.t(0), n.t(1)
        if s in FLOAT and d in FLOAT:
            return True
        if (s == "f32" and d in QUANT | {"iq4_nl", "i32"}) or (s in QUANT | {"i32"} and d == "f32"):
            return True
        return s == d and n.src[0]["contiguous"] and n.src[1]["contiguous"]
    if op == "CONCAT":
        return n.t(0) == n.t(1) == n.type and n.type in {"f32", "f16", "bf16", "i32"}
    if op == "STEP":
        return n.src[0]["contiguous"]
    if op == "SCALE":
        return n.t(0) in ("f32", "bf16") and n.type == n.t(0)
    if op in ("ADD", "SUB", "MUL", "DIV"):
        return n.t(0) in ("f32", "f16") and n.t(1) in ("f32", "f16") and n.type in ("f32", "f16")
    if op == "SUM_ROWS":
        return n.t(0) == n.type == "f32" and n.src[0]["contiguous_rows"]
    return False


def metal_runs(n: Node) -> bool:
    op = n.op
    if op in VIEWS or op == "GET_ROWS":
        return op != "GET_ROWS" or n.t(0) in FLOAT | QUANT | {"i32", "iq4_nl"}
    if op in ("SCALE", "FILL", "CLAMP", "SQR", "SQRT", "SIN", "STEP"):
        return n.src[0]["contiguous_rows"] and n.t(0) in ("f32", "f16")
    if op == "CONCAT":
        return n.t(0) == n.t(1) == n.type and n.type in {"f32", "f16", "i32"} | QUANT
    if op in ("ADD", "SUB", "MUL", "DIV"):
        return (n.src[0]["contiguous_rows"] and n.src[1]["contiguous_rows"] and n.t(0) in ("f32", "f16")
                and n.t(0) == n.t(1))
    if op in ("SUM_ROWS", "SOFT_MAX"):
        return n.src[0]["contiguous_rows"]
    if op == "MUL_MAT":
        return n.t(1) != "f16" or n.t(0) == "f16"
    if op in ("CPY", "CONT", "DUP"):
        s, d = n.t(0), n.type
        if s == "f32":
            return d in FLOAT | QUANT | {"iq4_nl", "i32"}
        if s in QUANT | {"f16"}:
            return d in ("f32", "f16")
        if s == "bf16":
            return d in ("f32", "bf16")
        return s == "i32" and d in ("f32", "i32")
    if op == "SET_ROWS":
        if n.t(0) == "f16":
            return n.type == "f16"
        return n.t(0) == "f32" and n.type in FLOAT | QUANT | {"iq4_nl"}
    return False  # OUT_PROD and anything not listed


# nodes that a backend lacks for some cache types and that the engine asks the pool's backend about
# when the context is created, refusing it there with op, type and backend: the restore's conversion
# to F32 (iq4_nl: no CPY to F32 on CUDA or Metal) and the gather of rows (CUDA: iq4_nl rows only
# 256-multiple wide) (test_a_backend_that_cannot_restore_the_rows_is_refused_at_creation)
PROBED = {("CPY", "iq4_nl"), ("GET_ROWS", "iq4_nl")}


# (type_k, type_v, flash attention, rotation form, kinds merged): the attention paths and pool kinds
CASES = {
    "f16_flash_off": ("f16", "f16", False, "head", "kv"),
    "f16_flash_on_full": ("f16", "f16", True, "full", "kv"),
    "f16_flash_on_k_only": ("f16", "f16", True, "none", "k"),
    "q8_0_full": ("q8_0", "q8_0", True, "full", "kv"),
    "q4_0_head": ("q4_0", "q4_0", True, "head", "kv"),
    "q4_1": ("q4_1", "q4_1", True, "none", "kv"),
    "q5_0": ("q5_0", "q5_0", True, "none", "kv"),
    "q5_1": ("q5_1", "q5_1", True, "none", "kv"),
    "iq4_nl": ("iq4_nl", "iq4_nl", True, "none", "kv"),
    "bf16": ("bf16", "bf16", True, "none", "kv"),
}
TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "iq4_nl": 20, "bf16": 30}


@pytest.fixture(scope="module")
def toks(model_path):
    llm = llama_cpp.Llama(str(model_path), n_ctx=64, vocab_only=True, verbose=False)
    return corpus.tokens_for(llm, corpus.builtin_text("calibration"), 200, "calibration")


def built_nodes(model_path, toks, monkeypatch, tmp_path, case):
    type_k, type_v, flash, form, kinds = CASES[case]
    log = tmp_path / f"{case}.ops"
    monkeypatch.setenv("LLAMA_MINICACHE_OPS_LOG", str(log))
    monkeypatch.setenv("LLAMA_MINICACHE_REFUSE_OPS", "OUT_PROD")
    rng = np.random.default_rng(3)
    pairs = []
    for layer in (4, 12, 20):
        for kind in kinds:
            rot = None if form == "none" else (random_orthogonal(N_EMBD, rng) if form == "full" else np.stack([random_orthogonal(64, rng) for _ in range(3)]))
            pairs.append(PairSpec(kind, layer, None if rot is None else form, rot))
    cfg = MergeConfig(window=32)
    _internals.set_pending(_internals.params_from_config(cfg, 256, pairs))
    try:
        llm = llama_cpp.Llama(str(model_path), n_ctx=256, n_ubatch=64, flash_attn=flash, type_k=TYPES[type_k],
                              type_v=TYPES[type_v], verbose=False)
    finally:
        _internals.set_pending(None)
    llm.eval(toks[:80])          # a prompt ubatch: restore; the window is crossed
    llm.eval(toks[80:81])        # a decoding step: fold (or restore where the fold lacks its op) + merge
    assert _internals.get_stats(llm._ctx.ctx).tokens_merged > 0
    lines = log.read_text().splitlines()
    return {line: Node(line) for line in lines}.values()


@pytest.mark.parametrize("case", list(CASES))
def test_every_node_the_engine_builds_runs_on_cuda_and_metal(model_path, toks, monkeypatch, tmp_path, case):
    nodes = list(built_nodes(model_path, toks, monkeypatch, tmp_path, case))
    ops = {n.op for n in nodes}
    # the log holds the attention, the writes and the merge step (the hook works)
    assert {"MUL", "SET_ROWS", "SQRT", "SUM_ROWS", "GET_ROWS"} <= ops, sorted(ops)
    assert "OUT_PROD" not in ops
    bad = [f"cuda: {n.line}" for n in nodes if not cuda_runs(n) and (n.op, n.t(0)) not in PROBED]
    bad += [f"metal: {n.line}" for n in nodes if not metal_runs(n) and (n.op, n.t(0)) not in PROBED]
    assert not bad, "\n".join(sorted(bad))


def test_a_backend_that_cannot_restore_the_rows_is_refused_at_creation(model_path, monkeypatch):
    """A backend without the conversion of the pool's rows to F32 (the CPU standing in for CUDA or
    Metal with an iq4_nl cache) refuses the context when it is created, naming op, type and layers."""
    monkeypatch.setenv("LLAMA_MINICACHE_REFUSE_OPS", "CPY")
    warnings.simplefilter("ignore")  # the paper's merge warns about its premise on this model
    with pytest.raises(ConfigError, match=r"the CPU backend cannot run CPY of f16 rows \(restoring the merged K of layers 15, 16\)"):
        Llama(model_path, n_ctx=256, verbose=False, kv_merge=MergeConfig(calibration="paper", window=32))
