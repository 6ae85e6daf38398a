"""minicache-gguf: MiniCache cross-layer KV-cache merging inside llama.cpp, for GGUF models.

    from minicache_gguf import Llama, MergeConfig, default_model_path

`Llama` is imported lazily (it loads the patched engine), so the config, the NumPy reference
and the build helpers work before the engine is built.
"""

from __future__ import annotations

from .config import ConfigError, MergeConfig
from .model import default_model_path

__version__ = "0.1.0"

__all__ = ["Llama", "MergeConfig", "ConfigError", "default_model_path", "__version__"]


def __getattr__(name: str):
    if name == "Llama":
        from . import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'minicache_gguf' has no attribute {name!r}")
