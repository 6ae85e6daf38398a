"""The build: pinned upstream, patch series, cache key, clear failures."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minicache_gguf import _engine

ROOT = Path(__file__).resolve().parent.parent


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_engine", ROOT / "scripts" / "build_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def copy_inputs(dst: Path) -> Path:
    shutil.copyfile(ROOT / "CMakeLists.txt", dst / "CMakeLists.txt")
    shutil.copytree(ROOT / "native", dst / "native", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "patches", dst / "patches")
    return dst


def test_key_tracks_every_input(tmp_path):
    root = copy_inputs(tmp_path)
    k0 = _engine.engine_key("patched", root=root)
    assert k0 == _engine.engine_key("patched", root=root)  # deterministic
    assert k0 == _engine.engine_key("patched")  # the copy is byte-identical to the tree
    assert _engine.engine_key("patched", cuda=True, root=root) != k0
    stock = _engine.engine_key("stock", root=root)

    patch = sorted((root / "patches" / "llama.cpp").glob("*.patch"))[0]
    patch.write_text(patch.read_text() + "\n")
    k1 = _engine.engine_key("patched", root=root)
    (root / "native" / "minicache.c").write_text((root / "native" / "minicache.c").read_text() + "\n")
    k2 = _engine.engine_key("patched", root=root)
    assert len({k0, k1, k2}) == 3
    assert _engine.engine_key("stock", root=root) == stock  # stock does not read native/ or patches/


def test_flags_are_portable():
    for variant in _engine.VARIANTS:
        assert "-DGGML_NATIVE=OFF" in _engine.cmake_flags(variant)
    assert _engine.manifest("patched")["cmake_flags"] == _engine.cmake_flags("patched")
    with pytest.raises(ValueError, match="'debug' is not valid"):
        _engine.cmake_flags("debug")


def test_series_applies_in_order_to_pinned_upstream(tmp_path, capsys):
    b = load_build_script()
    sdist = b.fetch_sdist()  # cached; sha256 verified again
    assert b.sha256_file(sdist) == _engine.UPSTREAM_SDIST_SHA256
    b.extract_llama_cpp(sdist, tmp_path / "llama.cpp")
    b.overlay_new_files(tmp_path / "llama.cpp")
    b.apply_patches(tmp_path / "llama.cpp", _engine.patch_series())
    assert "LLAMA_MINICACHE_DIR" in (tmp_path / "llama.cpp" / "src" / "CMakeLists.txt").read_text()
    # the new files are real sources; the .patch files only edit existing llama.cpp files
    new = {rel for rel, _ in _engine.overlay_files()}
    assert new == {"include/llama-minicache.h", "src/llama-minicache.cpp",
                   "src/llama-kv-cache-minicache.h", "src/llama-kv-cache-minicache-impl.h",
                   "src/llama-kv-cache-minicache.cpp", "src/llama-kv-cache-minicache-graph.cpp",
                   "src/llama-kv-cache-minicache-merge.cpp", "src/llama-kv-cache-minicache-state.cpp"}
    for p in _engine.patch_series():
        assert "--- /dev/null" not in p.read_text(), p.name
    # overlaying twice would overwrite a file the tree already has: refused, named
    with pytest.raises(SystemExit):
        b.overlay_new_files(tmp_path / "llama.cpp")
    assert "would overwrite llama.cpp's own" in capsys.readouterr().err
    # applying the series twice must fail, naming the patch
    with pytest.raises(SystemExit):
        b.apply_patches(tmp_path / "llama.cpp", _engine.patch_series()[:1])
    err = capsys.readouterr().err
    assert f"patch {_engine.patch_series()[0].name} does not apply" in err


def test_foreign_patch_is_refused_by_name(tmp_path, capsys):
    b = load_build_script()
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "llama.cpp").write_text("int a;\nint b;\nint c;\n")
    bad = tmp_path / "0099-foreign.patch"
    bad.write_text("--- a/src/llama.cpp\n+++ b/src/llama.cpp\n@@ -1,3 +1,3 @@\n int x;\n-int y;\n+int z;\n int w;\n")
    with pytest.raises(SystemExit):
        b.apply_patches(tree, [bad])
    assert "patch 0099-foreign.patch does not apply" in capsys.readouterr().err
    assert (tree / "src" / "llama.cpp").read_text() == "int a;\nint b;\nint c;\n"  # untouched


def test_sync_tree_rewrites_only_changed_files(tmp_path):
    b = load_build_script()
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "a").write_text("1")
    (src / "d" / "b").write_text("2")
    assert b.sync_tree(src, dst) == 2
    assert b.sync_tree(src, dst) == 0
    (src / "a").write_text("3")
    (dst / "stale").write_text("x")
    assert b.sync_tree(src, dst) == 2
    assert (dst / "a").read_text() == "3" and not (dst / "stale").exists()


def test_unchanged_tree_is_a_noop():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_engine.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "patched engine up to date" in r.stdout


def test_missing_engine_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(_engine.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(_engine.LIB_DIR_ENV, raising=False)
    with pytest.raises(_engine.EngineNotBuilt, match="run: bash scripts/setup.sh"):
        _engine.lib_dir("patched")
    with pytest.raises(_engine.EngineNotBuilt, match="setup.sh --stock"):
        _engine.lib_dir("stock")
    monkeypatch.setenv(_engine.LIB_DIR_ENV, str(tmp_path))
    with pytest.raises(_engine.EngineNotBuilt, match="does not contain libllama.so"):
        _engine.lib_dir("patched")


def test_cuda_flavour_flags_and_archs(monkeypatch):
    monkeypatch.delenv(_engine.CUDA_ARCHS_ENV, raising=False)
    flags = _engine.cmake_flags("patched", cuda=True)
    assert "-DGGML_CUDA=ON" in flags and f"-DCMAKE_CUDA_ARCHITECTURES={_engine.DEFAULT_CUDA_ARCHS}" in flags
    assert "-DGGML_RPC=ON" in flags and "-DGGML_RPC=ON" not in _engine.cmake_flags("stock")
    monkeypatch.setenv(_engine.CUDA_ARCHS_ENV, "89")
    assert "-DCMAKE_CUDA_ARCHITECTURES=89" in _engine.cmake_flags("patched", cuda=True)
    assert _engine.engine_key("patched", cuda=True) != _engine.engine_key("patched")
    monkeypatch.setenv(_engine.CUDA_ARCHS_ENV, "native;all")
    with pytest.raises(ValueError, match="MINICACHE_GGUF_CUDA_ARCHS='native;all' is not valid"):
        _engine.cmake_flags("patched", cuda=True)


def test_cuda_build_without_a_toolkit_says_so():
    """No nvcc (or nvcc without cuBLAS): a message naming what is missing, before any work."""
    homes = [Path(p) for p in ("/usr/local/cuda", "/usr")] + sorted(Path("/usr/local").glob("cuda*"))
    if any((h / "include" / "cublas_v2.h").is_file() or list(h.glob("targets/*/include/cublas_v2.h")) for h in homes):
        pytest.skip("a CUDA toolkit with cuBLAS is installed: --cuda would build")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_engine.py"), "--cuda"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "--cuda needs the CUDA toolkit (nvcc)" in r.stderr or "but not cuBLAS (cublas_v2.h" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "building patched engine" not in r.stderr


def test_exported_source_is_pruned_and_checked(tmp_path):
    """--export-source: what the builds read (the backends built here, no models/docs), with its
    sha256; --source-tar refuses a tree that does not match it."""
    out = tmp_path / "llama-src.tar.gz"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_engine.py"), "--export-source", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import tarfile
    names = tarfile.open(out).getnames()
    assert "llama.cpp/CMakeLists.txt" in names and "llama.cpp/tools/rpc/rpc-server.cpp" in names
    assert "llama.cpp/tools/server/server.cpp" in names and "llama.cpp/common/common.cpp" in names
    assert any(n.startswith("llama.cpp/ggml/src/ggml-cuda/") for n in names)
    # every member under the new root, long names too (a pax header's path would keep the old one)
    assert all(n.startswith("llama.cpp/") for n in names), [n for n in names if not n.startswith("llama.cpp/")][:3]
    inst = "llama.cpp/ggml/src/ggml-cuda/template-instances/"
    for kind in ("fattn-mma-f16-instance-", "fattn-tile-instance-", "fattn-vec-instance-", "mmf-instance-", "mmq-instance-"):
        assert any(n.startswith(inst + kind) for n in names), kind
    assert not any(n.startswith(("llama.cpp/models/", "llama.cpp/docs/", "llama.cpp/ggml/src/ggml-vulkan/")) for n in names)
    assert out.stat().st_size < 8 * 2**20
    b = load_build_script()
    assert b.check_source_tar(out) == out
    side = Path(str(out) + ".sha256")
    side.write_text("0" * 64 + " " + _engine.UPSTREAM_SDIST_SHA256 + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_engine.py"), "--source-tar", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "refusing it" in r.stderr, r.stderr


def test_a_cuda_engine_built_for_other_architectures_is_named(tmp_path, monkeypatch):
    """The CUDA architectures are part of an engine's key: asking for the CUDA engine with another
    MINICACHE_GGUF_CUDA_ARCHS than it was built with names the engines that are there and their value."""
    monkeypatch.setenv("MINICACHE_GGUF_CACHE", str(tmp_path))
    monkeypatch.delenv(_engine.LIB_DIR_ENV, raising=False)
    monkeypatch.setenv(_engine.CUDA_ARCHS_ENV, "90")
    built = _engine.engine_dir("patched", cuda=True)
    (built / "lib").mkdir(parents=True)
    (built / "lib" / "libllama.so").write_bytes(b"")
    (built / _engine.ENGINE_MANIFEST).write_text(json.dumps({"cmake_flags": _engine.cmake_flags("patched", cuda=True)}))
    assert _engine.lib_dir("patched", cuda=True) == built / "lib"
    monkeypatch.setenv(_engine.CUDA_ARCHS_ENV, "89")
    with pytest.raises(_engine.EngineNotBuilt, match=rf"built here for other CUDA architectures: {built.name} \(90\): "
                                                     r"set MINICACHE_GGUF_CUDA_ARCHS to the one it was built with \(now '89'\)"):
        _engine.lib_dir("patched", cuda=True)
    monkeypatch.setenv(_engine.CUDA_ARCHS_ENV, "90")
    monkeypatch.setenv("MINICACHE_GGUF_CACHE", str(tmp_path / "empty"))
    with pytest.raises(_engine.EngineNotBuilt) as e:
        _engine.lib_dir("patched", cuda=True)
    assert "other CUDA architectures" not in str(e.value)

