"""`minicache-gguf serve`: a real server on 127.0.0.1, real HTTP clients (stdlib urllib)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("minicache-gguf"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, stream=False):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("srv") / "server.log"
    env = dict(os.environ, KV_WINDOW="32", KV_CALIBRATION="paper")  # environment variables set the merge options
    with open(log, "w") as f:
        proc = subprocess.Popen([CLI, "serve", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024"],
                                stdout=f, stderr=subprocess.STDOUT, env=dict(env, KV_MERGE="true"))
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")
    yield base, log
    proc.terminate()
    proc.wait(timeout=30)


def test_chat_completion(server):
    base, log = server
    with _post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}],
                                                "max_tokens": 12, "temperature": 0}) as r:
        out = json.load(r)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["content"].strip()
    assert out["usage"]["completion_tokens"] > 0
    assert "kv_merge paper layout, window 32" in log.read_text()  # KV_WINDOW=32 from the environment


def test_streaming(server):
    base, _ = server
    chunks = []
    with _post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to five."}],
                                                "max_tokens": 16, "temperature": 0, "stream": True}) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert len(chunks) > 3 and text.strip()


def test_two_concurrent_clients_are_both_answered(server):
    """Two clients at once both get a full answer. llama-cpp-python's server serializes requests
    with a lock (one merged cache, one sequence): this shows they queue and neither fails, not that
    they run in parallel."""
    base, _ = server
    res = {}

    def ask(i):
        with _post(base + "/v1/completions", {"prompt": f"The number {i} is", "max_tokens": 8, "temperature": 0}) as r:
            res[i] = json.load(r)

    ts = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert set(res) == {1, 2}
    assert all(r["choices"][0]["text"] for r in res.values())


@pytest.mark.parametrize("argv, env, msg", [
    (["--kv_merge", "true", "--kv_window", "0"], {}, "window=0 is not valid"),
    (["--kv_merge", "true"], {"KV_GAMMA": "2"}, "gamma=2.0 is not valid"),
    (["--kv_merge", "true", "--kv_calibration", "/nonexistent.gguf"], {}, "no such file"),
    (["--model", "/nonexistent.gguf"], {}, "model='/nonexistent.gguf': no such file"),
    ([], {"KV_WINDOW": "many"}, "invalid server settings: kv_window='many'"),
    (["--kv_merge", "true", "--type_v", "2"], {}, "type_v=q4_0 needs flash_attn=True"),
    (["--type_k", "12"], {}, "type_k=12 is not valid: expected one of f32 (0), f16 (1)"),
])
def test_invalid_options_refused_at_start(argv, env, msg):
    r = subprocess.run([CLI, "serve", "--port", str(_free_port()), *argv], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, **env))
    assert r.returncode == 1
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_config_file_fields(tmp_path, model_path):
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"models": [{"model": str(model_path), "kv_merge": True, "kv_window": 0}]}))
    r = subprocess.run([CLI, "serve", "--config_file", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "window=0 is not valid" in r.stderr, r.stderr
    missing = subprocess.run([CLI, "serve", "--config_file", str(tmp_path / "nope.json")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
