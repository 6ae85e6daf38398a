"""minicache-gguf: MiniCache cross-layer KV-cache merging inside llama.cpp, for GGUF models.

    from minicache_gguf import Llama, MergeConfig, default_model_path

`Llama` is imported lazily (it loads the patched engine), so the config, the NumPy reference
and the build helpers work before the engine is built.

Layers (each imports only from the layers before it; tests/test_layers.py checks):
  plain values   _version, _engine, reference, kvstate, corpus, report, config, native, model, layout
  engine         engine (cffi mirror of include/llama-minicache.h), alignment, calfile
  internals      _internals (the only code touching llama-cpp-python's private attributes), metrics
  calibration    calibrate, validate
  wrapper        llama (Llama)
  tools          analyze, bench, evaluate, generate
  surfaces       chat, server, cli
"""

from __future__ import annotations

from ._version import __version__
from .config import ConfigError, MergeConfig
from .model import default_model_path

__all__ = ["Llama", "MergeConfig", "ConfigError", "default_model_path", "__version__"]


def __getattr__(name: str):
    if name == "Llama":
        from . import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'minicache_gguf' has no attribute {name!r}")
