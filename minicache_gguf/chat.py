"""`minicache-gguf chat`: a terminal chat on the (merged) KV cache, in the manner of `ollama run`.

The conversation stays in the KV cache across turns: each turn's prompt is the whole formatted
history, and llama-cpp-python evaluates only the tokens after the longest prefix it already holds.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import _engine, _internals

#: messages kept in the line-editing history (across runs, like ollama's ~/.ollama/history)
HISTORY_LINES = 1000
HISTORY_ENV = "MINICACHE_GGUF_CHAT_HISTORY"

HELP = """Available commands:
  /set temperature <x>   sampling temperature (0 = greedy)
  /set top_p <x>         nucleus sampling
  /set max_tokens <n>    longest reply
  /set system <text>     system prompt (clears the conversation)
  /show info             model, context, KV mode
  /show kv               KV bytes allocated with and without merging, tokens merged / retained
  /clear                 forget the conversation (and its KV cache)
  /bye, /exit            leave (Ctrl-D too)
  /?, /help              this help

Use \"\"\" to begin and end a multi-line message. Ctrl-C stops a reply."""


@dataclass
class Session:
    llm: object
    describe_kv: str
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512
    system: str = ""
    messages: list = field(default_factory=list)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.llm.reset()


def kv_summary(llm) -> str:
    kv = llm.kv_stats()
    mib = 1 << 20
    if kv.start_layer < 0:
        return f"KV {kv.kv_bytes / mib:.1f} MiB allocated (merging off), {kv.tokens} of {kv.n_ctx} cells used"
    return (f"KV {kv.kv_bytes / mib:.1f} MiB allocated vs {kv.kv_bytes_dense / mib:.1f} MiB without merging "
            f"({kv.ratio:.2f}x); {kv.tokens} of {kv.n_ctx} cells used, {kv.tokens_merged} merged, "
            f"{kv.tokens_retained:.0f} retained, {kv.tokens_staged} in the exact window; "
            f"{kv.merged_pools} (layer pair, K/V) pools, {kv.aligned_pools} aligned")


def _set(sess: Session, args: list[str], out) -> None:
    if len(args) < 2:
        print("usage: /set temperature|top_p|max_tokens|system <value>", file=out)
        return
    key, val = args[0], " ".join(args[1:])
    try:
        if key == "temperature":
            v = float(val)
            if not v >= 0:
                raise ValueError
            sess.temperature = v
        elif key == "top_p":
            v = float(val)
            if not 0 < v <= 1:
                raise ValueError
            sess.top_p = v
        elif key == "max_tokens":
            v = int(val)
            if v < 1:
                raise ValueError
            sess.max_tokens = v
        elif key == "system":
            sess.system = val
            sess.reset()
            print("system prompt set; conversation cleared", file=out)
            return
        else:
            print(f"unknown setting {key!r}: expected temperature, top_p, max_tokens or system", file=out)
            return
    except ValueError:
        valid = {"temperature": "a number >= 0", "top_p": "a number in (0, 1]", "max_tokens": "an integer >= 1"}[key]
        print(f"{key}={val!r} is not valid: expected {valid}", file=out)
        return
    print(f"{key} = {val}", file=out)


