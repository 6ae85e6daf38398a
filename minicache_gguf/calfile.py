"""The calibration file: a GGUF file (architecture "minicache-calibration") holding per-pair
rotations, the selected (pair, K/V) list, every candidate's measured cost, the settings it was
made with and the identity of its model — and where calibration="auto" finds one: shipped with
the package (minicache_gguf/calibrations/), or cached after a first calibration.

Loading verifies everything a file claims (model sha256 and shape, rotations' sha256, shapes,
orthogonality, finiteness, ranges, overlaps): a damaged or forged file is a CalibrationError
naming the problem, never a crash or a silently different merge.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ._engine import cache_dir
from .config import ALIGNMENT_FORMS, CalibrationError, ConfigError, MergeConfig, PairSpec
from .model import ModelInfo

FORMAT_VERSION = 1
GGUF_ARCH = "minicache-calibration"
FORMS = ALIGNMENT_FORMS
#: calibrations shipped with the package (found by calibration="auto" before calibrating)
SHIPPED_DIR = Path(__file__).resolve().parent / "calibrations"

__all__ = ["Calibration", "CalibrationError", "load_calibration", "auto_name", "auto_path", "find_auto", "find_base",
           "type_tag", "rotations_name", "save_rotations", "load_rotations", "find_rotations",
           "FORMAT_VERSION", "GGUF_ARCH", "SHIPPED_DIR"]


@dataclass
class Calibration:
    model: ModelInfo
    form: str
    pairs: list[PairSpec]                 # the selection, with rotations
    n_tokens: int                         # calibration tokens the rotations were fitted on
    settings: dict = field(default_factory=dict)   # t, gamma, window, max_kld, n_ctx, scored, texts, ...
    cost: dict = field(default_factory=dict)       # "k"/"v" -> [n_layer - 1] KLD of each pair alone (nan: not scored)
    selection_kld: float = float("nan")            # measured KLD of the whole selection
    tool_version: str = ""
    path: Optional[Path] = None                    # the file it was loaded from or saved to

    def describe(self) -> str:
        ks = [q.layer for q in self.pairs if q.kind == "k"]
        vs = [q.layer for q in self.pairs if q.kind == "v"]
        fmt = lambda ls: ", ".join(f"{l}-{l + 1}" for l in ls) or "none"
        return (f"{self.form} alignment, {len(ks)} K pairs ({fmt(ks)}), {len(vs)} V pairs ({fmt(vs)}); "
                f"KLD {self.selection_kld:.4f} on held-out calibration tokens"
                + (f" (worst of {', '.join(self.settings['selection_kld_by_text'])})"
                   if self.settings.get("selection_kld_by_text") else "")
                + (f" at context {self.settings['n_ctx']} (" if "n_ctx" in self.settings else " (")
                + (f"budget {self.settings.get('max_kld')})" if self.settings.get("layout") is None
                   else f"fixed layout from layer {self.settings['layout']})"))

    def types(self) -> tuple:
        """The (K, V) cache types the selection was scored on."""
        return self.settings.get("type_k", "f16"), self.settings.get("type_v", "f16")

    def selection(self, cfg: MergeConfig) -> list[PairSpec]:
        """The pairs a MergeConfig merges from this calibration: filtered by merge_k / merge_v /
        start_layer; a ConfigError when nothing is left."""
        start = cfg.start_layer or 0
        pairs = [q for q in self.pairs if (cfg.merge_k if q.kind == "k" else cfg.merge_v) and q.layer >= start]
        if not pairs:
            raise ConfigError(f"calibration {str(cfg.calibration)!r}: no merged pair is left ({self.describe()}; "
                              f"merge_k={cfg.merge_k}, merge_v={cfg.merge_v}, start_layer={cfg.start_layer}): nothing to merge")
        return pairs

    def save(self, path) -> Path:
        import gguf

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        w = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        m = self.model
        w.add_uint32("minicache.format_version", FORMAT_VERSION)
        w.add_string("minicache.tool_version", self.tool_version)
        _write_model(w, m)
        w.add_string("minicache.form", self.form)
        w.add_uint32("minicache.calibration.n_tokens", self.n_tokens)
        w.add_string("minicache.calibration.settings", json.dumps(self.settings, sort_keys=True))
        w.add_float32("minicache.selection.kld", float(self.selection_kld))
        w.add_array("minicache.selection.k", [q.layer for q in self.pairs if q.kind == "k"] or [-1])
        w.add_array("minicache.selection.v", [q.layer for q in self.pairs if q.kind == "v"] or [-1])
        for kind in "kv":
            c = self.cost.get(kind)
            if c is not None:
                w.add_array(f"minicache.cost.{kind}", [float(x) for x in c])
        _write_rotations(w, [((q.kind, q.layer), q.r) for q in self.pairs], tmp, path)
        self.path = path
        return path


def _write_model(w, m: ModelInfo) -> None:
    w.add_string("minicache.model.sha256", m.sha256)
    w.add_string("minicache.model.architecture", m.arch)
    w.add_string("minicache.model.name", m.name)
    w.add_uint32("minicache.model.n_layer", m.n_layer)
    w.add_uint32("minicache.model.n_head_kv", m.n_head_kv)
    w.add_uint32("minicache.model.n_embd_k", m.n_embd_k)
    w.add_uint32("minicache.model.n_embd_v", m.n_embd_v)


def _read_model(reader, path, model: Optional[ModelInfo]) -> ModelInfo:
    """The model identity a file records; with `model`, refuse a file made for another model."""
    info = ModelInfo(
        sha256=_field(reader, "minicache.model.sha256", path), arch=_field(reader, "minicache.model.architecture", path),
        name=_field(reader, "minicache.model.name", path), n_layer=int(_field(reader, "minicache.model.n_layer", path)),
        n_head_kv=int(_field(reader, "minicache.model.n_head_kv", path)),
        n_embd_k=int(_field(reader, "minicache.model.n_embd_k", path)), n_embd_v=int(_field(reader, "minicache.model.n_embd_v", path)))
    if model is not None:
        if info.sha256 != model.sha256:
            raise CalibrationError(
                f"{path} was made for another model ({info.name!r}, {info.arch}, sha256 {info.sha256[:12]}…); "
                f"this model is {model.name!r} ({model.arch}, sha256 {model.sha256[:12]}…): calibrate this model "
                "(`minicache-gguf calibrate MODEL`) or use calibration='auto'")
        mine = (model.arch, model.n_layer, model.n_head_kv, model.n_embd_k, model.n_embd_v)
        theirs = (info.arch, info.n_layer, info.n_head_kv, info.n_embd_k, info.n_embd_v)
        if mine != theirs:
            raise CalibrationError(f"{path}: its shape (arch, layers, KV heads, K width, V width) {theirs} "
                                   f"does not match the model's {mine}")
    return info


def _rot_shape(info: ModelInfo, kind: str, form: str) -> tuple:
    d = info.width(kind)
    return (d, d) if form == "full" else (info.n_head_kv, d // info.n_head_kv, d // info.n_head_kv)


def _check_rotation(r: np.ndarray, form: str, kind: str, layer: int, path) -> None:
    if not np.isfinite(r).all():
        raise CalibrationError(f"{path}: rotation of {kind.upper()} pair ({layer}, {layer + 1}) holds "
                               "non-finite values (NaN or Inf)")
    blocks = r[None] if form == "full" else r
    err = max(float(np.abs(b @ b.T - np.eye(b.shape[0])).max()) for b in blocks)
    if not np.isfinite(err) or err > 1e-3:
        raise CalibrationError(f"{path}: rotation of {kind.upper()} pair ({layer}, {layer + 1}) is not "
                               f"orthogonal (max |R R^T - I| = {err:.3g})")


def _field(reader, key: str, path):
    f = reader.fields.get(key)
    if f is None:
        raise CalibrationError(f"{path}: not a MiniCache calibration file (no {key!r}); "
                               "make one with `minicache-gguf calibrate MODEL -o FILE`")
    return f.contents()


def load_calibration(path, model: Optional[ModelInfo] = None) -> Calibration:
    """Read and verify a calibration file; with `model`, refuse one made for another model."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf reader raises ValueError/IndexError/struct errors on damaged files
        raise CalibrationError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                               "it is damaged or truncated — calibrate again") from None
    try:
        return _read_calibration(reader, path, model)
    except CalibrationError:
        raise
    except Exception as e:  # a field of the wrong type or shape, a non-JSON settings string, ...
        raise CalibrationError(f"{path}: damaged calibration file ({type(e).__name__}: {e}) — calibrate again") from None


