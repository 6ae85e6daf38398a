"""`Llama`: llama-cpp-python's Llama on the patched engine, with MiniCache options.

Importing this module loads llama_cpp on the patched engine built for this source tree
(_internals.py). The wrapper validates a merge config against the model in one place
(validate.py), resolves its calibration (calibrate.pairs_for), arms the engine and checks what
the engine built.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
import warnings
from typing import Optional, Union

from . import _internals
from .calibrate import PaperMergeWarning, pairs_for, paper_warning
from .config import GGML_TYPES, ConfigError, MergeConfig, cache_type, default_n_gpu_layers, merged_n_ubatch, type_name
from .model import default_model_path
from .validate import validate

__all__ = ["Llama", "CalibrationTypeWarning", "CalibrationContextWarning", "PaperMergeWarning"]


class CalibrationTypeWarning(UserWarning):
    """A calibration scored on one KV cache type is used with another."""


class CalibrationContextWarning(UserWarning):
    """A calibration's KLD budget was scored at a shorter context than this cache holds."""


llama_cpp = _internals.llama_cpp


# every keyword the stock constructor names; anything else is a typo stock Llama would drop
_STOCK_OPTIONS = frozenset(
    name for name, p in inspect.signature(llama_cpp.Llama.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def _resolve_kv_merge(kv_merge) -> Optional[MergeConfig]:
    if kv_merge is None or kv_merge is False:
        return None
    if kv_merge is True:
        return MergeConfig()
    if isinstance(kv_merge, MergeConfig):
        return kv_merge
    raise TypeError(f"kv_merge={kv_merge!r} is not valid: expected True, False or a MergeConfig")


class Llama(llama_cpp.Llama):
    """Drop-in for llama_cpp.Llama on the patched engine.

    Differences from the stock class:
      - model_path defaults to the default model (SmolLM2-135M-Instruct Q4_1);
      - unknown keyword arguments raise TypeError instead of being silently ignored;
      - rpc_servers="host:port[,host:port]" puts llama.cpp's RPC devices (`minicache-gguf rpc-server`
        on other machines) in this process, as llama.cpp's --rpc: n_gpu_layers (and their KV cache,
        merged or not) go to them. llama-cpp-python 0.3.36 has no such option; the devices stay
        registered for every model the process loads afterwards;
      - kv_merge=True | MergeConfig(...) selects MiniCache cross-layer KV merging: True is
        MergeConfig(), whose calibration="auto" is the calibrated selection of this model and KV
        cache type (shipped, cached, or re-scored from one made for other settings); a model with
        none is refused (calibrate.CalibrationMissing) with the time a calibration takes here and
        the command that makes one; calibration="paper" names the paper's merge. With merging on,
        n_ubatch defaults to the window (at least 256, at most 512: config.merged_n_ubatch), since the
        exact staging pool holds max(window + config.MERGE_BLOCK, n_ubatch) tokens.

    Models with interleaved sliding-window layers (Gemma 2/3): swa_full defaults to False, as in
    llama.cpp's llama-server (llama-cpp-python's default, True, gives the sliding-window layers a
    cache of n_ctx cells instead of about their window: on Gemma 3 270M at n_ctx 32768, 576 MiB of
    f16 KV instead of 111). The window-sized cache has dropped the cells that fell out of the window,
    so a cached prefix is reused only while the cache still holds the window in front of it; a prompt
    that rewinds further is evaluated from scratch (it gives what a new Llama gives). swa_full=True
    keeps every cell and reuses any prefix.

    Cache reuse with merging on: merging is irreversible (tokens that left the window are stored
    as shared directions), so a cached prefix is only as good as the history that merged it. A
    call whose prompt continues the cached tokens exactly (a chat's next turn) reuses the cache as
    it stands. Any other call (the same prompt again, a shorter or a different one, after
    load_state or from a LlamaRAMCache) is evaluated from scratch and gives exactly what a new
    Llama gives for that prompt. Stock llama-cpp-python reuses any common prefix; with merging on
    that would replay tokens merged by a previous call's later tokens and change the output.
    """

    def __init__(self, model_path: Optional[Union[str, os.PathLike]] = None, *,
                 kv_merge: Union[bool, MergeConfig, None] = False, rpc_servers=None, **kwargs):
        unknown = sorted(set(kwargs) - _STOCK_OPTIONS)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, sorted(_STOCK_OPTIONS | {"kv_merge", "rpc_servers"}), n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(
                f"Llama() got unknown keyword argument(s) {', '.join(hints)}; valid options are "
                f"kv_merge, rpc_servers and llama_cpp.Llama's: {', '.join(sorted(_STOCK_OPTIONS))}")
        if default_n_gpu_layers() is not None:
            kwargs.setdefault("n_gpu_layers", default_n_gpu_layers())
        if rpc_servers:
            # llama.cpp's RPC devices (as its --rpc): n_gpu_layers go to them, with their KV cache
            _internals.add_rpc_servers(rpc_servers)
        # KV cache types as llama.cpp's tools take them: names (q8_0) or ggml type numbers
        for name in ("type_k", "type_v"):
            if kwargs.get(name) is not None:
                kwargs[name] = GGML_TYPES[cache_type(kwargs[name], name)]
        # sliding-window layers keep a window-sized cache (llama-server's default; see the docstring)
        kwargs.setdefault("swa_full", False)
        self.merge_config = cfg = _resolve_kv_merge(kv_merge)
        if model_path is None:
            model_path = default_model_path()
        if cfg is None:
            super().__init__(str(model_path), **kwargs)
            return

        validate(cfg, model_path, kwargs)
        types = tuple(type_name(kwargs[n]) if kwargs.get(n) is not None else "f16" for n in ("type_k", "type_v"))
        # the one default policy (calibrate.resolve): the calibration of this model and cache types,
        # re-scored from another one where needed; none at all is a CalibrationMissing with its cost
        pairs, self.calibration = pairs_for(cfg, model_path, *types, progress=sys.stderr.isatty())
        if cfg.paper:
            why = paper_warning(model_path, cfg)
            if why:
                warnings.warn(why, PaperMergeWarning, stacklevel=2)
        elif self.calibration.types() != types:
            # a calibration file scored on another cache type: its budget is not this cache's
            warnings.warn(
                f"kv_merge: the calibration's pair selection was scored on KV cache types {'/'.join(self.calibration.types())} "
                f"(KLD {self.calibration.selection_kld:.4f}); this cache is {'/'.join(types)}: its error differs "
                f"(`minicache-gguf calibrate MODEL -ctk {types[0]} -ctv {types[1]}` scores a selection for it)",
                CalibrationTypeWarning, stacklevel=2)
        # the ubatch size llama-cpp-python will use: the staging pool must hold one whole ubatch
        kwargs.setdefault("n_ubatch", merged_n_ubatch(cfg.window))
        n_ctx = kwargs.get("n_ctx", 512)
        n_batch = min(n_ctx, kwargs.get("n_batch", 512)) if n_ctx else kwargs.get("n_batch", 512)
        n_ubatch = min(n_batch, kwargs["n_ubatch"])
        _internals.set_pending(_internals.params_from_config(cfg, n_ubatch, pairs))
        try:
            super().__init__(str(model_path), **kwargs)
        except ValueError as e:
            why = _internals.last_error()
            if why:
                raise ConfigError(f"kv_merge: {why}") from e
            raise
        finally:
            _internals.set_pending(None)
        stats = _internals.get_stats(_internals.context_pointer(self))
        if stats is None or stats.start_layer < 0:
            self.close()
            raise ConfigError(
                f"kv_merge: the memory of this model ({self.metadata.get('general.architecture', '?')}) "
                "is not a KV cache MiniCache can merge (recurrent or hybrid models)")
        scored_at = self.calibration.settings.get("n_ctx") if self.calibration is not None else None
        if scored_at is not None and self.n_ctx() > scored_at:
            # more merged tokens than the selection was scored with: the KLD grows with them
            warnings.warn(
                f"kv_merge: the calibration's pair selection was scored at context {scored_at} (KLD "
                f"{self.calibration.selection_kld:.4f}); this cache holds {self.n_ctx()} tokens, and the merge's KLD grows "
                f"with the merged count (calibrate --n-ctx {self.n_ctx()} scores a selection for it; "
                f"`minicache-gguf eval --ctx {self.n_ctx()}` measures this one)", CalibrationContextWarning, stacklevel=2)

    def reusable_prefix(self, tokens) -> int:
        """How many leading tokens of `tokens` the next generate() takes from the cache rather than
        evaluating (llama-cpp-python keeps the last token to evaluate). With merging on, only an
        exact continuation of the cached tokens reuses them (see the class docstring)."""
        shared = 0
        for a, b in zip(self._input_ids, tokens[:-1]):
            if a != b:
                break
            shared += 1
        if self.merge_config is not None and shared < self.n_tokens:
            return 0
        if 0 < shared < self.n_tokens and not self._holds_window_before(shared):
            return 0
        return shared

    def _holds_window_before(self, pos: int) -> bool:
        """False when the model's sliding-window layers keep a window-sized cache (swa_full=False)
        that no longer holds the cells tokens from pos on attend to (llama-server's test)."""
        n_swa = llama_cpp.llama_model_n_swa(self.model)
        if n_swa <= 0 or self.context_params.swa_full:
            return True
        pos_min = llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(self.ctx), 0)
        return pos_min <= max(0, pos - n_swa)

    def generate(self, tokens, *args, reset: bool = True, **kwargs):
        if reset and self.n_tokens > 0 and self.reusable_prefix(tokens) == 0:
            # nothing reusable (merging on: tokens past the prefix merged some of it; a window-sized
            # sliding-window cache: it lost the window in front of the prefix): start over
            self.reset()
        yield from super().generate(tokens, *args, reset=reset, **kwargs)

    def eval(self, tokens) -> None:
        try:
            super().eval(tokens)
        except RuntimeError as e:
            why = self._engine_error()
            if why:
                raise RuntimeError(f"{e}: {why}") from e
            raise

    def _engine_error(self) -> str:
        if self.merge_config is None:
            return ""
        return _internals.last_error()

    def kv_stats(self):
        """The KV cache's layout and fill as measured by the engine (_internals.KvStats)."""
        stats = _internals.get_stats(_internals.context_pointer(self))
        if stats is None:
            raise ValueError("this model's memory is not a KV cache (recurrent model): no KV stats")
        return stats

    def save_state(self):
        """As llama_cpp.Llama.save_state; the state remembers the kv_merge layout it was saved with
        (a merged cache saves its shared directions, norms and exact slots, not dense rows)."""
        state = super().save_state()
        state.kv_merge = None if self.merge_config is None else self.merge_config.to_dict()
        state.kv_types = self._kv_types()
        return state

    def _kv_types(self) -> str:
        p = self.context_params
        return f"K {type_name(p.type_k) or p.type_k}, V {type_name(p.type_v) or p.type_v}"

    def load_state(self, state) -> None:
        mine = None if self.merge_config is None else self.merge_config.to_dict()
        saved = getattr(state, "kv_merge", mine)
        if saved != mine:
            raise ValueError(f"load_state: the state was saved with kv_merge={saved}, this Llama has "
                             f"kv_merge={mine}: a KV state only loads into the same layout")
        saved_types = getattr(state, "kv_types", self._kv_types())
        if saved_types != self._kv_types():
            raise ValueError(f"load_state: the state was saved with KV cache types {saved_types}, this Llama has "
                             f"{self._kv_types()}: a KV state only loads into the same cache types")
        if self.merge_config is not None:
            _internals.set_pending(None)  # disarms nothing here; clears the engine's last error
        try:
            super().load_state(state)
        except RuntimeError as e:
            # llama.cpp emptied the cache when it refused the state: so does the wrapper's token count
            self.n_tokens = 0
            why = self._engine_error()
            raise RuntimeError("load_state: llama.cpp refused the state: "
                               + (why or "it comes from another model, context or kv_merge layout (see llama.cpp's log)")) from e

    def close(self) -> None:
        # __init__ may refuse options before the stock constructor ran: nothing to free then
        if hasattr(self, "_stack"):
            super().close()
