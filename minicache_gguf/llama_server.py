"""`minicache-gguf llama-server`: llama.cpp's own HTTP server (llama-server), built from the patched
tree, with the merge resolved here and handed over as a params file (--kv-merge-params).

The merge follows the policy of every other surface (calibrate.resolve / default_merge): --kv-merge
(or --kv-calibration) asks for the calibrated selection of this model and cache type, refused with
the time a calibration takes when there is none; neither flag: on when one is shipped or cached;
--no-kv-merge: off. Everything else goes to llama-server unchanged, except what the merged cache
needs, added when not given: one unified KV buffer for the slots (--kv-unified) and prompts in
ubatches of the window (-ub, as Llama does). What llama-server would do differently with a merged
cache (shift positions, a draft model's context) is refused here, before it listens.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
from pathlib import Path
from typing import Optional

from . import _engine
from .config import GGML_TYPES, QUANTIZED_TYPES, ConfigError, MergeConfig, cache_type, merged_n_ubatch

__all__ = ["PARAMS_MAGIC", "params_bytes", "write_params", "plan", "main"]

#: the first bytes of a params file (llama_minicache_set_pending_file in include/llama-minicache.h)
PARAMS_MAGIC = b"MCKVPAR1"

#: MergeConfig fields given as --kv-<field> (the names other surfaces use, with llama-server's kv- prefix)
MERGE_FIELDS = ("start_layer", "t", "gamma", "window", "calibration", "alignment")

EPILOG = """examples:
  minicache-gguf llama-server --port 8080 -c 8192 -np 4          default model, its calibrated merge
  minicache-gguf llama-server -m model.gguf --kv-merge --kv-calibration model.cal.gguf -np 2
  minicache-gguf llama-server -ctk q4_0 -ctv q4_0 -np 8 --metrics   merged q4_0 cache, /metrics gauges
  minicache-gguf llama-server --no-kv-merge -np 4                 the same server, stock cache

