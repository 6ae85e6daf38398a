"""llama.cpp's RPC backend with a merged cache: an rpc-server on loopback holds every layer and the
KV cache; generation and logits equal the local merged engine's, and the merge step runs on the
server (no row crosses to the client)."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minicache_gguf import ConfigError, Llama, _engine, _internals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_server(tmp_path_factory):
    exe = _engine.active_lib_dir() / _engine.RPC_SERVER
    port = free_port()
    # its log to a file: a pipe nobody reads fills up and blocks the server
    log = open(tmp_path_factory.mktemp("rpc") / "rpc-server.log", "wb")
    proc = subprocess.Popen([str(exe), "--host", "127.0.0.1", "--port", str(port), "--threads", "2"],
                            stdout=log, stderr=subprocess.STDOUT)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"127.0.0.1:{port}", proc
    proc.kill()
    proc.wait()
    log.close()


@pytest.mark.parametrize("layout,flash_attn", [("paper", False), ("aligned", True)])
def test_merged_cache_on_an_rpc_server(model_path, tmp_path, rpc_server, layout, flash_attn):
    endpoint, proc = rpc_server
    out = tmp_path / "rpc.json"
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "rpc_probe.py"), endpoint, str(model_path), layout,
                        "1" if flash_attn else "0", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert proc.poll() is None, "the rpc-server exited"
    # the layers and the (merged) KV cache were placed on the server
    assert f"RPC0[{endpoint}] KV buffer size" in r.stderr
    res = json.loads(out.read_text())
    loc, rpc = res["local"], res["rpc"]
    assert rpc["tokens_merged"] == loc["tokens_merged"] > 150 and rpc["tokens_retained"] > 0
    assert (rpc["aligned_pools"] > 0) == (layout == "aligned")
    # the merge step ran as graphs on the server: no row was copied to or from the client
    assert rpc["host_rows"] == 0 and rpc["merge_graphs"] >= 2
    # the same ops on the same CPU kernels, on the other side of a socket: equal (measured: bit for bit)
    assert res["argmax_equal"] and res["max_abs_diff"] <= 1e-3, res["max_abs_diff"]
    assert rpc["text"] == loc["text"]


def test_rpc_servers_refused_clearly():
    with pytest.raises(ConfigError, match="'nohost' is not valid: expected host:port"):
        _internals.parse_rpc_servers("nohost")
    with pytest.raises(ConfigError, match="expected host:port"):
        _internals.parse_rpc_servers("127.0.0.1:99999")
    with pytest.raises(ConfigError, match="cannot reach the rpc-server at 127.0.0.1:"):
        Llama(n_ctx=64, verbose=False, rpc_servers=f"127.0.0.1:{free_port()}", kv_merge=True)
    # a port that is not an rpc-server (an HTTP-like peer that waits for more): refused, not a hang in llama.cpp
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} does not answer as a llama.cpp rpc-server"):
            _internals.add_rpc_servers(f"127.0.0.1:{port}")
