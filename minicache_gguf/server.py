"""`minicache-gguf serve`: llama-cpp-python's OpenAI-compatible server on the patched engine, with
the merge options as CLI flags, environment variables and config-file fields — the settings style
of llama-cpp-python (`--kv_merge true`, `KV_MERGE=true`, `"kv_merge": true` in a models entry).
Invalid options are refused before the server starts."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import types
from dataclasses import fields
from typing import List, Optional, Union

from pydantic import Field, create_model

from .calibrate import default_merge, resolve
from .config import ConfigError, MergeConfig, cache_type, type_name
from .llama import Llama, llama_cpp
from .model import default_model_path
from .validate import validate

import llama_cpp.server.model as _smodel  # noqa: E402  (after .llama: it points llama_cpp at the engine)
from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: E402


def _kv_field(name: str):
    """A server field for a MergeConfig field: its type, default and help come from MergeConfig."""
    f = MergeConfig.__dataclass_fields__[name]
    typ = {"start_layer": Optional[int], "calibration": Optional[str]}.get(name, type(f.default))
    # calibration unset (None) is MergeConfig's default, and tells "asked for" from "default" apart
    return typ, Field(default=None if name == "calibration" else f.default, description=f.metadata["help"])


#: a model entry: llama-cpp-python's fields plus MiniCache's (kv_merge, and kv_<field> for every MergeConfig field)
MiniCacheModelSettings = create_model(
    "MiniCacheModelSettings", __base__=ModelSettings,
    model=(str, Field(default="", description="GGUF model path (default: the default model, SmolLM2-135M-Instruct Q4_1)")),
    kv_merge=(Optional[bool], Field(default=None, description="MiniCache cross-layer KV merging (unset: on when a "
                                                              "calibration for the model is shipped or cached)")),
    **{f"kv_{f.name}": _kv_field(f.name) for f in fields(MergeConfig)})


class MiniCacheSettings(ServerSettings, MiniCacheModelSettings):
    pass


class MiniCacheConfigFileSettings(ServerSettings):
    models: List[MiniCacheModelSettings] = Field(default=[], description="Model configs")


def merge_config(s) -> Union[MergeConfig, bool]:
    """The MergeConfig of a model entry (False: merging off); ConfigError names a bad value.
    kv_merge unset: on, aligned, when a calibration of the model for its cache types and these
    settings is shipped or cached (calibrate.default_merge; it says why merging stays off)."""
    cfg = MergeConfig(**{f.name: getattr(s, f"kv_{f.name}") for f in fields(MergeConfig) if getattr(s, f"kv_{f.name}") is not None})
    if s.kv_merge is None and s.kv_calibration is None:
        model = s.model or default_model_path()
        if not os.path.isfile(model):
            return False
        kv, why = default_merge(model, cfg, *_types(s))
        if why and why not in _said:
            _said.add(why)
            print(f"serve: {s.model_alias or os.path.basename(model)}: {why}", file=sys.stderr)
        return kv
    return cfg if s.kv_merge else False


_said: set = set()


def _types(s) -> tuple:
    """The entry's K and V cache type names (f16 when unset)."""
    return tuple(type_name(cache_type(v)) if v is not None else "f16"
                 for v in (getattr(s, "type_k", None), getattr(s, "type_v", None)))


def check(models: list) -> None:
    """Refuse invalid entries before anything is loaded."""
    for m in models:
        if m.hf_model_repo_id is not None:
            raise ConfigError(f"hf_model_repo_id={m.hf_model_repo_id!r}: models are not downloaded from a hub; "
                              "pass a local GGUF file as model")
        if m.model and not os.path.isfile(m.model):
            raise ConfigError(f"model={m.model!r}: no such file")
        for name in ("type_k", "type_v"):  # llama-cpp-python's KV cache type settings (ggml type numbers)
            if getattr(m, name) is not None:
                cache_type(getattr(m, name), name)
        cfg = merge_config(m)
        if cfg:
            model = m.model or default_model_path()
            validate(cfg, model, dict(type_k=m.type_k, type_v=m.type_v, flash_attn=m.flash_attn))
            resolve(cfg, model, *_types(m))  # no calibration: refused here, before the server listens


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
              f"{'off' if not kv else ('paper layout' if kv.paper else 'aligned (' + str(kv.calibration) + ')')}"
              f"{f', window {kv.window}, gamma {kv.gamma}, t {kv.t}' if kv else ''}"
              f" on http://{server.host}:{server.port}/v1", flush=True)
    uvicorn.run(app, host=server.host, port=int(server.port), ssl_keyfile=server.ssl_keyfile,
                ssl_certfile=server.ssl_certfile, log_level="warning")
    return 0
