"""Internals: the one module that touches llama-cpp-python's private attributes, and the Python
face of the engine's C API (engine.py is its bare cffi mirror). The Llama wrapper and the tools
call these functions; nothing above reaches into `llm._ctx`, `llm._batch` or `llm._model`.

Importing this module loads llama_cpp with LLAMA_CPP_LIB_PATH pointing at the patched engine
(see _engine.lib_dir). An installed package carries llama-cpp-python 0.3.36's Python package in
_vendor/ (CMakeLists.txt, package build): it goes first on sys.path, so `import llama_cpp` in this
process is that version, the one the engine's C API matches; a source tree uses the same version
installed in its .venv by scripts/setup.sh.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import _engine, engine, kvstate
from .config import ConfigError, MergeConfig, PairSpec
from .engine import ffi

__all__ = ["llama_cpp", "KvStats", "params_from_config", "set_pending", "last_error", "get_stats", "get_pairs", "get_rotation",
           "get_rows", "get_cells", "context_pointer", "eval_logits", "seq_state", "set_seq_state", "capture_kv",
           "token_text", "plain_llama"]


VENDORED = Path(__file__).resolve().parent / "_vendor"


def _import_llama_cpp():
    lib = _engine.active_lib_dir()
    if (VENDORED / "llama_cpp" / "__init__.py").is_file() and str(VENDORED) not in sys.path:
        sys.path.insert(0, str(VENDORED))
    mod = sys.modules.get("llama_cpp.llama_cpp")
    if mod is not None:
        loaded = Path(getattr(mod, "_base_path", "")).resolve()
        if loaded != lib.resolve():
            raise ImportError(
                f"llama_cpp was imported before minicache_gguf and loaded libllama from {loaded}, "
                f"not the patched engine {lib}: import minicache_gguf first "
                f"(or set LLAMA_CPP_LIB_PATH={lib})")
        import llama_cpp
        return llama_cpp
    old = os.environ.get("LLAMA_CPP_LIB_PATH")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib)
    try:
        import llama_cpp
    finally:
        if old is None:
            os.environ.pop("LLAMA_CPP_LIB_PATH", None)
        else:
            os.environ["LLAMA_CPP_LIB_PATH"] = old
    return llama_cpp


llama_cpp = _import_llama_cpp()


# ---------------------------------------------------------------------------------------------
# the engine's C API in Python types
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KvStats:
    """What the KV cache allocated and holds, as measured by the engine."""

    kv_bytes: int             #: bytes of every KV buffer this cache allocated
    kv_bytes_dense: int       #: bytes a stock cache allocates for the same n_ctx, layers and types
    ratio: float              #: kv_bytes_dense / kv_bytes (compression; 1.0 with merging off)
    merged_layer_pairs: int
    start_layer: int          #: first merged layer (-1: merging off)
    merge_k: bool
    merge_v: bool
    n_ctx: int                #: cells
    tokens: int               #: occupied cells
    tokens_merged: int        #: cells stored as shared direction + norms
    tokens_staged: int        #: recent cells still exact, not merged yet
    tokens_retained: float    #: merged cells kept exact, averaged over the merged (pair, K/V) pools
    staging_capacity: int
    retention_capacity: int
    exact_slots_per_layer: int
    exact_rows_per_layer: int  #: rows allocated for the slots of layer a (+ 1 zero row); layer b keeps its exact rows in dir
    merged_pools: int = 0      #: merged (layer pair, kind) combinations
    aligned_pools: int = 0     #: of which with a calibrated rotation
    rotation_bytes: int = 0    #: bytes of the rotations (part of kv_bytes)
    hadamard_k: int = 0        #: merged caches: llama.cpp's Hadamard block on quantized K rows (0: none)
    hadamard_v: int = 0        #: the same for V
    #: counters (not part of the comparison of two stats): rows copied between the host and the merged
    #: pools so far (state save/load, get_rows; never the merge step); graphs the merge step computed on
    #: the pools' backend, host-to-device copies it made and times it waited for that backend, so far
    host_rows: int = field(default=0, compare=False)
    merge_graphs: int = field(default=0, compare=False)
    merge_uploads: int = field(default=0, compare=False)
    merge_syncs: int = field(default=0, compare=False)

    @property
    def staging_fill(self) -> float:
        return self.tokens_staged / self.staging_capacity if self.staging_capacity else 0.0


def _ctx(ctx_ptr: int):
    if not ctx_ptr:
        raise ValueError("the llama context is closed")
    return ffi.cast("struct llama_context *", ctx_ptr)


class _Params:
    """The params struct plus the buffers its pointers refer to (alive until set_pending copied them)."""

    def __init__(self, p, keep):
        self.p = p
        self.keep = keep


def params_from_config(cfg: MergeConfig, n_ubatch: int, pairs: list[PairSpec] | None = None):
    """The engine params for cfg; `pairs` (explicit selection, e.g. from a calibration file)
    replaces the start_layer / merge_k / merge_v layout."""
    p = ffi.new("struct llama_minicache_params *")
    p.start_layer = -1 if cfg.start_layer is None else cfg.start_layer
    p.t = cfg.t
    p.gamma = cfg.gamma
    p.window = cfg.window
    p.n_ubatch = n_ubatch
    p.merge_k = cfg.merge_k
    p.merge_v = cfg.merge_v
    p.retention = 0 if cfg.retention == "topk" else 1
    keep = []
    if pairs:
        arr = ffi.new("struct llama_minicache_pair[]", len(pairs))
        keep.append(arr)
        for i, q in enumerate(pairs):
            arr[i].kind = engine.KINDS[q.kind]
            arr[i].il = q.layer
            arr[i].rot = engine.ROT_FORMS[q.form]
            if q.form is None:
                arr[i].n_r, arr[i].r = 0, ffi.NULL
            else:
                r = np.ascontiguousarray(q.r, dtype=np.float32)
                keep.append(r)
                arr[i].n_r = r.size
                arr[i].r = ffi.cast("const float *", r.ctypes.data)
        p.n_pairs = len(pairs)
        p.pairs = arr
    return _Params(p, keep)


def last_error() -> str:
    return ffi.string(engine.load().llama_minicache_last_error()).decode()


def set_pending(params) -> None:
    """Arm (params) or disarm (None) MiniCache for the next context created on this thread."""
    if not engine.load().llama_minicache_set_pending(params.p if params is not None else ffi.NULL):
        raise ValueError(f"kv_merge: {last_error()}")


def get_stats(ctx_ptr: int) -> KvStats | None:
    """Layout and fill of the context's KV cache (merged or not); None if its memory is not a KV
    cache (recurrent models)."""
    st = ffi.new("struct llama_minicache_stats *")
    if not engine.load().llama_minicache_get_stats(_ctx(ctx_ptr), st):
        return None
    return KvStats(
        kv_bytes=st.kv_bytes, kv_bytes_dense=st.kv_bytes_dense,
        ratio=st.kv_bytes_dense / st.kv_bytes if st.kv_bytes else 1.0,
        merged_layer_pairs=st.n_pairs, start_layer=st.start_layer,
        merge_k=bool(st.merge_k), merge_v=bool(st.merge_v), n_ctx=st.kv_size,
        tokens=st.n_cells_used, tokens_merged=st.n_merged, tokens_staged=st.n_staged,
        tokens_retained=st.n_retained / st.n_pools if st.n_pools else 0.0,
        staging_capacity=st.n_stage, retention_capacity=st.n_retain_max, exact_slots_per_layer=st.n_slots,
        exact_rows_per_layer=st.n_rows, merged_pools=st.n_pools, aligned_pools=st.n_rot,
        rotation_bytes=st.rot_bytes, hadamard_k=st.attn_rot_k, hadamard_v=st.attn_rot_v,
        host_rows=st.host_rows, merge_graphs=st.merge_graphs, merge_uploads=st.merge_uploads,
        merge_syncs=st.merge_syncs,
    )


def get_pairs(ctx_ptr: int) -> list[PairSpec]:
    """The merged (layer pair, kind) pools of the context's cache (rotations not included)."""
    lib = engine.load()
    n = lib.llama_minicache_get_pairs(_ctx(ctx_ptr), ffi.NULL, 0)
    if n <= 0:
        return []
    arr = ffi.new("struct llama_minicache_pair[]", n)
    lib.llama_minicache_get_pairs(_ctx(ctx_ptr), arr, n)
    forms = {v: k for k, v in engine.ROT_FORMS.items()}
    return [PairSpec("kv"[arr[i].kind], arr[i].il, forms[arr[i].rot]) for i in range(n)]


