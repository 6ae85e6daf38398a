"""`minicache-gguf serve`: llama-cpp-python's OpenAI-compatible server on the patched engine, with
the merge options as CLI flags, environment variables and config-file fields — the settings style
of llama-cpp-python (`--kv_merge true`, `KV_MERGE=true`, `"kv_merge": true` in a models entry).
Invalid options are refused before the server starts."""

from __future__ import annotations

import argparse
import functools
import json
import os
import types
from typing import List, Optional, Union

from pydantic import Field

from .config import ConfigError, MergeConfig
from .llama import Llama, llama_cpp

import llama_cpp.server.model as _smodel  # noqa: E402  (after .llama: it points llama_cpp at the engine)
from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: E402


class MiniCacheModelSettings(ModelSettings):
    """A model entry: llama-cpp-python's fields plus MiniCache's."""

    model: str = Field(default="", description="GGUF model path (default: the default model, SmolLM2-135M-Instruct Q4_1)")
    kv_merge: Optional[bool] = Field(
        default=None, description="MiniCache cross-layer KV merging (unset: on when a calibration for the model exists)")
    kv_calibration: Optional[str] = Field(
        default=None, description="calibration file or 'auto' (aligned merging); unset: the paper's merge")
    kv_window: int = Field(default=256, description="recent tokens kept exact")
    kv_gamma: float = Field(default=0.05, description="retention fraction")
    kv_t: float = Field(default=0.6, description="SLERP parameter")
    kv_start_layer: Optional[int] = Field(default=None, description="first merged layer (paper's merge; default n_layer/2)")


class MiniCacheSettings(ServerSettings, MiniCacheModelSettings):
    pass


class MiniCacheConfigFileSettings(ServerSettings):
    models: List[MiniCacheModelSettings] = Field(default=[], description="Model configs")


def merge_config(s: MiniCacheModelSettings) -> Union[MergeConfig, bool]:
    """The MergeConfig of a model entry (False: merging off); ConfigError names a bad value.
    kv_merge unset: on, aligned, when `calibration="auto"` has already made a calibration for the model."""
    if s.kv_merge is None and s.kv_calibration is None and s.model and os.path.isfile(s.model):
        from .calibration import DEFAULT_MAX_KLD, ModelInfo, auto_calibration_path

        p = auto_calibration_path(ModelInfo.of(s.model).sha256, "head", 0.6, 0.05, 256, DEFAULT_MAX_KLD)
        if p.is_file() and (s.kv_window, s.kv_gamma, s.kv_t) == (256, 0.05, 0.6):
            return MergeConfig(calibration=str(p))
    if not s.kv_merge:
        return False
    return MergeConfig(window=s.kv_window, gamma=s.kv_gamma, t=s.kv_t, start_layer=s.kv_start_layer,
                       calibration=s.kv_calibration)


def check(models: list) -> None:
    """Refuse invalid entries before anything is loaded."""
    for m in models:
        if m.hf_model_repo_id is not None:
            raise ConfigError(f"hf_model_repo_id={m.hf_model_repo_id!r}: models are not downloaded from a hub; "
                              "pass a local GGUF file as model")
        if m.model and not os.path.isfile(m.model):
            raise ConfigError(f"model={m.model!r}: no such file")
        cfg = merge_config(m)
        if cfg and cfg.calibration not in (None, "auto"):
            from .calibration import ModelInfo, load_calibration

            load_calibration(cfg.calibration, ModelInfo.of(m.model))


_orig_load = _smodel.LlamaProxy.load_llama_from_model_settings


def _load(settings) -> llama_cpp.Llama:
    """llama-cpp-python's own loader, with minicache_gguf.Llama (and the entry's kv_merge) as Llama."""
    kv = merge_config(settings) if isinstance(settings, MiniCacheModelSettings) else False
    shim = types.SimpleNamespace(**{k: getattr(llama_cpp, k) for k in dir(llama_cpp) if not k.startswith("__")})
    shim.Llama = functools.partial(_make_llama, kv)
    _smodel.llama_cpp = shim
    try:
        return _orig_load(settings)
    finally:
        _smodel.llama_cpp = llama_cpp


def _make_llama(kv, **kw) -> Llama:
    # llama-cpp-python's loader passes two options its Llama silently drops (**kwargs): mul_mat_q
    # (a no-op in 0.3.36) and rpc_servers (not wired to llama.cpp there). minicache_gguf.Llama
    # rejects unknown options, so they are handled here: the no-op is dropped, RPC is refused.
    kw.pop("mul_mat_q", None)
    if kw.pop("rpc_servers", None):
        raise ConfigError("rpc_servers is not supported by this server (llama-cpp-python 0.3.36 ignores it)")
    return Llama(kv_merge=kv, **kw)


def create_app(server_settings: ServerSettings, models: list):
    from llama_cpp.server.app import create_app as _create_app

    check(models)
    _smodel.LlamaProxy.load_llama_from_model_settings = staticmethod(_load)
    return _create_app(server_settings=server_settings, model_settings=models)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llama_cpp.server.cli import add_args_from_model

    add_args_from_model(p, MiniCacheSettings)
    p.add_argument("--config_file", type=str, default=None,
                   help="JSON or YAML file: server settings and a 'models' list (CONFIG_FILE also works)")


def _one_line(e) -> ConfigError:
    errs = "; ".join(f"{'.'.join(str(x) for x in d['loc']) or 'value'}={d.get('input')!r}: {d['msg']}" for d in e.errors())
    return ConfigError(f"invalid server settings: {errs}")


def settings_from_args(args) -> tuple:
    from pydantic import ValidationError

    try:
        return _settings_from_args(args)
    except ValidationError as e:
        raise _one_line(e) from None


def _settings_from_args(args) -> tuple:
    from llama_cpp.server.cli import parse_model_from_args

    from .model import default_model_path

    config_file = os.environ.get("CONFIG_FILE", args.config_file)
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file {config_file!r} does not exist")
        with open(config_file, "rb") as f:
            if config_file.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(f)
            else:
                data = json.load(f)
        cfs = MiniCacheConfigFileSettings.model_validate(data)
        server, models = ServerSettings.model_validate(cfs.model_dump(exclude={"models"})), cfs.models
    else:
        vals = {k: v for k, v in vars(args).items() if v is not None and k not in ("config_file", "func", "cmd", "debug")}
        server = parse_model_from_args(ServerSettings, argparse.Namespace(**vals))
        models = [parse_model_from_args(MiniCacheModelSettings, argparse.Namespace(**vals))]
    for m in models:
        if not m.model:
            m.model = str(default_model_path())
        if not m.model_alias:
            m.model_alias = os.path.basename(m.model)
    return server, models


def serve(args) -> int:
    import uvicorn

    server, models = settings_from_args(args)
    app = create_app(server, models)
    for m in models:
        kv = merge_config(m)
        print(f"serve: {m.model_alias}: n_ctx {m.n_ctx}, kv_merge "
              f"{'off' if not kv else ('aligned (' + str(kv.calibration) + ')' if kv.calibration else 'paper layout')}"
              f"{f', window {kv.window}, gamma {kv.gamma}, t {kv.t}' if kv else ''}"
              f" on http://{server.host}:{server.port}/v1", flush=True)
    uvicorn.run(app, host=server.host, port=int(server.port), ssl_keyfile=server.ssl_keyfile,
                ssl_certfile=server.ssl_certfile, log_level="warning")
    return 0
