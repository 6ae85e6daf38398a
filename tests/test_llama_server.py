"""`minicache-gguf llama-server`: llama.cpp's own server, built from the patched tree, on 127.0.0.1
with real HTTP clients; the params file it hands over read by the real engine."""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from minicache_gguf import _engine, _internals, corpus, llama_server
from minicache_gguf.calibrate import pairs_for
from minicache_gguf.config import ConfigError, MergeConfig

CLI = str(Path(sys.executable).with_name("minicache-gguf"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---- the params file, read by the engine (no server) -------------------------------------------

def _pairs_of_context(**kwargs):
    llm = _internals.llama_cpp.Llama(**kwargs)
    try:
        ctx = _internals.context_pointer(llm)
        return [(p.kind, p.layer, p.form) for p in _internals.get_pairs(ctx)], _internals.get_stats(ctx)
    finally:
        llm.close()


def test_params_file_arms_the_same_merge_as_the_python_api(model_path, tmp_path):
    from minicache_gguf import Llama, engine

    cfg = MergeConfig()
    pairs, _ = pairs_for(cfg, model_path)
    path = llama_server.write_params(cfg, pairs)
    assert path.read_bytes()[:8] == llama_server.PARAMS_MAGIC
    lib = engine.load()
    assert lib.llama_minicache_set_pending_file(str(path).encode(), 256)
    got, stats = _pairs_of_context(model_path=str(model_path), n_ctx=1024, n_ubatch=256, verbose=False)
    ref = Llama(model_path, n_ctx=1024, kv_merge=True, verbose=False)
    try:
        want_stats = ref.kv_stats()
        want = [(p.kind, p.layer, p.form) for p in _internals.get_pairs(_internals.context_pointer(ref))]
        for p in _internals.get_pairs(_internals.context_pointer(ref)):
            r = _internals.get_rotation(_internals.context_pointer(ref), p.layer, p.kind)
            assert r is not None and np.isfinite(r).all()
    finally:
        ref.close()
    assert got == want and len(got) == len(pairs)
    assert stats == want_stats and stats.aligned_pools == len(pairs)


def test_bad_params_files_are_refused_with_the_reason(model_path, tmp_path):
    from minicache_gguf import engine

    lib = engine.load()
    good = llama_server.params_bytes(MergeConfig(calibration="paper"), None)
    t_bad = bytearray(good)
    t_bad[12:16] = struct.pack("<f", 2.0)  # t
    cases = {
        "missing": (None, "cannot open the params file"),
        "magic": (b"GGUF" + good[4:], "first 8 bytes are not MCKVPAR1"),
        "short": (good[:20], "the header is cut short"),
        "trailing": (good + b"\0", "bytes after the last pair"),
        "pairs": (good[:-4] + struct.pack("<i", 3), "pair 0 is cut short"),
        "t": (bytes(t_bad), "t=2 is not valid"),
    }
    for name, (blob, why) in cases.items():
        path = tmp_path / f"{name}.mckvpar"
        if blob is not None:
            path.write_bytes(blob)
        assert not lib.llama_minicache_set_pending_file(str(path).encode(), 256), name
        assert why in _internals.last_error(), (name, _internals.last_error())
    # a refused file arms nothing: the next context is stock
    _, stats = _pairs_of_context(model_path=str(model_path), n_ctx=512, verbose=False)
    assert stats.start_layer == -1


def test_plan_resolves_the_merge_and_adds_what_it_needs(model_path):
    args, describe = llama_server.plan(["-m", str(model_path), "-np", "2", "--port", "1"])
    assert "aligned merging on" in describe and "f16" in describe
    i = args.index("--kv-merge-params")
    assert Path(args[i + 1]).is_file() and "--kv-unified" in args and args[args.index("-ub") + 1] == "256"
    assert args[:4] == ["-m", str(model_path), "-np", "2"]
    # the user's -ub and --kv-unified are kept as given
    args, _ = llama_server.plan(["-m", str(model_path), "-ub", "512", "-kvu"])
    assert args.count("-ub") == 1 and "512" in args and "--kv-unified" not in args
    args, describe = llama_server.plan(["-m", str(model_path), "--no-kv-merge"])
    assert "--kv-merge-params" not in args and "merging off" in describe


@pytest.mark.parametrize("argv, why", [
    (["--no-kv-unified", "-np", "2"], "one unified KV buffer"),
    (["--context-shift"], "cannot shift positions"),
    (["-md", "draft.gguf"], "draft model"),
    (["-hf", "some/repo"], "local GGUF file"),
    (["--kv-merge-params", "x"], "writes the params file"),
    (["--kv-window", "0"], "window=0 is not valid"),
    (["-ctv", "q4_0", "-fa", "off"], "needs flash attention"),
    (["-ctk", "q9_9"], "q9_9"),
    (["--no-kv-merge", "--kv-window", "64"], "choose one"),
])
def test_plan_refuses_what_the_merged_cache_cannot_serve(model_path, argv, why):
    with pytest.raises(ConfigError, match=why):
        llama_server.plan(["-m", str(model_path), "--kv-merge"] + argv
                          if "--no-kv-merge" not in argv else ["-m", str(model_path)] + argv)


def test_a_calibration_for_another_model_is_refused_before_it_listens(tmp_path, model_path):
    from synth import LAYOUTS, write

    other = write(tmp_path / "other.gguf", LAYOUTS["llama-gqa"], tokenizer_from=model_path)
    cal = sorted((Path(llama_server.__file__).parent / "calibrations").glob("*-c4096.gguf"))[0]
    port = _free_port()
    r = subprocess.run([CLI, "llama-server", "-m", str(other), "--kv-calibration", str(cal), "--port", str(port)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and not _listening(port)
    assert "was made for another model" in r.stderr, r.stderr


# ---- the server ----------------------------------------------------------------------------------

def _start(tmp_path, argv, env=None, name="server"):
    port = _free_port()
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([CLI, "llama-server", "--host", "127.0.0.1", "--port", str(port), "-t", "2"] + argv,
                                stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base, log
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"llama-server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"llama-server did not start: {log.read_text()[-3000:]}")


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _metrics(base) -> dict:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {line.split()[0].removeprefix("llamacpp:"): float(line.split()[1])
            for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def prompts():
    text = corpus.eval_text("docs")
    # three prompts of ~600 tokens: each sequence merges (window 256) while the others run
    return [text[i * 4000:(i * 4000) + 2600] + "\n\nIn one sentence, this text is about" for i in range(3)]


#: llama.cpp's arithmetic differs with how a server batches a sequence's tokens with other slots'
#: (stock llama-server too: scripts/server_batching.py measures it, docs/cli.md has the figures), so a
#: concurrent greedy completion equals the one-at-a-time one up to where the latter's top two tokens
#: are this close (nats), and its log-probabilities on the way stay this close
NEAR_TIE, LOGPROB_TOL = 0.25, 0.5


def _agree(alone, conc) -> tuple:
    """(tokens in common before the first difference, max |logprob difference| on them, the
    one-at-a-time run's top-2 gap where they differ or None)."""
    a, b = alone["tokens"], conc["tokens"]
    k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
    pa, pb = alone["completion_probabilities"], conc["completion_probabilities"]
    d = max((abs(pa[j]["logprob"] - pb[j]["logprob"]) for j in range(k)), default=0.0)
    gap = None
    if k < len(a):
        top = pa[k]["top_logprobs"]
        gap = top[0]["logprob"] - top[1]["logprob"]
    return k, d, gap


def test_two_concurrent_clients_get_what_one_at_a_time_gets(tmp_path, prompts):
    proc, base, log = _start(tmp_path, ["-c", "4096", "-np", "2", "--metrics", "--cache-ram", "0"])
    try:
        assert "aligned merging on" in log.read_text()

        def ask(p):
            return _post(base + "/completion", {"prompt": p, "n_predict": 24, "temperature": 0, "n_probs": 2,
                                                "cache_prompt": False, "return_tokens": True})

        alone = [ask(p) for p in prompts[:2]]
        m = _metrics(base)
        assert m["kv_merge_cells_merged"] > 0 and m["kv_merge_bytes"] < m["kv_merge_bytes_dense"]
        assert m["kv_merge_pools"] > 0
        for rep in range(2):
            out = [None, None]
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, ask(prompts[i]))) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for a, b in zip(alone, out):
                assert b is not None and len(a["tokens"]) == len(b["tokens"]) == 24
                assert a["tokens_evaluated"] > 400  # past the window: merged while the other slot ran
                k, d, gap = _agree(a, b)
                assert d < LOGPROB_TOL, (rep, k, d)
                assert gap is None or gap < NEAR_TIE, (rep, k, gap, a["tokens"], b["tokens"])
        # both slots were busy in the same decode calls
        assert _metrics(base)["n_busy_slots_per_decode"] > 1.0
    finally:
        _stop(proc)


def test_default_server_merges_and_stock_server_reports_nothing_merged(tmp_path, prompts):
    # the default decoding (the fold): the merged server answers, its /metrics shows the merged cache
    proc, base, log = _start(tmp_path, ["-c", "2048", "-np", "2", "--metrics"], name="fold")
    try:
        out = _post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": prompts[2]}],
                                                    "max_tokens": 8, "temperature": 0})
        assert out["choices"][0]["message"]["content"].strip()
        m = _metrics(base)
        assert m["kv_merge_cells_merged"] > 0 and m["kv_merge_bytes"] < m["kv_merge_bytes_dense"]
    finally:
        _stop(proc)
    proc, base, log = _start(tmp_path, ["-c", "2048", "-np", "2", "--metrics", "--no-kv-merge"], name="stock")
    try:
        assert "merging off" in log.read_text()
        _post(base + "/completion", {"prompt": "Hello", "n_predict": 2})
        assert not any(k.startswith("kv_merge") for k in _metrics(base))
    finally:
        _stop(proc)


def test_llama_server_refuses_a_bad_params_file_before_it_listens(tmp_path, model_path):
    exe = _engine.active_lib_dir() / _engine.LLAMA_SERVER
    bad = tmp_path / "bad.mckvpar"
    bad.write_bytes(b"MCKVPAR1" + b"\0" * 7)
    port = _free_port()
    r = subprocess.run([str(exe), "-m", str(model_path), "--port", str(port), "--kv-merge-params", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and not _listening(port)
    assert "--kv-merge-params" in r.stderr and "the header is cut short" in r.stderr, r.stderr[-2000:]
    # an unknown llama-server flag: llama-server's own refusal, before it listens
    r = subprocess.run([CLI, "llama-server", "--port", str(port), "--no-such-flag"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "no-such-flag" in r.stderr and not _listening(port)
