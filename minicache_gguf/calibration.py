"""Calibrated alignment: per-pair orthogonal rotations, quality-budgeted selection, GGUF files.

On small modern models adjacent layers hold nearly orthogonal K/V rows (FINDINGS §1), so the
paper's merge is very lossy there. For each adjacent pair (l, l+1) and kind (K, V) we fit the
orthogonal R that best maps unit rows of layer l onto unit rows of layer l+1 (orthogonal
Procrustes: R = U Vt from SVD(unit(X_l)^T unit(X_l+1))), on real K/V captured from the model
on calibration text. The engine merges unit(x_l R) with unit(x_l+1) and restores x_l as
norm * dir * R^T. Forms: "full" (one n_embd x n_embd R) or "head" (one R per KV head, block
diagonal: folds into attention per head at no extra cost).

Selection: every candidate (pair, kind) is scored alone by its KLD against the full cache on
held-out calibration tokens (the merge is simulated on llama.cpp's real KV state, which the
engine reproduces exactly; tests/test_calibration.py checks that), then candidates are added
cheapest first while the measured KLD of the whole selection stays within the budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import kvstate, reference
from ._engine import cache_dir, sha256_file
from .config import ALIGNMENT_FORMS, DEFAULT_MAX_KLD
from .engine import PairSpec

FORMAT_VERSION = 1
GGUF_ARCH = "minicache-calibration"
FORMS = ALIGNMENT_FORMS
DEFAULT_FORM = "head"
# DEFAULT_MAX_KLD: mean KLD (nats/token) of the whole selection on held-out calibration tokens
# (window on). The product target is <= 0.03 at 4k context; the calibration context is shorter,
# so the budget leaves a margin.
DEFAULT_FIT_TOKENS = 2048
DEFAULT_CONTEXT = 1024
DEFAULT_SCORED = 128

__all__ = ["Calibration", "CalibrationError", "ModelInfo", "fit_rotation", "full_matrix", "simulate_merge",
           "KldScorer", "calibrate", "load_calibration", "auto_calibration_path", "model_sha256"]


class CalibrationError(ValueError):
    """A calibration file that cannot be used: damaged, forged, or made for another model."""


# --------------------------------------------------------------------------------------------
# the model a calibration belongs to
# --------------------------------------------------------------------------------------------

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
        """From the model file's GGUF metadata (no weights are read) and its sha256."""
        import gguf

        try:
            r = gguf.GGUFReader(str(model_path))
        except Exception as e:
            raise CalibrationError(f"{model_path}: not a readable GGUF model ({type(e).__name__}: {e})") from None

        def get(key, default=None):
            f = r.fields.get(key)
            if f is None:
                if default is None:
                    raise CalibrationError(f"{model_path}: the model has no {key!r}: this architecture is not supported")
                return default
            return f.contents()

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


# --------------------------------------------------------------------------------------------
# math
# --------------------------------------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _procrustes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Orthogonal R minimising ||a R - b|| (rows of a, b unit)."""
    u, _, vt = np.linalg.svd(a.T @ b)
    return u @ vt


def fit_rotation(x0: np.ndarray, x1: np.ndarray, form: str, n_head_kv: int) -> np.ndarray:
    """R for merging layer rows x0 [n, d] into x1 [n, d]: [d, d] ("full") or [n_head_kv, d/h, d/h] ("head")."""
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not valid: expected one of {FORMS}")
    u0, u1 = _unit(x0), _unit(x1)
    if form == "full":
        return _procrustes(u0, u1).astype(np.float32)
    dh = x0.shape[1] // n_head_kv
    out = []
    for h in range(n_head_kv):
        s = slice(h * dh, (h + 1) * dh)
        out.append(_procrustes(_unit(x0[:, s]), _unit(x1[:, s])))
    return np.stack(out).astype(np.float32)


