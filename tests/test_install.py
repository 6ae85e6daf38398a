"""The package installs like llama-cpp-python: an sdist built by its own build backend
(scikit-build-core) into a fresh virtual environment outside the repository, where `Llama(...,
kv_merge=True)` generates with merging on, on the engine and the vendored llama_cpp installed inside
the package. The build reuses this tree's engine (-DMINICACHE_PREBUILT_ENGINE, CMakeLists.txt's
package build) so the suite does not compile llama.cpp a second time; docs/development.md gives the
command and the time of a package build that compiles."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minicache_gguf import _engine

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

# kv_merge=True (the shipped calibrated selection) on a prompt longer than its 256-token window,
# so that the merged cache really merges
PROBE = r"""
import json, sys
from minicache_gguf import Llama
import llama_cpp
from minicache_gguf import _engine
llm = Llama(sys.argv[1], n_ctx=1024, kv_merge=True, verbose=False)
prompt = " ".join(f"item {i} is {i * 7 % 13}." for i in range(80)) + " The value of item 5 is"
out = llm(prompt, max_tokens=12, temperature=0.0)
s = llm.kv_stats()
print(json.dumps({"text": out["choices"][0]["text"], "merged": s.tokens_merged, "pools": s.merged_pools,
                  "kv_bytes": s.kv_bytes, "llama_cpp": llama_cpp.__file__,
                  "lib": str(_engine.active_lib_dir())}))
"""


def _run_probe(python: str, model_path, cwd) -> dict:
    r = subprocess.run([python, "-c", PROBE, str(model_path)], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv (outside the repository) with the sdist of this tree installed in it."""
    tmp = tmp_path_factory.mktemp("install")
    dist = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(dist), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (sdist,) = dist.glob("minicache_gguf-*.tar.gz")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = dict(os.environ, CMAKE_ARGS=f"-DMINICACHE_PREBUILT_ENGINE={_engine.active_lib_dir()}")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                        str(sdist)], cwd=tmp, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return venv


def test_the_sdist_installs_and_generates_merged_in_a_fresh_venv(installed, model_path, tmp_path):
    got = _run_probe(str(installed / "bin" / "python"), model_path, tmp_path)
    site = next((installed / "lib").glob("python3*/site-packages"))
    pkg = site / "minicache_gguf"
    # the engine and llama-cpp-python's Python part both come from inside the installed package
    assert Path(got["lib"]) == pkg / "_native" / "lib"
    assert Path(got["llama_cpp"]) == pkg / "_vendor" / "llama_cpp" / "__init__.py"
    assert not (site / "llama_cpp").exists()  # llama-cpp-python itself was not installed (or built)
    assert got["merged"] > 0 and got["pools"] > 0
    # the installed package computes what this source tree computes, bit for bit (greedy text, bytes)
    here = _run_probe(sys.executable, model_path, ROOT)
    assert (got["text"], got["merged"], got["kv_bytes"]) == (here["text"], here["merged"], here["kv_bytes"])


def test_the_installed_package_says_what_it_runs(installed, tmp_path):
    r = subprocess.run([str(installed / "bin" / "minicache-gguf"), "info"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "patched" in r.stdout and "-DGGML_NATIVE=OFF" in r.stdout
    manifest = json.loads((next((installed / "lib").glob("python3*/site-packages")) / "minicache_gguf" / "_native"
                           / "engine.json").read_text())
    assert manifest["upstream_sha256"] == _engine.UPSTREAM_SDIST_SHA256
    assert manifest["key"] == _engine.engine_key("patched")  # built from this tree's patches and sources
    # llama.cpp's llama-server came with the engine and runs from inside the package
    r = subprocess.run([str(installed / "bin" / "minicache-gguf"), "llama-server", "--help-llama-server"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--kv-merge-params" in r.stdout + r.stderr, r.stderr[-2000:]