def get_rows(ctx_ptr: int, layer: int, kind: str, c0: int, n: int, n_embd: int) -> np.ndarray:
    """Restored K or V rows [n, n_embd] float32 of cells [c0, c0 + n) of a layer (merged or not)."""
    if kind not in engine.KINDS:
        raise ValueError(f"kind={kind!r} is not valid: expected 'k' or 'v'")
    for name, v in (("layer", layer), ("c0", c0), ("n", n), ("n_embd", n_embd)):
        if not (isinstance(v, (int, np.integer)) and 0 <= v < 2**31):
            raise ValueError(f"{name}={v!r} is not valid: expected an integer in [0, 2^31)")
    lib = engine.load()
    # the engine writes n rows of the layer's real width: ask for it (n = 0 writes nothing) before allocating
    width = lib.llama_minicache_get_rows(_ctx(ctx_ptr), layer, engine.KINDS[kind], c0, 0, ffi.cast("float *", ffi.new("float[1]")))
    if width < 0:
        raise ValueError(f"cannot read {kind.upper()} rows of layer {layer}, cells [{c0}, {c0 + n}): no such layer, "
                         "cells out of range, or a cache type the engine cannot read back")
    if width != n_embd:
        raise ValueError(f"layer {layer} {kind.upper()} rows are {width} wide, not {n_embd}")
    out = np.empty((n, width), dtype=np.float32)
    got = lib.llama_minicache_get_rows(_ctx(ctx_ptr), layer, engine.KINDS[kind], c0, n, ffi.cast("float *", out.ctypes.data))
    if got != width:
        raise ValueError(f"cannot read {kind.upper()} rows of layer {layer}, cells [{c0}, {c0 + n})")
    return out