Every other option is llama-server's (`minicache-gguf llama-server --help-llama-server` lists them).
"""


def params_bytes(cfg: MergeConfig, pairs) -> bytes:
    """The params file of cfg and its (pair, kind) selection (None: the paper's layout)."""
    from .engine import KINDS, ROT_FORMS
    import numpy as np

    head = struct.pack("<8siffiiiii", PARAMS_MAGIC, -1 if cfg.start_layer is None else cfg.start_layer,
                       cfg.t, cfg.gamma, cfg.window, int(cfg.merge_k), int(cfg.merge_v),
                       0 if cfg.retention == "topk" else 1, len(pairs or []))
    body = []
    for q in pairs or []:
        r = b"" if q.form is None else np.ascontiguousarray(q.r, dtype="<f4").tobytes()
        body.append(struct.pack("<iiii", KINDS[q.kind], q.layer, ROT_FORMS[q.form], len(r) // 4) + r)
    return head + b"".join(body)


def write_params(cfg: MergeConfig, pairs) -> Path:
    """The params file in the cache (named by its content: the same merge is one file)."""
    blob = params_bytes(cfg, pairs)
    d = _engine.cache_dir() / "llama-server"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{hashlib.sha256(blob).hexdigest()[:16]}.mckvpar"
    if not path.is_file() or path.read_bytes() != blob:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    return path


def _our_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minicache-gguf llama-server", add_help=False, allow_abbrev=False, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="llama.cpp's llama-server on the patched engine, with MiniCache merging of its KV cache")
    # long options only: llama-server's single-dash flags (-hf, -md, ...) must not read as short ones
    p.add_argument("--help", action="store_true", help="this help (also -h)")
    p.add_argument("--help-llama-server", action="store_true", help="llama-server's own options")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--kv-merge", dest="kv_merge", action="store_true", default=None,
                   help="merge (the calibrated selection of this model and cache type; refused if there is none)")
    g.add_argument("--no-kv-merge", dest="kv_merge", action="store_false", help="stock KV cache")
    for name in MERGE_FIELDS:
        f = MergeConfig.__dataclass_fields__[name]
        typ = {"start_layer": int, "calibration": str}.get(name, type(f.default))
        p.add_argument(f"--kv-{name.replace('_', '-')}", dest=name, type=typ, default=None,
                       help=f.metadata["help"] + ("" if f.default is None else f" (default {f.default})"))
    return p


#: llama-server options the merge depends on: flag -> name (read, then passed on unchanged). Read by
#: exact token, not argparse: llama-server's multi-letter single-dash flags (-md, -mu) are not -m.
_READ = {"-m": "model", "--model": "model", "-ctk": "type_k", "--cache-type-k": "type_k",
         "-ctv": "type_v", "--cache-type-v": "type_v", "-ub": "n_ubatch", "--ubatch-size": "n_ubatch",
         "-c": "n_ctx", "--ctx-size": "n_ctx", "-fa": "flash_attn", "--flash-attn": "flash_attn"}


def _read_server_options(args: list[str]) -> dict:
    out = {}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag in _READ:
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{flag} needs a value")
                value = args[i + 1]
                i += 1
            out[_READ[flag]] = value
        i += 1
    for name in ("n_ubatch", "n_ctx"):
        if name in out:
            try:
                out[name] = int(out[name])
            except ValueError:
                raise ConfigError(f"{name}={out[name]!r} is not valid: expected an integer") from None
    return out


_DRAFT = "a draft model's context is not merged, and speculative decoding was not tested with a merged cache"
_LOCAL = "the model must be a local GGUF file (-m PATH): its calibration is looked up by its content"
#: llama-server options refused with merging on, and why
REFUSED = {
    **dict.fromkeys(("-md", "--model-draft", "-hfd", "-hfrd", "--hf-repo-draft"), _DRAFT),
    **dict.fromkeys(("-hf", "-hfr", "--hf-repo", "-mu", "--model-url"), _LOCAL),
    "--kv-merge-params": "this command writes the params file (--kv-merge / --kv-calibration choose the merge)",
    "--context-shift": "a merged cache cannot shift positions (llama_memory_can_shift is false)",
    **dict.fromkeys(("--embedding", "--embeddings"), "embeddings are not served from a merged cache"),
    **dict.fromkeys(("--models-dir", "--models-preset"), "router mode loads models this command has not resolved a merge for"),
}


def _refusals(args: list[str]) -> list[str]:
    seen = {a.split("=", 1)[0] for a in args if a.startswith("-")}
    return [f"{flag}: {why}" for flag, why in REFUSED.items() if flag in seen]


def plan(argv: list[str]) -> tuple[list[str], str]:
    """(llama-server's argv after the executable, the one line that says what the cache is); a
    ConfigError names what is refused, before anything starts."""
    from .model import default_model_path

    ours, rest = _our_parser().parse_known_args(argv)
    sv = _read_server_options(rest)
    model = sv.get("model") or str(default_model_path())
    if not sv.get("model"):
        rest = ["-m", model] + rest
    if not os.path.isfile(model):
        raise ConfigError(f"-m {model}: no such file (expected a local GGUF model)")
    tk = cache_type(sv["type_k"], "-ctk") if sv.get("type_k") else "f16"
    tv = cache_type(sv["type_v"], "-ctv") if sv.get("type_v") else "f16"
    kw = {n: getattr(ours, n) for n in MERGE_FIELDS if getattr(ours, n) is not None}
    cfg = MergeConfig(**kw)
    types = tk if tk == tv else f"K {tk} / V {tv}"
    if ours.kv_merge is False:
        if kw:
            raise ConfigError(f"--no-kv-merge with {', '.join('--kv-' + k.replace('_', '-') for k in kw)}: choose one")
        return rest, f"{types}, merging off (--no-kv-merge)"
    if ours.kv_merge is None and "calibration" not in kw:
        from .calibrate import default_merge

        on, why = default_merge(model, cfg, tk, tv)
        if not on:
            return rest, f"{types}, {why}"
        cfg = on
    problems = _refusals(rest)
    if any(a in ("-no-kvu", "--no-kv-unified") for a in rest):
        problems.append("--no-kv-unified: the merged cache of several slots lives in one unified KV buffer")
    if sv.get("flash_attn") == "off" and tv in QUANTIZED_TYPES:
        problems.append(f"-fa off with -ctv {tv}: a quantized V cache needs flash attention")
    if problems:
        raise ConfigError("llama-server with merging: " + "; ".join(problems) + " (--no-kv-merge runs it stock)")

    from .calibrate import pairs_for, paper_warning
    from .validate import validate

    validate(cfg, model, {"type_k": GGML_TYPES[tk], "type_v": GGML_TYPES[tv], "flash_attn": sv.get("flash_attn") != "off"})
    pairs, cal = pairs_for(cfg, model, tk, tv, progress=sys.stderr.isatty())
    notes = []
    if cfg.paper:
        notes.append(paper_warning(model, cfg) or "")
        describe = f"MiniCache paper merging on (uncalibrated, asked for by name); cache type {types}"
    else:
        describe = f"MiniCache aligned merging on: {cal.describe()}; cache type {types}"
        if cal.types() != (tk, tv):
            notes.append(f"the selection was scored on {'/'.join(cal.types())}, this cache is {tk}/{tv}: its error "
                         f"differs (`minicache-gguf calibrate MODEL -ctk {tk} -ctv {tv}` scores one for it)")
        scored_at = cal.settings.get("n_ctx")
        if scored_at and sv.get("n_ctx", 0) > scored_at:
            notes.append(f"the selection was scored at context {scored_at}; -c {sv['n_ctx']} merges more tokens per "
                         "sequence, and the merge's KLD grows with them")
    path = write_params(cfg, pairs)
    extra = ["--kv-merge-params", str(path)]
    if not any(a in ("-kvu", "--kv-unified") for a in rest):
        extra.append("--kv-unified")
    if "n_ubatch" not in sv:
        extra += ["-ub", str(merged_n_ubatch(cfg.window))]
    return rest + extra, "; ".join([describe] + [n for n in notes if n])


def executable() -> Path:
    exe = _engine.active_lib_dir() / _engine.LLAMA_SERVER
    if not exe.is_file():
        raise ConfigError(f"{exe} is missing: this engine was built without llama-server; rebuild it with "
                          "scripts/setup.sh (or scripts/build_engine.py)")
    return exe


def main(argv: list[str]) -> int:
    ours, _ = _our_parser().parse_known_args(argv)
    if ours.help or "-h" in argv:
        _our_parser().print_help()
        return 0
    exe = executable()
    if ours.help_llama_server:
        os.execv(str(exe), [str(exe), "--help"])
    args, describe = plan(argv)
    print(f"llama-server: {describe}", file=sys.stderr, flush=True)
    os.execv(str(exe), [str(exe)] + args)
