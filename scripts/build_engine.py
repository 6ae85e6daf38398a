#!/usr/bin/env python3
"""Build the patched llama.cpp engine (or the stock reference) for this source tree.

    python scripts/build_engine.py                 # patched engine (libllama + MiniCache core)
    python scripts/build_engine.py --stock         # unpatched reference, same flags
    python scripts/build_engine.py --sdist-path    # fetch + verify the upstream sdist, print its path
    python scripts/build_engine.py --export-series OUT.patch   # the whole change as one diff, for review
    python scripts/build_engine.py --vendor-python DIR         # llama-cpp-python's Python package into DIR
    python scripts/build_engine.py --prepare-package DIR       # what `pip install` builds: see CMakeLists.txt

Steps: fetch the pinned llama-cpp-python sdist with pip and verify its sha256; extract its
vendored llama.cpp; overlay the engine's new files (patches/llama.cpp/include/, src/: real sources,
new to llama.cpp) and apply patches/llama.cpp/*.patch in order (edits to existing llama.cpp files
only; a patch that does not apply stops the build, naming it); build once with GGML_NATIVE=OFF through the top-level CMakeLists.txt;
install libllama.so + libggml*.so into <cache>/engine/<key>/lib. The key hashes every input
(upstream, patches, native sources, flags): an unchanged tree is a no-op, a changed one rebuilds.
The source and build trees per variant are kept and updated by content, so a rebuild after a
patch change only recompiles what the change touched.

Standard library only: it runs before any dependency is installed.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_engine_module():
    spec = importlib.util.spec_from_file_location("_mc_engine", ROOT / "minicache_gguf" / "_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


E = _load_engine_module()
sha256_file = E.sha256_file


def die(msg: str) -> None:
    print(f"build_engine: error: {msg}", file=sys.stderr)
    sys.exit(1)


def say(msg: str) -> None:
    print(f"build_engine: {msg}", flush=True)


def fetch_sdist() -> Path:
    """The pinned upstream sdist, downloaded once with pip and verified on every use."""
    dest_dir = E.cache_dir() / "downloads"
    dest = dest_dir / E.UPSTREAM_SDIST
    if not dest.is_file():
        dest_dir.mkdir(parents=True, exist_ok=True)
        say(f"fetching {E.UPSTREAM_NAME}=={E.UPSTREAM_VERSION} sdist with pip")
        with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-d", tmp, f"{E.UPSTREAM_NAME}=={E.UPSTREAM_VERSION}"]
            r = subprocess.run(cmd)
            got = Path(tmp) / E.UPSTREAM_SDIST
            if r.returncode != 0 or not got.is_file():
                die(f"pip could not download {E.UPSTREAM_NAME}=={E.UPSTREAM_VERSION} (command: {' '.join(cmd)})")
            os.replace(got, dest)
    digest = sha256_file(dest)
    if digest != E.UPSTREAM_SDIST_SHA256:
        bad = dest.with_suffix(".rejected")
        os.replace(dest, bad)
        die(f"{E.UPSTREAM_SDIST} has sha256 {digest}, expected {E.UPSTREAM_SDIST_SHA256}; "
            f"moved it to {bad}")
    return dest


# what a build of libllama + libggml (CPU, CUDA, RPC) + the RPC server + llama-server reads of llama.cpp:
# the pruned source tree of --export-source (a machine without network access builds from it, see gpu_check.sh)
_SOURCE_KEEP = ("CMakeLists.txt", "LICENSE", "cmake/", "include/", "src/", "vendor/", "licenses/", "tools/rpc/",
                "common/", "tools/mtmd/", "tools/server/", "tools/ui/CMakeLists.txt", "tools/ui/ui.cpp.in",
                "tools/ui/ui.h.in", "scripts/ui-assets.cmake",
                "ggml/CMakeLists.txt", "ggml/LICENSE", "ggml/cmake/", "ggml/include/", "ggml/src/")
_SOURCE_DROP_BACKENDS = ("blas", "cann", "et", "hexagon", "hip", "metal", "musa", "opencl", "openvino", "sycl",
                         "virtgpu", "vulkan", "webgpu", "zdnn", "zendnn")


def _source_kept(rel: str) -> bool:
    if not rel.startswith(_SOURCE_KEEP):
        return False
    if rel.startswith(("tools/server/tests/", "tools/server/bench/", "tools/server/public")):
        return False
    return not any(rel.startswith(f"ggml/src/ggml-{b}/") for b in _SOURCE_DROP_BACKENDS)


def export_source(out: Path) -> None:
    """The pinned llama.cpp (from the verified sdist) pruned to what the engine builds read, as a
    tar.gz with OUT.sha256 beside it: '<sha256 of OUT> <upstream sdist sha256>'."""
    sdist = fetch_sdist()
    prefix = f"llama_cpp_python-{E.UPSTREAM_VERSION}/vendor/llama.cpp/"
    n = 0
    with tarfile.open(sdist) as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else ""
            if not rel or not (m.isfile() or m.isdir()) or not _source_kept(rel + ("/" if m.isdir() else "")):
                continue
            m.name = "llama.cpp/" + rel
            m.pax_headers.pop("path", None)  # a long name's pax header would win over the new name
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            n += m.isfile()
    Path(str(out) + ".sha256").write_text(f"{sha256_file(out)} {E.UPSTREAM_SDIST_SHA256}\n")
    say(f"wrote {out} ({n} files, {out.stat().st_size / 2**20:.1f} MiB) and {out.name}.sha256")


def check_source_tar(tar: Path) -> Path:
    """A tree written by --export-source: its sha256 and the upstream it came from must match."""
    side = Path(str(tar) + ".sha256")
    if not tar.is_file() or not side.is_file():
        die(f"--source-tar {tar}: expected the file and {side.name} beside it (written by --export-source)")
    want, upstream = (side.read_text().split() + ["", ""])[:2]
    if upstream != E.UPSTREAM_SDIST_SHA256:
        die(f"{tar} was exported from the sdist {upstream or '?'}, this tree pins {E.UPSTREAM_SDIST_SHA256}")
    got = sha256_file(tar)
    if got != want:
        die(f"{tar} has sha256 {got}, {side.name} says {want}: refusing it")
    return tar


def extract_llama_cpp(sdist: Path, dest: Path) -> None:
    prefix = f"llama_cpp_python-{E.UPSTREAM_VERSION}/vendor/llama.cpp/"
    if sdist.name.endswith(".tar.gz") and Path(str(sdist) + ".sha256").is_file():
        prefix = "llama.cpp/"  # an --export-source tree
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix):
                m.name = m.name[len(prefix):]
                members.append(m)
        if not members:
            die(f"{sdist} has no {prefix}: not the expected upstream sdist")
        tf.extractall(dest, members=members, filter="data")


def vendor_python(sdist: Path, dest: Path) -> Path:
    """llama-cpp-python's Python package (llama_cpp/, pure Python) from the verified sdist into
    dest/llama_cpp, replacing what is there; no-op when dest already holds this version's files."""
    prefix = f"llama_cpp_python-{E.UPSTREAM_VERSION}/llama_cpp/"
    stamp = dest / "llama_cpp" / ".upstream-sha256"
    if stamp.is_file() and stamp.read_text().strip() == E.UPSTREAM_SDIST_SHA256:
        return dest / "llama_cpp"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            if not members:
                die(f"{sdist} has no {prefix}: not the expected upstream sdist")
            for m in members:
                m.name = "llama_cpp/" + m.name[len(prefix):]
            tf.extractall(tmp, members=members, filter="data")
        (Path(tmp) / "llama_cpp" / ".upstream-sha256").write_text(E.UPSTREAM_SDIST_SHA256 + "\n")
        shutil.rmtree(dest / "llama_cpp", ignore_errors=True)
        os.replace(Path(tmp) / "llama_cpp", dest / "llama_cpp")
    return dest / "llama_cpp"