def get_rotation(ctx_ptr: int, layer: int, kind: str) -> Optional[np.ndarray]:
    """The rotation [n_embd, n_embd] an aligned merged pool applies, in the basis of the cached rows
    (llama.cpp rotates quantized K/V with a Hadamard matrix H: then H R H); None if it has none."""
    if kind not in engine.KINDS:
        raise ValueError(f"kind={kind!r} is not valid: expected 'k' or 'v'")
    lib = engine.load()
    n = lib.llama_minicache_get_rotation(_ctx(ctx_ptr), int(layer), engine.KINDS[kind], ffi.NULL, 0)
    if n < 0:
        raise ValueError(f"layer {layer} {kind.upper()} is not merged")
    if n == 0:
        return None
    out = np.zeros(n, dtype=np.float32)
    lib.llama_minicache_get_rotation(_ctx(ctx_ptr), int(layer), engine.KINDS[kind], ffi.cast("float *", out.ctypes.data), n)
    d = int(round(n ** 0.5))
    return out.reshape(d, d)


def get_cells(ctx_ptr: int, layer: int, kind: str, c0: int, n: int):
    """(state uint8 [n], dist float32 [n]) of cells in the pool holding a merged layer/kind."""
    if kind not in engine.KINDS:
        raise ValueError(f"kind={kind!r} is not valid: expected 'k' or 'v'")
    for name, v in (("layer", layer), ("c0", c0), ("n", n)):
        if not (isinstance(v, (int, np.integer)) and 0 <= v < 2**31):
            raise ValueError(f"{name}={v!r} is not valid: expected an integer in [0, 2^31)")
    stats = get_stats(ctx_ptr)
    if stats is None or c0 + n > stats.n_ctx:
        raise ValueError(f"cells [{c0}, {c0 + n}) are out of range (the cache has {stats.n_ctx if stats else 0} cells)")
    state = np.zeros(n, dtype=np.uint8)
    dist = np.zeros(n, dtype=np.float32)
    rc = engine.load().llama_minicache_get_cells(_ctx(ctx_ptr), layer, engine.KINDS[kind], c0, n,
                                          ffi.cast("uint8_t *", state.ctypes.data), ffi.cast("float *", dist.ctypes.data))
    if rc < 0:
        raise ValueError(f"layer {layer} {kind.upper()} is not merged in this context (or cells out of range)")
    return state, dist


# ---------------------------------------------------------------------------------------------
# llama-cpp-python internals
# ---------------------------------------------------------------------------------------------

_rpc_registered: dict[str, int] = {}