def _read_calibration(reader, path: Path, model: Optional[ModelInfo]) -> Calibration:
    arch = _field(reader, "general.architecture", path)
    if arch != GGUF_ARCH:
        raise CalibrationError(f"{path}: a GGUF file of architecture {arch!r}, not a MiniCache calibration "
                               f"({GGUF_ARCH!r}): pass a file written by `minicache-gguf calibrate`")
    ver = _field(reader, "minicache.format_version", path)
    if ver != FORMAT_VERSION:
        raise CalibrationError(f"{path}: calibration format version {ver}; this minicache-gguf reads version "
                               f"{FORMAT_VERSION}: calibrate again")
    info = _read_model(reader, path, model)
    form = _field(reader, "minicache.form", path)
    if form not in FORMS:
        raise CalibrationError(f"{path}: form {form!r} is not valid: expected one of {FORMS}")
    tensors = {t.name: t for t in reader.tensors}
    pairs, digest = [], hashlib.sha256()
    for kind in "kv":
        d = info.width(kind)
        dh = d // info.n_head_kv
        want_shape = (d, d) if form == "full" else (info.n_head_kv, dh, dh)
        for layer in [int(x) for x in _field(reader, f"minicache.selection.{kind}", path) if int(x) >= 0]:
            if not 0 <= layer < info.n_layer - 1:
                raise CalibrationError(f"{path}: {kind.upper()} pair ({layer}, {layer + 1}) is out of range for "
                                       f"{info.n_layer} layers")
            t = tensors.get(f"rot.{kind}.{layer}")
            if t is None:
                raise CalibrationError(f"{path}: the rotation of {kind.upper()} pair ({layer}, {layer + 1}) is missing")
            r = np.array(t.data, dtype=np.float32).reshape(want_shape) if t.data.size == np.prod(want_shape) else None
            if r is None:
                raise CalibrationError(f"{path}: rotation rot.{kind}.{layer} has {t.data.size} values, expected "
                                       f"{int(np.prod(want_shape))} ({form} form, shape {want_shape})")
            digest.update(f"{kind}{layer}".encode())
            digest.update(r.tobytes())
            other = next((q for q in pairs if q.kind == kind and abs(q.layer - layer) <= 1), None)
            if other is not None:
                raise CalibrationError(f"{path}: {kind.upper()} pairs ({other.layer}, {other.layer + 1}) and ({layer}, "
                                       f"{layer + 1}) overlap: each layer is merged at most once per kind")
            pairs.append(PairSpec(kind, layer, form, r))
    if digest.hexdigest() != _field(reader, "minicache.rotations.sha256", path):
        raise CalibrationError(f"{path}: the rotations do not match their recorded sha256: the file is damaged "
                               "or was edited — calibrate again")
    for q in pairs:
        _check_rotation(q.r, form, q.kind, q.layer, path)
    cost = {}
    for kind in "kv":
        f = reader.fields.get(f"minicache.cost.{kind}")
        if f is not None:
            cost[kind] = np.array(f.contents(), dtype=np.float64)
    return Calibration(model=info, form=form, pairs=pairs,
                       n_tokens=int(_field(reader, "minicache.calibration.n_tokens", path)),
                       settings=json.loads(_field(reader, "minicache.calibration.settings", path)),
                       cost=cost, selection_kld=float(_field(reader, "minicache.selection.kld", path)),
                       tool_version=_field(reader, "minicache.tool_version", path), path=path)