def reply(sess: Session, text: str, out=sys.stdout, err=sys.stderr) -> bool:
    """One turn: stream the reply, keep it in the conversation, print a timing line. False when the
    context is full (the turn is dropped)."""
    llm = sess.llm
    msgs = sess.messages + [{"role": "user", "content": text}]
    prompt = prompt_tokens(llm, msgs)
    n_prompt = len(prompt)
    if n_prompt + 8 > llm.n_ctx():
        print(f"context full: this turn needs {n_prompt} tokens and the context holds {llm.n_ctx()}. "
              "Type /clear to start a new conversation.", file=err)
        return False
    reused = llm.reusable_prefix(prompt)
    t0 = time.perf_counter()
    first = None
    pieces = []
    # Ctrl-C stops the reply between two tokens (the cache and the conversation stay consistent)
    stop = []
    old = signal.signal(signal.SIGINT, lambda *_: stop.append(True)) if _main_thread() else None
    try:
        stream = llm.create_chat_completion(msgs, max_tokens=min(sess.max_tokens, llm.n_ctx() - n_prompt),
                                            temperature=sess.temperature, top_p=sess.top_p, stream=True)
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content") or ""
            if first is None:
                first = time.perf_counter()
            if piece:
                pieces.append(piece)
                out.write(piece)
                out.flush()
            if stop:
                stream.close()
                break
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    interrupted = bool(stop)
    t1 = time.perf_counter()
    out.write("\n")
    answer = "".join(pieces)
    sess.messages = msgs + [{"role": "assistant", "content": answer}]
    n_gen = len(llm.tokenize(answer.encode(), add_bos=False)) if answer else 0
    new_prompt = max(0, n_prompt - reused)
    p_s = (first or t1) - t0
    g_s = t1 - (first or t1)
    line = (f"[{'interrupted; ' if interrupted else ''}prompt {new_prompt} new tok ({reused} reused from the cache) "
            f"{new_prompt / p_s if p_s > 0 else 0:.1f} tok/s | generation {n_gen} tok "
            f"{(n_gen - 1) / g_s if n_gen > 1 and g_s > 0 else 0:.1f} tok/s]")
    print(line, file=err)
    return True


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def prompt_tokens(llm, msgs) -> list[int]:
    """The prompt tokens llama-cpp-python builds from the GGUF's chat template for msgs."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tmpl = llm.metadata.get("tokenizer.chat_template")
    if not tmpl:
        return llm.tokenize("\n".join(m["content"] for m in msgs).encode())
    eos = _internals.token_text(llm, llm.token_eos())
    bos = _internals.token_text(llm, llm.token_bos())
    res = Jinja2ChatFormatter(template=tmpl, eos_token=eos, bos_token=bos)(messages=msgs)
    return llm.tokenize(res.prompt.encode("utf-8"), add_bos=not res.added_special, special=True)


def banner(sess: Session, model_path) -> str:
    llm = sess.llm
    name = llm.metadata.get("general.name", str(model_path))
    return (f"model: {name} ({model_path})\ncontext: {llm.n_ctx()} tokens\nKV: {sess.describe_kv}\n"
            "Type /? for help, /bye to leave.")


def read_message(prompt: str, inp=input) -> str:
    line = inp(prompt)
    if line.strip().startswith('"""'):
        first = line.strip()[3:]
        if first.endswith('"""') and len(first) >= 3:
            return first[:-3]
        lines = [first] if first else []
        while True:
            more = inp("... ")
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                break
            lines.append(more)
        return "\n".join(lines)
    return line


def keep_sigint_on_main_thread(llm) -> None:
    """llama.cpp's worker threads inherit the signal mask of the thread that starts them. If SIGINT
    can land on a worker, Ctrl-C at the prompt would not interrupt the main thread's blocking read
    (seen as a flaky hang). So the workers are started (a short batch, then reset) with SIGINT
    blocked, and only the main thread takes it afterwards."""
    if not hasattr(signal, "pthread_sigmask") or not _main_thread():
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        llm.eval(llm.tokenize(b"Hello there, friend.", add_bos=True))
        llm.reset()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def history_path() -> Path:
    """Where the chat keeps its input history ($MINICACHE_GGUF_CHAT_HISTORY overrides)."""
    return Path(os.environ.get(HISTORY_ENV) or _engine.cache_dir() / "chat_history")


def line_editing(path: Path) -> bool:
    """Line editing (arrows, Ctrl-A/E, ...) and history (up/down recall earlier messages, kept in
    `path` across runs) for input(), through GNU readline where Python has it."""
    try:
        import readline
    except ImportError:  # e.g. a Python built without readline: plain input still works
        return False
    import atexit

    readline.set_history_length(HISTORY_LINES)
    try:
        readline.read_history_file(str(path))
    except OSError:
        pass

    def save():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(str(path))
        except OSError:
            pass

    atexit.register(save)
    return True


def repl(sess: Session, model_path, out=sys.stdout, err=sys.stderr) -> int:
    line_editing(history_path())
    if _main_thread():
        # an interactive session takes Ctrl-C even when started with SIGINT ignored (a background
        # job of a non-interactive shell inherits SIG_IGN, which Python then keeps)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    keep_sigint_on_main_thread(sess.llm)
    print(banner(sess, model_path), file=out)
    while True:
        try:
            text = read_message(">>> ")
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.", file=out)
            continue
        except EOFError:
            print(file=out)
            return 0
        cmd = text.strip()
        if not cmd:
            continue
        if cmd.startswith("/"):
            parts = cmd.split()
            head = parts[0]
            if head in ("/bye", "/exit"):
                return 0
            if head in ("/?", "/help"):
                print(HELP, file=out)
            elif head == "/clear":
                sess.reset()
                print("Cleared the conversation.", file=out)
            elif head == "/set":
                _set(sess, parts[1:], out)
            elif head == "/show" and parts[1:2] == ["info"]:
                print(banner(sess, model_path).rsplit("\n", 1)[0] +
                      f"\nsettings: temperature {sess.temperature}, top_p {sess.top_p}, max_tokens {sess.max_tokens}"
                      + (f", system {sess.system!r}" if sess.system else ""), file=out)
            elif head == "/show" and parts[1:2] == ["kv"]:
                print(kv_summary(sess.llm), file=out)
            else:
                print(f"Unknown command {cmd!r}. Type /? for help.", file=out)
            continue
        try:
            reply(sess, text, out, err)
        except KeyboardInterrupt:  # Ctrl-C before the reply began streaming
            print("\n[interrupted]", file=err)