def prepare_package(dest: Path, cuda: bool, flags: list[str]) -> None:
    """The inputs of a package build (CMakeLists.txt under scikit-build-core): dest/llama.cpp (the
    patched tree), dest/llama_cpp (the vendored Python package) and dest/engine.json."""
    sdist = fetch_sdist()
    tree = dest / "llama.cpp"
    shutil.rmtree(tree, ignore_errors=True)
    extract_llama_cpp(sdist, tree)
    overlay_new_files(tree)
    apply_patches(tree, E.patch_series(ROOT))
    vendor_python(sdist, dest)
    manifest = {
        "key": E.engine_key("patched", cuda, ROOT),
        "variant": "patched",
        "cuda": cuda,
        "upstream": f"{E.UPSTREAM_NAME}=={E.UPSTREAM_VERSION}",
        "upstream_sha256": E.UPSTREAM_SDIST_SHA256,
        "llama_cpp_commit": E.LLAMA_CPP_COMMIT,
        "cmake_flags": flags,
        "patches": [{"name": p.name, "sha256": sha256_file(p)} for p in E.patch_series(ROOT)],
        "built_by": "pip (scikit-build-core)",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.platform(),
    }
    (dest / E.ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"package sources ready in {dest}")


def overlay_new_files(tree: Path) -> None:
    """Copy the engine's new files (not in upstream llama.cpp) into the tree; refuse to overwrite
    an upstream file: edits to existing files belong in a .patch."""
    for rel, path in E.overlay_files(ROOT):
        dest = tree / rel
        if dest.exists():
            die(f"patches/llama.cpp/{rel} would overwrite llama.cpp's own {rel}: "
                f"edits to existing llama.cpp files belong in a numbered .patch")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