def type_tag(type_k: str = "f16", type_v: str = "f16") -> str:
    """The KV cache types in a calibration's name: "" for f16 (the names before types were part of
    them), "-q4_0" for one type, "-kq8_0-vq4_0" for two."""
    if (type_k, type_v) == ("f16", "f16"):
        return ""
    return f"-{type_k}" if type_k == type_v else f"-k{type_k}-v{type_v}"


def auto_name(sha256: str, cfg: MergeConfig, type_k: str = "f16", type_v: str = "f16") -> str:
    """The file name of the "auto" calibration of a model for a MergeConfig and KV cache types: the
    settings that shape a selection (alignment form, t, gamma, window, KLD budget, scoring context,
    cache types) are part of it."""
    tag = f"{cfg.alignment}-t{cfg.t:g}-g{cfg.gamma:g}-w{cfg.window}-kld{cfg.max_kld:g}-c{cfg.calibration_ctx}"
    return f"{sha256[:16]}-{tag}{type_tag(type_k, type_v)}.gguf"


def auto_path(info: ModelInfo, cfg: MergeConfig, type_k: str = "f16", type_v: str = "f16") -> Path:
    """Where calibration="auto" caches the calibration it makes for this model, config and cache types."""
    return cache_dir() / "calibration" / auto_name(info.sha256, cfg, type_k, type_v)