def parse_rpc_servers(servers) -> list[str]:
    """"host:port,host:port" (llama.cpp's --rpc) or a list of "host:port" -> the endpoints."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out = []
    for item in items:
        ep = str(item).strip()
        host, sep, port = ep.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"rpc_servers: {ep!r} is not valid: expected host:port (an rpc-server's address, "
                              "e.g. 192.168.1.10:50052), several separated by commas")
        out.append(ep)
    if not out:
        raise ConfigError("rpc_servers: no server given (expected host:port[,host:port...])")
    return out


#: llama.cpp's RPC protocol (ggml/include/ggml-rpc.h of the pinned llama.cpp): major version, HELLO
#: command, capability bytes (ggml-rpc/transport.h)
RPC_PROTO_MAJOR, RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE = 7, 14, 24


def _rpc_hello(host: str, port: int, timeout: float = 5.0) -> tuple:
    """The server's (major, minor) RPC protocol version, by llama.cpp's HELLO handshake; OSError or
    ValueError when the peer does not answer as an rpc-server within the timeout."""
    import socket
    import struct

    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
        buf = b""
        while len(buf) < 8 + 4 + RPC_CONN_CAPS_SIZE:
            try:
                chunk = s.recv(64)
            except socket.timeout:  # connected, but no answer: not an rpc-server
                break
            if not chunk:
                break
            buf += chunk
            if len(buf) >= 8 and struct.unpack_from("<Q", buf)[0] != 4 + RPC_CONN_CAPS_SIZE:
                break
    if len(buf) < 8 + 4 or struct.unpack_from("<Q", buf)[0] != 4 + RPC_CONN_CAPS_SIZE:
        raise ValueError("no HELLO answer")
    return buf[8], buf[9]


def add_rpc_servers(servers) -> list[str]:
    """Make llama.cpp's RPC devices of these rpc-servers available to models loaded from now on in
    this process (llama.cpp offloads n_gpu_layers to them, as with `--rpc`). Each server is checked
    once here (llama.cpp's HELLO handshake, 5 s timeout) so that an unreachable server, or a port
    that is not an rpc-server of this protocol, is a clear error, not a hang or an abort inside
    llama.cpp. A server registered before is not registered again."""

    endpoints = parse_rpc_servers(servers)
    lib = engine.load_ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if reg == engine.ggml_ffi.NULL:
        raise ConfigError("rpc_servers: this engine was built without llama.cpp's RPC backend (GGML_RPC): "
                          "rebuild it with scripts/setup.sh")
    add = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    add = engine.ggml_ffi.cast("ggml_backend_reg_t (*)(const char *)", add)
    for ep in endpoints:
        if ep in _rpc_registered:
            continue
        host, _, port = ep.rpartition(":")
        try:
            major, minor = _rpc_hello(host.strip("[]"), int(port))
        except OSError as e:
            raise ConfigError(f"rpc_servers: cannot reach the rpc-server at {ep} ({e}); start one there with "
                              "`minicache-gguf rpc-server --host 0.0.0.0 --port PORT`") from None
        except ValueError:
            raise ConfigError(f"rpc_servers: {ep} does not answer as a llama.cpp rpc-server (no RPC HELLO reply "
                              "within 5 s): is it the right port?") from None
        if major != RPC_PROTO_MAJOR:
            raise ConfigError(f"rpc_servers: the rpc-server at {ep} speaks RPC protocol {major}.{minor}, this engine "
                              f"{RPC_PROTO_MAJOR}.x: run the rpc-server of the same llama.cpp (`minicache-gguf rpc-server`)")
        server_reg = add(ep.encode())
        if server_reg == engine.ggml_ffi.NULL:
            raise ConfigError(f"rpc_servers: the rpc-server at {ep} offers no device")
        n_before = lib.ggml_backend_dev_count()
        lib.ggml_backend_register(server_reg)
        _rpc_registered[ep] = int(lib.ggml_backend_dev_count() - n_before)
    return endpoints


def context_pointer(llm) -> int:
    """The llama_context pointer of a llama_cpp.Llama (0 once closed)."""
    ctx = getattr(llm, "_ctx", None)
    return ctx.ctx if ctx is not None and ctx.ctx else 0


def plain_llama(model_path, **kwargs):
    """llama-cpp-python's own Llama on the patched engine, merging off (calibration, reference runs)."""
    return llama_cpp.Llama(str(model_path), **kwargs)


def eval_logits(llm, tokens: list[int]) -> np.ndarray:
    """Evaluate tokens after llm.n_tokens (as Llama.eval) and return the logits of every one of them
    [n, n_vocab], without logits_all (which makes llama.cpp compute logits for the whole prompt
    and llama-cpp-python allocate n_ctx x n_vocab floats)."""
    llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
    n_vocab = llm.n_vocab()
    out = []
    for i in range(0, len(tokens), llm.n_batch):
        batch = list(tokens[i:i + llm.n_batch])
        n_past = llm.n_tokens
        llm._batch.set_batch(batch=batch, n_past=n_past, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.input_ids[n_past:n_past + len(batch)] = batch
        out.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch), n_vocab)).copy())
        llm.n_tokens += len(batch)
    return np.concatenate(out) if out else np.zeros((0, n_vocab), dtype=np.float32)


def seq_state(llm, seq_id: int = 0) -> bytes:
    """The sequence's KV state blob (llama_state_seq_get_data)."""
    return kvstate.get_seq_state(llama_cpp, llm._ctx.ctx, seq_id)


def set_seq_state(llm, blob: bytes, seq_id: int = 0) -> None:
    kvstate.set_seq_state(llama_cpp, llm._ctx.ctx, blob, seq_id)


def capture_kv(llm, tokens: list[int], layer_groups=None) -> kvstate.SeqState:
    """Real K/V rows of a stock context after evaluating tokens (post-RoPE K). layer_groups: the
    model's KV caches' layers (ModelInfo.cache_layers(); needed for a model with sliding-window layers)."""
    llm.reset()
    llm.eval(tokens)
    return kvstate.parse_seq_state(seq_state(llm), layer_groups)


def token_text(llm, token: int) -> str:
    """A token's text as the vocabulary spells it (special tokens included)."""
    return llm._model.token_get_text(token)