def apply_patches(tree: Path, patches: list[Path]) -> None:
    if shutil.which("patch") is None:
        if shutil.which("git") is None:
            die("neither 'patch' nor 'git' is on PATH: run scripts/setup.sh (it installs the build tools)")
        for p in patches:  # the same series with git apply (machines without patch, e.g. a GPU image)
            r = subprocess.run(["git", "apply", "--whitespace=nowarn", "-p1", str(p)], cwd=tree,
                               capture_output=True, text=True)
            if r.returncode != 0:
                die(f"patch {p.name} does not apply to llama.cpp {E.LLAMA_CPP_COMMIT}:\n{r.stderr}")
            say(f"applied {p.name} (git apply)")
        return
    for p in patches:
        args = ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "--no-backup-if-mismatch",
                "-d", str(tree), "-i", str(p)]
        dry = subprocess.run(args + ["--dry-run"], capture_output=True, text=True)
        if dry.returncode != 0:
            die(f"patch {p.name} does not apply to llama.cpp {E.LLAMA_CPP_COMMIT} "
                f"(llama-cpp-python {E.UPSTREAM_VERSION}):\n{dry.stdout}{dry.stderr}")
        subprocess.run(args, check=True, capture_output=True)
        say(f"applied {p.name}")


def _same_file(a: Path, b: Path) -> bool:
    if b.is_symlink() or a.is_symlink():
        return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    return a.read_bytes() == b.read_bytes()


def sync_tree(src: Path, dst: Path) -> int:
    """Make dst equal to src by content. Changed files get a fresh mtime (so make rebuilds
    exactly them); unchanged files keep theirs. Returns the number of files written/removed."""
    changed = 0
    wanted = set()
    for s in src.rglob("*"):
        if s.is_dir() and not s.is_symlink():
            continue
        rel = s.relative_to(src)
        wanted.add(rel)
        d = dst / rel
        if _same_file(s, d):
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        if d.is_symlink() or d.exists():
            d.unlink()
        if s.is_symlink():
            os.symlink(os.readlink(s), d)
        else:
            shutil.copyfile(s, d)
            shutil.copymode(s, d)
        changed += 1
    if dst.exists():
        for d in sorted(dst.rglob("*"), reverse=True):
            rel = d.relative_to(dst)
            if d.is_symlink() or d.is_file():
                if rel not in wanted:
                    d.unlink()
                    changed += 1
            elif d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return changed