def full_matrix(form: Optional[str], r: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The [d, d] matrix of a rotation (block diagonal for "head"), None for no rotation."""
    if form is None:
        return None
    if form == "full":
        return np.asarray(r, dtype=np.float32)
    h, dh, _ = r.shape
    out = np.zeros((h * dh, h * dh), dtype=np.float32)
    for i in range(h):
        out[i * dh:(i + 1) * dh, i * dh:(i + 1) * dh] = r[i]
    return out


def cosine(x0: np.ndarray, x1: np.ndarray, n_head_kv: int = 1) -> np.ndarray:
    """Cosine similarity per row (n_head_kv=1) or per (row, head): [n] or [n, n_head_kv]."""
    n, d = x0.shape
    a = _unit(x0.reshape(n, n_head_kv, d // n_head_kv))
    b = _unit(x1.reshape(n, n_head_kv, d // n_head_kv))
    c = (a * b).sum(-1)
    return c[:, 0] if n_head_kv == 1 else c


def simulate_merge(st: kvstate.SeqState, pairs: list[PairSpec], t: float, gamma: float, window: int,
                   retention: str = "topk") -> kvstate.SeqState:
    """A copy of a stock KV state in which the cells older than the window of each listed
    (pair, kind) hold what the merged engine restores: dir * norm (* R^T), the most distinct
    gamma fraction kept exact."""
    # the untouched layers are shared with st (calibration simulates ~100 selections per run)
    out = kvstate.SeqState(st.seq_id, st.pos, st.seq_ids, st.v_trans, list(st.k), list(st.v))
    n_m = max(0, st.n_cells - window)
    if n_m == 0:
        return out
    for q in pairs:
        rows = out.k if q.kind == "k" else out.v
        a, b = q.layer, q.layer + 1
        rows[a], rows[b] = rows[a].copy(), rows[b].copy()
        rot = full_matrix(q.form, q.r)
        x0, x1 = rows[a][:n_m], rows[b][:n_m]
        m = reference.merge(x0, x1, t, rot=rot, out_dtype=rows[a].dtype)
        keep = reference.retain_select(m.dist, gamma, retention)
        r0 = reference.restore(m.dir, m.norm0, rot=rot, out_dtype=rows[a].dtype)
        r1 = reference.restore(m.dir, m.norm1, out_dtype=rows[b].dtype)
        r0[keep], r1[keep] = x0[keep], x1[keep]
        rows[a][:n_m], rows[b][:n_m] = r0, r1
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kld_per_token(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) per token, nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def eval_logits(llm, tokens: list[int]) -> np.ndarray:
    """Evaluate tokens after llm.n_tokens (as Llama.eval) and return the logits of every one of them
    [n, n_vocab], without logits_all (which makes llama.cpp compute logits for the whole prompt
    and llama-cpp-python allocate n_ctx x n_vocab floats)."""
    llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
    n_vocab = llm.n_vocab()
    out = []
    for i in range(0, len(tokens), llm.n_batch):
        batch = list(tokens[i:i + llm.n_batch])
        n_past = llm.n_tokens
        llm._batch.set_batch(batch=batch, n_past=n_past, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.input_ids[n_past:n_past + len(batch)] = batch
        out.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch), n_vocab)).copy())
        llm.n_tokens += len(batch)
    return np.concatenate(out) if out else np.zeros((0, n_vocab), dtype=np.float32)


class KldScorer:
    """Scores KV-state edits: a stock context holds `context` tokens; `kld(state)` loads an
    edited state and returns the KLD of the next `scored` tokens against the unedited cache."""

    def __init__(self, llm, context: list[int], scored: list[int]):
        from .llama import llama_cpp

        self._lc = llama_cpp
        self.llm = llm
        self.context = list(context)
        self.scored = list(scored)
        llm.reset()
        llm.eval(self.context)
        self.blob = kvstate.get_seq_state(llama_cpp, llm._ctx.ctx)
        self.state = kvstate.parse_seq_state(self.blob)
        self.ref = self._score()

    def _score(self) -> np.ndarray:
        self.llm.n_tokens = len(self.context)
        return eval_logits(self.llm, self.scored)

    def logits(self, state: kvstate.SeqState) -> np.ndarray:
        kvstate.set_seq_state(self._lc, self.llm._ctx.ctx, kvstate.serialize_seq_state(state))
        return self._score()

    def kld(self, state: kvstate.SeqState) -> float:
        return float(kld_per_token(self.ref, self.logits(state)).mean())


# --------------------------------------------------------------------------------------------
# the calibration file
# --------------------------------------------------------------------------------------------

@dataclass
class Calibration:
    model: ModelInfo
    form: str
    pairs: list[PairSpec]                 # the selection, with rotations
    n_tokens: int                         # calibration tokens the rotations were fitted on
    settings: dict = field(default_factory=dict)   # t, gamma, window, max_kld, context, scored, corpus
    cost: dict = field(default_factory=dict)       # "k"/"v" -> [n_layer - 1] KLD of each pair alone (nan: not scored)
    selection_kld: float = float("nan")            # measured KLD of the whole selection
    tool_version: str = ""

    def describe(self) -> str:
        ks = [q.layer for q in self.pairs if q.kind == "k"]
        vs = [q.layer for q in self.pairs if q.kind == "v"]
        fmt = lambda ls: ", ".join(f"{l}-{l + 1}" for l in ls) or "none"
        return (f"{self.form} alignment, {len(ks)} K pairs ({fmt(ks)}), {len(vs)} V pairs ({fmt(vs)}); "
                f"KLD {self.selection_kld:.4f} on held-out calibration tokens ("
                + (f"budget {self.settings.get('max_kld')})" if self.settings.get("layout") is None
                   else f"fixed layout from layer {self.settings['layout']})"))

    def save(self, path) -> Path:
        import gguf

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        w = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        m = self.model
        w.add_uint32("minicache.format_version", FORMAT_VERSION)
        w.add_string("minicache.tool_version", self.tool_version)
        w.add_string("minicache.model.sha256", m.sha256)
        w.add_string("minicache.model.architecture", m.arch)
        w.add_string("minicache.model.name", m.name)
        w.add_uint32("minicache.model.n_layer", m.n_layer)
        w.add_uint32("minicache.model.n_head_kv", m.n_head_kv)
        w.add_uint32("minicache.model.n_embd_k", m.n_embd_k)
        w.add_uint32("minicache.model.n_embd_v", m.n_embd_v)
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
        digest = hashlib.sha256()
        for q in self.pairs:
            r = np.ascontiguousarray(q.r, dtype=np.float32)
            digest.update(f"{q.kind}{q.layer}".encode())
            digest.update(r.tobytes())
            w.add_tensor(f"rot.{q.kind}.{q.layer}", r)
        w.add_string("minicache.rotations.sha256", digest.hexdigest())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
        return path


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
                "(`minicache-gguf calibrate MODEL -o FILE`) or use calibration='auto'")
        mine = (model.arch, model.n_layer, model.n_head_kv, model.n_embd_k, model.n_embd_v)
        theirs = (info.arch, info.n_layer, info.n_head_kv, info.n_embd_k, info.n_embd_v)
        if mine != theirs:
            raise CalibrationError(f"{path}: its shape (arch, layers, KV heads, K width, V width) {theirs} "
                                   f"does not match the model's {mine}")
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
        if not np.isfinite(q.r).all():
            raise CalibrationError(f"{path}: rotation of {q.kind.upper()} pair ({q.layer}, {q.layer + 1}) holds "
                                   "non-finite values (NaN or Inf)")
        blocks = q.r[None] if form == "full" else q.r
        err = max(float(np.abs(b @ b.T - np.eye(b.shape[0])).max()) for b in blocks)
        if not np.isfinite(err) or err > 1e-3:
            raise CalibrationError(f"{path}: rotation of {q.kind.upper()} pair ({q.layer}, {q.layer + 1}) is not "
                                   f"orthogonal (max |R R^T - I| = {err:.3g})")
    cost = {}
    for kind in "kv":
        f = reader.fields.get(f"minicache.cost.{kind}")
        if f is not None:
            cost[kind] = np.array(f.contents(), dtype=np.float64)
    return Calibration(model=info, form=form, pairs=pairs,
                       n_tokens=int(_field(reader, "minicache.calibration.n_tokens", path)),
                       settings=json.loads(_field(reader, "minicache.calibration.settings", path)),
                       cost=cost, selection_kld=float(_field(reader, "minicache.selection.kld", path)),
                       tool_version=_field(reader, "minicache.tool_version", path))


# --------------------------------------------------------------------------------------------
# calibrating
# --------------------------------------------------------------------------------------------

def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def capture_kv(llm, tokens: list[int]) -> kvstate.SeqState:
    """Real K/V rows of a stock context after evaluating tokens (post-RoPE K)."""
    from .llama import llama_cpp

    llm.reset()
    llm.eval(tokens)
    return kvstate.parse_seq_state(kvstate.get_seq_state(llama_cpp, llm._ctx.ctx))


def fit_all(st: kvstate.SeqState, form: str, n_head_kv: int) -> dict:
    """(kind, layer) -> R for every adjacent pair."""
    out = {}
    for kind, rows in (("k", st.k), ("v", st.v)):
        for a in range(len(rows) - 1):
            out[kind, a] = fit_rotation(rows[a], rows[a + 1], form, n_head_kv)
    return out


def _overlaps(c, chosen) -> bool:
    return any(k == c[0] and abs(a - c[1]) <= 1 for k, a in chosen)


def calibrate(model_path, *, form: str = DEFAULT_FORM, max_kld: float = DEFAULT_MAX_KLD, t: float = 0.6,
              gamma: float = 0.05, window: int = 256, fit_tokens: int = DEFAULT_FIT_TOKENS,
              context: int = DEFAULT_CONTEXT, scored: int = DEFAULT_SCORED, text: Optional[str] = None,
              layout: Optional[int] = None, kinds: str = "kv", progress: bool = True, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Calibration:
    """Fit rotations on calibration text, score each candidate, select under the KLD budget.

    layout=S instead selects the paper's fixed layout (S, S+1), (S+2, S+3), ... for `kinds`
    (no budget; the selection's KLD is still measured)."""
    from . import __version__, corpus
    from .llama import Llama

    if form not in FORMS:
        raise ValueError(f"form={form!r} is not valid: expected one of {FORMS}")
    if kinds not in ("k", "v", "kv"):
        raise ValueError(f"kinds={kinds!r} is not valid: expected 'k', 'v' or 'kv'")
    if not (max_kld > 0 and np.isfinite(max_kld)):
        raise ValueError(f"max_kld={max_kld!r} is not valid: expected a positive number (nats/token)")
    for name, v, lo in (("fit_tokens", fit_tokens, 64), ("context", context, 64), ("scored", scored, 8)):
        if not (isinstance(v, int) and v >= lo):
            raise ValueError(f"{name}={v!r} is not valid: expected an integer >= {lo}")
    t0 = time.perf_counter()
    n_ctx = max(fit_tokens, context + scored)
    llm = Llama(model_path, n_ctx=n_ctx, n_batch=512, flash_attn=True, verbose=False)
    try:
        info = ModelInfo.of(model_path)
        source = "built-in calibration text (pydoc_data, calibration split)" if text is None else "user text"
        toks = corpus.tokens_for(llm, corpus.builtin_text("calibration") if text is None else text,
                                 fit_tokens + context + scored, "calibration")
        fit, held = toks[:fit_tokens], toks[fit_tokens:fit_tokens + context + scored]
        log(f"calibrate: {info.name} ({info.arch}, {info.n_layer} layers); fitting {form} rotations on "
            f"{fit_tokens} tokens, scoring on {context}+{scored} held-out tokens")
        st = capture_kv(llm, fit)
        rots = fit_all(st, form, info.n_head_kv)
        scorer = KldScorer(llm, held[:context], held[context:])
        spec = lambda c: PairSpec(c[0], c[1], form, rots[c])
        sim = lambda sel: scorer.kld(simulate_merge(scorer.state, [spec(c) for c in sel], t, gamma, window))
        if layout is not None:
            if not (isinstance(layout, int) and 0 <= layout <= info.n_layer - 2):
                raise ValueError(f"layout={layout!r} is not valid for {info.n_layer} layers: expected 0..{info.n_layer - 2}")
            chosen = [(k, a) for a in range(layout, info.n_layer - 1, 2) for k in kinds]
            cur = sim(chosen)
            cost = {(k, a): float("nan") for k in "kv" for a in range(info.n_layer - 1)}
            cands = []
        else:
            cands = [(k, a) for k in kinds for a in range(info.n_layer - 1)]
            cost = {(k, a): float("nan") for k in "kv" for a in range(info.n_layer - 1)}
        bar = _progress(len(cands), "score pairs", progress)
        for c in cands:
            cost[c] = sim([c])
            if bar:
                bar.update()
        if bar:
            bar.close()
        order = sorted(cands, key=lambda c: (cost[c], c))
        if layout is None:
            chosen, cur = [], 0.0
        misses = 0
        bar = _progress(len(order), "select", progress)
        for c in order:
            if bar:
                bar.update()
            if _overlaps(c, chosen):
                continue
            if cost[c] > max_kld or misses >= 4:
                break
            k = sim(chosen + [c])
            if k <= max_kld:
                chosen.append(c)
                cur, misses = k, 0
            else:
                misses += 1
        if bar:
            bar.close()
    finally:
        llm.close()
    chosen.sort(key=lambda c: (c[0], c[1]))
    costs = {k: np.array([cost[k, a] for a in range(info.n_layer - 1)]) for k in "kv"}
    cal = Calibration(model=info, form=form, pairs=[spec(c) for c in chosen], n_tokens=fit_tokens,
                      settings={"t": t, "gamma": gamma, "window": window, "max_kld": None if layout is not None else max_kld,
                                "layout": layout, "kinds": kinds, "context": context, "scored": scored, "corpus": source},
                      cost=costs, selection_kld=cur if chosen else 0.0, tool_version=__version__)
    log(f"calibrate: {cal.describe()} [{time.perf_counter() - t0:.0f} s]")
    return cal


def auto_calibration_path(sha256: str, form: str, t: float, gamma: float, window: int, max_kld: float) -> Path:
    tag = f"{form}-t{t:g}-g{gamma:g}-w{window}-kld{max_kld:g}"
    return cache_dir() / "calibration" / f"{sha256[:16]}-{tag}.gguf"


def pairs_for(cfg, model_path, progress: bool = True) -> tuple[list[PairSpec], Calibration]:
    """The merged (pair, kind) list of a MergeConfig with calibration=PATH | "auto" for a model:
    the calibration's selection, filtered by merge_k / merge_v / start_layer."""
    from .config import ConfigError

    model = ModelInfo.of(model_path)
    if cfg.calibration == "auto":
        path = auto_calibration_path(model.sha256, cfg.alignment, cfg.t, cfg.gamma, cfg.window, cfg.max_kld)
        cal = None
        if path.is_file():
            try:
                cal = load_calibration(path, model)
            except CalibrationError as e:
                print(f"minicache-gguf: cached calibration unusable ({e}); calibrating again", file=sys.stderr)
        if cal is None:
            print(f"minicache-gguf: calibrating {model.name} once ({cfg.alignment} alignment, KLD budget "
                  f"{cfg.max_kld}); cached in {path}", file=sys.stderr)
            cal = calibrate(model_path, form=cfg.alignment, max_kld=cfg.max_kld, t=cfg.t, gamma=cfg.gamma,
                            window=cfg.window, progress=progress)
            cal.save(path)
    else:
        cal = load_calibration(cfg.calibration, model)
    start = cfg.start_layer or 0
    pairs = [q for q in cal.pairs
             if (cfg.merge_k if q.kind == "k" else cfg.merge_v) and q.layer >= start]
    if not pairs:
        raise ConfigError(f"calibration {cfg.calibration!r}: no merged pair is left ({cal.describe()}; "
                          f"merge_k={cfg.merge_k}, merge_v={cfg.merge_v}, start_layer={cfg.start_layer}): nothing to merge")
    return pairs, cal