def _dirs() -> list:
    return [SHIPPED_DIR, cache_dir() / "calibration"]


def find_auto(info: ModelInfo, cfg: MergeConfig, type_k: str = "f16", type_v: str = "f16") -> Optional[Path]:
    """An existing "auto" calibration for this model, config and cache types: shipped first, then cached."""
    name = auto_name(info.sha256, cfg, type_k, type_v)
    for d in _dirs():
        if (d / name).is_file():
            return d / name
    return None


def find_base(info: ModelInfo, form: str, type_k: str = "f16", type_v: str = "f16") -> Optional[Calibration]:
    """A loadable calibration of this model and rotation form made for any other settings (shipped
    first, then cached; one for the same cache types first): the selection a re-scoring starts from."""
    cals = []
    for d in _dirs():
        for p in sorted(d.glob(f"{info.sha256[:16]}-{form}-t*.gguf")):
            try:
                cals.append(load_calibration(p, info))
            except CalibrationError:
                continue
    cals.sort(key=lambda c: c.types() != (type_k, type_v))
    return cals[0] if cals else None


# ---------------------------------------------------------------------------------------------
# rotation sets: every adjacent pair's rotation of a model (fitted once, reused by every selection)
# ---------------------------------------------------------------------------------------------

ROTATIONS_ARCH = "minicache-rotations"


def rotations_name(sha256: str, form: str) -> str:
    return f"{sha256[:16]}-rotations-{form}.gguf"


def save_rotations(path, model: ModelInfo, form: str, rots: dict, n_tokens: int) -> Path:
    """Write every (kind, layer) -> R of a model (a GGUF of architecture minicache-rotations)."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), ROTATIONS_ARCH)
    w.add_uint32("minicache.format_version", FORMAT_VERSION)
    _write_model(w, model)
    w.add_string("minicache.form", form)
    w.add_uint32("minicache.calibration.n_tokens", n_tokens)
    _write_rotations(w, sorted(rots.items()), tmp, path)
    return path


def _write_rotations(w, rots, tmp: Path, path: Path) -> None:
    """Write ((kind, layer), R) tensors and their sha256 into a GGUF being written to tmp, finish it
    and move it to path."""
    digest = hashlib.sha256()
    for (kind, layer), r in rots:
        r = np.ascontiguousarray(r, dtype=np.float32)
        digest.update(f"{kind}{layer}".encode())
        digest.update(r.tobytes())
        w.add_tensor(f"rot.{kind}.{layer}", r)
    w.add_string("minicache.rotations.sha256", digest.hexdigest())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)


def find_rotations(info: ModelInfo, form: str) -> Optional[dict]:
    """The model's rotation set of this form (shipped first, then cached), verified; None if there is
    none or it is unusable."""
    for d in _dirs():
        p = d / rotations_name(info.sha256, form)
        if p.is_file():
            try:
                return load_rotations(p, info, form)
            except CalibrationError:
                continue
    return None


def load_rotations(path, model: ModelInfo, form: str) -> dict:
    """(kind, layer) -> R of a rotation set file, verified like a calibration's rotations."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CalibrationError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    try:
        if _field(reader, "general.architecture", path) != ROTATIONS_ARCH:
            raise CalibrationError(f"{path}: not a MiniCache rotation set ({ROTATIONS_ARCH!r})")
        info = _read_model(reader, path, model)
        if _field(reader, "minicache.form", path) != form:
            raise CalibrationError(f"{path}: rotations of another form (expected {form!r})")
        out, digest = {}, hashlib.sha256()
        for t in reader.tensors:
            _, kind, layer = t.name.split(".")
            layer = int(layer)
            r = np.array(t.data, dtype=np.float32).reshape(_rot_shape(info, kind, form))
            digest.update(f"{kind}{layer}".encode())
            digest.update(r.tobytes())
            _check_rotation(r, form, kind, layer, path)
            out[kind, layer] = r
        if digest.hexdigest() != _field(reader, "minicache.rotations.sha256", path):
            raise CalibrationError(f"{path}: the rotations do not match their recorded sha256")
        if set(out) != {(k, a) for k in "kv" for a in range(info.n_layer - 1)}:
            raise CalibrationError(f"{path}: not every adjacent pair has a rotation")
        return out
    except CalibrationError:
        raise
    except Exception as e:
        raise CalibrationError(f"{path}: damaged rotation set ({type(e).__name__}: {e})") from None