def prepare_source(variant: str, cuda: bool, sdist: Path) -> Path:
    """<cache>/engine/src-<variant>: CMakeLists.txt + native/ + llama.cpp/ (patched or not)."""
    eng = E.cache_dir() / "engine"
    eng.mkdir(parents=True, exist_ok=True)
    src = eng / f"src-{variant}{'-cuda' if cuda else ''}"
    with tempfile.TemporaryDirectory(dir=eng) as tmp:
        want = Path(tmp)
        extract_llama_cpp(sdist, want / "llama.cpp")
        if variant == "patched":
            overlay_new_files(want / "llama.cpp")
            apply_patches(want / "llama.cpp", E.patch_series(ROOT))
            shutil.copytree(ROOT / "native", want / "native",
                            ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so"))
        shutil.copyfile(ROOT / "CMakeLists.txt", want / "CMakeLists.txt")
        n = sync_tree(want, src)
    say(f"source tree {src}: {n} file(s) updated")
    return src


def run_build(src: Path, build: Path, flags: list[str], jobs: int, log: Path) -> None:
    build.mkdir(parents=True, exist_ok=True)
    configure = ["cmake", "-S", str(src), "-B", str(build), f"-DLLAMA_CPP_SOURCE_DIR={src / 'llama.cpp'}"] + flags
    compile_ = ["cmake", "--build", str(build), "-j", str(jobs)]
    with open(log, "w") as lf:
        for cmd in (configure, compile_):
            lf.write("$ " + " ".join(cmd) + "\n")
            lf.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            last_pct = -10
            for line in proc.stdout:
                lf.write(line)
                if line.startswith("[") and "%]" in line[:8]:
                    pct = int(line[1:line.index("%")].strip() or 0)
                    if pct >= last_pct + 10:
                        say(f"compiling ... {pct}%")
                        last_pct = pct
            if proc.wait() != 0:
                lf.flush()
                tail = log.read_text().splitlines()[-60:]
                die(f"command failed: {' '.join(cmd)}\n" + "\n".join(tail) + f"\n(full log: {log})")


def install_libs(build: Path, dest_lib: Path) -> list[str]:
    dest_lib.mkdir(parents=True)
    names = []
    for p in sorted((build / "bin").iterdir()):
        if (p.name.startswith(("libllama.so", "libllama-common.so", "libggml")) and ".so" in p.name) \
                or p.name in (E.RPC_SERVER, E.LLAMA_SERVER):
            if p.is_symlink():
                os.symlink(os.readlink(p), dest_lib / p.name)
            else:
                shutil.copy2(p, dest_lib / p.name)
            names.append(p.name)
    if not (dest_lib / "libllama.so").exists():
        die(f"the build produced no libllama.so in {build / 'bin'}")
    return names


def check_libs(lib: Path, variant: str) -> None:
    """Load what was built: libllama resolves its ggml siblings through $ORIGIN; the patched
    variant exports the native core, the stock one must not."""
    llama = ctypes.CDLL(str(lib / "libllama.so"))
    has_core = hasattr(llama, "minicache_version")
    if variant == "patched" and not has_core:
        die("patched libllama does not export minicache_version: native core not linked")
    if variant == "stock" and has_core:
        die("stock libllama exports minicache_version: the stock build is not stock")
    server = lib / E.LLAMA_SERVER
    if variant == "patched" and "-DMINICACHE_LLAMA_SERVER=ON" in E.cmake_flags(variant):
        r = subprocess.run([str(server), "--version"], capture_output=True, text=True) if server.is_file() else None
        if r is None or r.returncode != 0:
            die(f"{server} " + ("was not built" if r is None else f"does not run: {r.stderr.strip()[-500:]}"))


def export_series(out: Path) -> None:
    """One `diff -ruN` of upstream llama.cpp vs the patched tree (the form an upstream PR takes)."""
    sdist = fetch_sdist()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        extract_llama_cpp(sdist, a)
        extract_llama_cpp(sdist, b)
        overlay_new_files(b)
        apply_patches(b, E.patch_series(ROOT))
        r = subprocess.run(["diff", "-ruN", "a", "b"], cwd=tmp, capture_output=True, text=True)
        if r.returncode not in (0, 1):
            die(f"diff failed: {r.stderr}")
        out.write_text(r.stdout)
    say(f"wrote {out} ({r.stdout.count(chr(10))} lines)")


KEEP_BUILDS = 3


def prune_old_engines(variant: str, cuda: bool, keep: Path) -> None:
    """Keep the KEEP_BUILDS most recent engine builds of this flavour (switching branches back
    and forth stays a no-op); remove older ones and leftovers of interrupted installs."""
    flavour = re.compile(rf"^{variant}-{'cuda-' if cuda else ''}[0-9a-f]{{16}}(\.tmp)?$")
    dirs = [d for d in (E.cache_dir() / "engine").iterdir() if d.is_dir() and flavour.match(d.name)]
    done = sorted((d for d in dirs if not d.name.endswith(".tmp")), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in [d for d in dirs if d.name.endswith(".tmp")] + done[KEEP_BUILDS:]:
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)


def build(variant: str, cuda: bool, jobs: int, force: bool, source: Path | None = None,
          extra_flags: list[str] | None = None) -> Path:
    key = E.engine_key(variant, cuda, ROOT)
    out = E.cache_dir() / "engine" / key
    if not force and (out / E.ENGINE_MANIFEST).is_file() and (out / "lib" / "libllama.so").is_file():
        say(f"{variant} engine up to date: {out / 'lib'}")
        return out / "lib"
    t0 = time.time()
    src = prepare_source(variant, cuda, source or fetch_sdist())
    build_dir = E.cache_dir() / "engine" / f"build-{variant}{'-cuda' if cuda else ''}"
    flags = E.cmake_flags(variant, cuda) + (extra_flags or [])
    log = build_dir.with_suffix(".log")
    say(f"building {variant} engine ({' '.join(flags)}, {jobs} jobs); log: {log}")
    run_build(src, build_dir, flags, jobs, log)
    tmp_out = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    libs = install_libs(build_dir, tmp_out / "lib")
    if f"-DCMAKE_LIBRARY_PATH={cuda_links_dir()}" in (extra_flags or []):
        # a wheel's cuBLAS: its libraries next to the engine's, found through $ORIGIN
        for so in sorted(cuda_links_dir().glob("libcublas*.so.*")):
            (tmp_out / "lib" / so.name).symlink_to(so.resolve())
    check_libs(tmp_out / "lib", variant)
    manifest = {
        "key": key,
        "variant": variant,
        "cuda": cuda,
        "upstream": f"{E.UPSTREAM_NAME}=={E.UPSTREAM_VERSION}",
        "upstream_sha256": E.UPSTREAM_SDIST_SHA256,
        "llama_cpp_commit": E.LLAMA_CPP_COMMIT,
        "cmake_flags": flags,
        "patches": [{"name": p.name, "sha256": sha256_file(p)} for p in E.patch_series(ROOT)]
        if variant == "patched" else [],
        "libraries": libs,
        "build_seconds": round(time.time() - t0, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.platform(),
    }
    (tmp_out / E.ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_out, out)
    prune_old_engines(variant, cuda, out)
    say(f"{variant} engine built in {manifest['build_seconds']} s: {out / 'lib'}")
    return out / "lib"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stock", action="store_true", help="build the unpatched reference engine")
    ap.add_argument("--cuda", action="store_true", help="build with -DGGML_CUDA=ON")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    ap.add_argument("--force", action="store_true", help="rebuild even if the engine is up to date")
    ap.add_argument("--sdist-path", action="store_true", help="fetch/verify the upstream sdist and print its path")
    ap.add_argument("--export-source", metavar="OUT.tar.gz", help="write llama.cpp pruned to what the builds read "
                    "(+ OUT.tar.gz.sha256), for a machine without network access")
    ap.add_argument("--source-tar", metavar="PATH", help="build from an --export-source tree instead of the sdist")
    ap.add_argument("--export-series", metavar="OUT", help="write the whole engine change (new files + patches) "
                    "as one unified diff against upstream llama.cpp, for a reviewer")
    ap.add_argument("--vendor-python", metavar="DIR", help="extract llama-cpp-python's Python package "
                    "(llama_cpp/) from the verified sdist into DIR")
    ap.add_argument("--prepare-package", metavar="DIR", help="patched llama.cpp tree, vendored llama_cpp and "
                    "engine.json into DIR (called by CMakeLists.txt when pip builds the package)")
    ap.add_argument("--cmake-flag", action="append", default=[], metavar="-DNAME=VALUE",
                    help="with --prepare-package: a flag the package build uses, recorded in engine.json")
    a = ap.parse_args()
    if a.vendor_python:
        print(vendor_python(fetch_sdist(), Path(a.vendor_python)))
        return
    if a.prepare_package:
        prepare_package(Path(a.prepare_package), a.cuda, a.cmake_flag)
        return
    if a.jobs < 1:
        die(f"--jobs {a.jobs} is not valid: expected a positive integer")
    for tool in ("cmake", "cc", "c++"):
        if shutil.which(tool) is None:
            die(f"'{tool}' not found on PATH: run scripts/setup.sh (it installs the build tools)")
    if a.sdist_path:
        print(fetch_sdist())
        return
    if a.export_series:
        export_series(Path(a.export_series))
        return
    if a.export_source:
        export_source(Path(a.export_source))
        return
    extra = check_cuda_toolkit() if a.cuda else []
    source = check_source_tar(Path(a.source_tar)) if a.source_tar else None
    build("stock" if a.stock else "patched", a.cuda, a.jobs, a.force, source, extra)


def check_cuda_toolkit() -> list[str]:
    """The CUDA flavour needs nvcc (CUDA toolkit); say so plainly where there is none. Returns the
    CMake flags this toolkit needs beyond the usual ones."""
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or next(
        (str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/nvcc"))), None)
    if not nvcc or not Path(nvcc).is_file():
        die("--cuda needs the CUDA toolkit (nvcc), and none was found (PATH, CUDACXX, /usr/local/cuda*/bin). "
            "Install the CUDA toolkit for your driver, or build the CPU engine (without --cuda).")
    os.environ["CUDACXX"] = nvcc
    # ggml-cuda links cuBLAS: its header must be in the toolkit the compiler belongs to
    home = Path(nvcc).resolve().parent.parent
    homes = [home, *sorted(Path("/usr/local").glob("cuda*"))]
    incs = [d for h in homes for d in (h / "include", *h.glob("targets/*/include"))]
    if os.environ.get("CUDA_HOME"):
        incs.append(Path(os.environ["CUDA_HOME"]) / "include")
    extra = []
    if not any((d / "cublas_v2.h").is_file() for d in incs) and (wheel := pip_cublas()):
        # cuBLAS from the nvidia-cublas wheel (as PyTorch installs it): its headers, and links under
        # the names the linker and FindCUDAToolkit look for
        inc, links = wheel[0], cuda_links(wheel[1], homes)
        say(f"CUDA flavour: cuBLAS from {wheel[1].parent} (links in {links})")
        extra = [f"-DCMAKE_CUDA_FLAGS=-I{inc}", f"-DCMAKE_LIBRARY_PATH={links}",
                 f"-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,{links}"]
        incs.append(inc)
    if not any((d / "cublas_v2.h").is_file() for d in incs):
        die(f"--cuda: found nvcc ({nvcc}) but not cuBLAS (cublas_v2.h in {', '.join(map(str, incs))}); "
            "ggml's CUDA backend links it: install the toolkit's cuBLAS development files (e.g. the "
            "libcublas-dev package of your CUDA version) or build the CPU engine (without --cuda).")
    try:
        archs = E.cuda_archs()
    except ValueError as e:
        die(str(e))
    say(f"CUDA flavour: nvcc {nvcc}, architectures {archs} ({E.CUDA_ARCHS_ENV} overrides)")
    return extra


def pip_cublas() -> tuple[Path, Path] | None:
    """(include dir, lib dir) of cuBLAS installed as a Python wheel (nvidia-cublas) on this
    interpreter's path, or None."""
    for base in map(Path, sys.path):
        for sub in ("nvidia/cu13", "nvidia/cu12", "nvidia/cublas"):
            d = base / sub
            if (d / "include" / "cublas_v2.h").is_file() and any((d / "lib").glob("libcublas.so.*")):
                return d / "include", d / "lib"
    return None


def cuda_links_dir() -> Path:
    return E.cache_dir() / "engine" / "cuda-links"


def cuda_links(lib: Path, homes: list[Path]) -> Path:
    """A folder of symbolic links for a wheel's cuBLAS (libcublas*.so and the versioned names, the
    engine gets links to the latter next to its libraries) and libcuda.so for the driver API when
    no toolkit in `homes` has a stub of it: what the linker and FindCUDAToolkit look for."""
    links = cuda_links_dir()
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir(parents=True, exist_ok=True)

    def link(name: str, target: Path) -> None:
        if not (links / name).exists():
            (links / name).symlink_to(target)

    for so in sorted(lib.glob("libcublas*.so.*")):
        link(so.name, so)
        link(so.name.split(".so")[0] + ".so", so)
    stubs = [h / d / "libcuda.so" for h in homes for d in ("lib64", "lib64/stubs", "lib/stubs")]
    stubs += [p for h in homes for p in h.glob("targets/*/lib/stubs/libcuda.so")]
    if not any(p.is_file() for p in stubs):
        ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
        except OSError:
            out = ""
        found = [ln.split("=>")[-1].strip() for ln in out.splitlines() if ln.strip().startswith("libcuda.so.1 ")]
        found += ["/usr/local/nvidia/lib64/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"]
        driver = next((Path(p) for p in found if Path(p).is_file()), None)
        if driver is None:
            die("--cuda: no NVIDIA driver library (libcuda.so.1) and no libcuda.so stub in the CUDA toolkit "
                f"({', '.join(map(str, homes))}): ggml's CUDA backend links the driver API; install the driver, "
                "or a toolkit with its stubs (lib64/stubs/libcuda.so)")
        link("libcuda.so", driver)
    return links


if __name__ == "__main__":
    main()
