"""One place that checks a MergeConfig against a model and the Llama options it will run with,
and says everything that is wrong in one ConfigError (the engine re-checks what it must, and its
refusals name the problem too)."""

from __future__ import annotations

from typing import Optional

from .calfile import load_calibration
from .config import GGML_TYPES, QUANTIZED_TYPES, TYPE_BLOCKS, CalibrationError, ConfigError, MergeConfig, type_name
from .model import ModelInfo

__all__ = ["validate", "sliding_window_refusal", "MERGEABLE_TYPES"]

#: the KV cache types merged layers can be stored in (every KV cache type of llama.cpp's -ctk/-ctv)
MERGEABLE_TYPES = tuple(GGML_TYPES)


def sliding_window_refusal(info: ModelInfo) -> Optional[str]:
    """Why a model with interleaved sliding-window layers is not merged (None for other models)."""
    if not info.swa_layers:
        return None
    full = [il for il in range(info.n_layer) if il not in info.swa_layers]
    return (f"{info.name} ({info.arch}) has interleaved sliding-window layers: {len(info.swa_layers)} of its "
            f"{info.n_layer} layers keep a window-sized cache (swa_full=False, the default here), and the KV that "
            f"grows with the context is its full-attention layers' ({full}), which are not adjacent: merging them "
            "is not supported (docs/layouts.md has the measurement for Gemma 3 270M: no pair of its full-attention "
            "layers fits the default KLD budget; `minicache-gguf analyze MODEL` measures a model's pairs)")


def validate(cfg: MergeConfig, model_path, llama_kwargs: Optional[dict] = None) -> ModelInfo:
    """The model's identity, or a ConfigError listing every problem of merging it this way."""
    kw = llama_kwargs or {}
    problems = []
    try:
        info = ModelInfo.of(model_path)
    except CalibrationError as e:
        raise ConfigError(f"kv_merge: {e}") from None
    why = sliding_window_refusal(info)
    if why:
        raise ConfigError(f"kv_merge: {why}")
    if cfg.paper or cfg.start_layer is not None:
        try:
            cfg.resolve_start(info.n_layer)
        except ConfigError as e:
            problems.append(str(e))
    if not cfg.paper and cfg.calibration != "auto":
        try:
            load_calibration(cfg.calibration, info).selection(cfg)
        except (CalibrationError, ConfigError) as e:
            problems.append(str(e))
    for name in ("type_k", "type_v"):
        t = kw.get(name)
        if t is not None and type_name(t) not in MERGEABLE_TYPES:
            problems.append(f"{name}={t!r} is not supported with kv_merge: expected one of "
                            + ", ".join(f"{n} ({GGML_TYPES[n]})" for n in MERGEABLE_TYPES))
    for name, width in (("type_k", info.n_embd_k), ("type_v", info.n_embd_v)):
        t = type_name(kw.get(name))
        head, block = width // max(info.n_head_kv, 1), TYPE_BLOCKS[t][0] if t in TYPE_BLOCKS else 1
        if t in QUANTIZED_TYPES and head % block:
            problems.append(f"{name}={t} needs heads that hold whole {block}-value blocks; this model's "
                            f"{name[-1].upper()} heads have {head} values (use f16 for {name})")
    tv = type_name(kw.get("type_v"))
    if tv in QUANTIZED_TYPES and not kw.get("flash_attn"):
        problems.append(f"type_v={tv} needs flash_attn=True (llama.cpp stores a quantized V cache only "
                        "untransposed, for flash attention)")
    if kw.get("embedding"):
        problems.append("embedding=True is not supported with kv_merge (it uses several sequences)")
    if problems:
        raise ConfigError("kv_merge: " + "; ".join(problems))
    return info
