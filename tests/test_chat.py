"""`minicache-gguf chat` through a real pseudo-terminal (pexpect), merging on, on the default model."""

import os
import sys
import time
from pathlib import Path

import pexpect
import pytest

from minicache_gguf import calibrate

CLI = str(Path(sys.executable).with_name("minicache-gguf"))


@pytest.fixture(scope="module")
def cal_file(model_path, tmp_path_factory):
    was = os.environ.pop(calibrate.FORBID_ENV, None)  # a small calibration on purpose
    try:
        cal = calibrate.calibrate(model_path, form="head", fit_tokens=160, n_ctx=144, scored=16, window=32,
                                    max_kld=0.02, progress=False, log=lambda s: None)
    finally:
        if was is not None:
            os.environ[calibrate.FORBID_ENV] = was
    return cal.save(tmp_path_factory.mktemp("cal") / "cal.gguf")


def spawn(*args):
    # the user's history file stays untouched by the tests
    env = dict(os.environ, TERM="dumb", MINICACHE_GGUF_CHAT_HISTORY=os.devnull)
    return pexpect.spawn(CLI, ["chat", "--temp", "0", *args], env=env, encoding="utf-8", timeout=120)


def test_chat_repl_in_a_terminal(cal_file):
    c = spawn("--n-ctx", "1024", "--window", "32", "--max-tokens", "40", "--calibration", str(cal_file))
    c.expect("KV: MiniCache aligned merging on")
    c.expect(">>> ")
    c.sendline("/?")
    c.expect("/show kv")
    c.expect(">>> ")
    c.sendline('"""')
    c.sendline("Say hello")
    c.sendline('in French."""')
    c.expect(r"\[prompt \d+ new tok \(0 reused from the cache\)")
    c.expect(">>> ")
    c.sendline("And in Spanish?")
    c.expect(r"\[prompt \d+ new tok \((\d+) reused from the cache\)")
    assert int(c.match.group(1)) > 10  # the conversation stayed in the cache
    c.expect(">>> ")
    c.sendline("/show kv")
    c.expect(r"KV [\d.]+ MiB allocated vs [\d.]+ MiB without merging .* (\d+) merged")
    c.expect(">>> ")
    c.sendline("/clear")
    c.expect("Cleared the conversation")
    c.sendline("/set max_tokens 400")
    c.expect("max_tokens = 400")
    c.sendline("Write a very long story about a dragon who learns to read.")
    c.expect("learns to read.\r\n")  # the terminal's echo of the line
    c.expect(r"\w+ \w+ \w+")          # the reply is streaming
    c.sendintr()                # Ctrl-C mid-reply: back to the prompt
    c.expect(r"\[interrupted; prompt")
    c.expect(">>> ")
    c.sendline("/show info")
    c.expect("context: 1024 tokens")
    c.expect("max_tokens 400")
    c.sendline("/nonsense")
    c.expect("Unknown command")
    c.expect(">>> ")
    time.sleep(0.5)             # let input() start reading
    c.sendcontrol("c")          # Ctrl-C at the prompt does not exit
    c.expect("Use Ctrl \\+ d or /bye to exit")
    c.sendcontrol("d")          # Ctrl-D exits
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "stock"])
def test_chat_context_full_is_a_message_not_a_crash(merge, cal_file):
    if merge:
        c = spawn("--n-ctx", "256", "--window", "32", "--max-tokens", "120", "--calibration", str(cal_file))
        c.expect("KV: MiniCache aligned merging on")
        c.expect(">>> ")
        c.sendline("Tell me a long story about a lighthouse keeper.")  # fills the window: tokens are merged
        c.expect("\\[prompt .*\\]", timeout=300)
    else:
        c = spawn("--n-ctx", "256", "--no-kv-merge")
        c.expect("KV: f16, merging off")
    c.expect(">>> ")
    c.sendline("Please repeat this sentence many times. " * 40)
    c.expect("context full: this turn needs \\d+ tokens and the context holds 256. Type /clear")
    c.expect(">>> ")
    c.sendline("/bye")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_chat_one_shot_prompt():
    out = pexpect.run(f"{CLI} chat --no-kv-merge --n-ctx 512 --temp 0 --max-tokens 8 -p 'Name a colour.'",
                      encoding="utf-8", timeout=120, withexitstatus=True)
    text, status = out
    assert status == 0 and "[prompt" in text and ">>>" not in text


def test_chat_on_a_quantized_cache(cal_file):
    """-ctk/-ctv as llama.cpp's tools take them: the banner says what is on, /show kv the memory."""
    child = spawn("--calibration", str(cal_file), "--n-ctx", "1024", "-ctk", "q4_0", "-ctv", "q4_0")
    child.expect("KV: MiniCache aligned merging on: .*; cache type q4_0")
    child.expect(">>> ")
    child.sendline("/show kv")
    child.expect("MiB")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)


def test_chat_line_editing_and_history(tmp_path):
    """Arrow keys edit the line (no escape codes in the message); up recalls earlier input, kept
    across runs in the history file."""
    hist = tmp_path / "history"
    env = dict(os.environ, TERM="xterm", MINICACHE_GGUF_CHAT_HISTORY=str(hist))
    c = pexpect.spawn(CLI, ["chat", "--no-kv-merge", "--n-ctx", "256"], env=env, encoding="utf-8", timeout=120)
    c.expect(">>> ")
    c.send("/set system abc")
    c.send("\x1b[D")              # left arrow
    c.send("X\r")
    c.expect(">>> ")
    c.sendline("/show info")
    c.expect("system 'abXc'")
    c.expect(">>> ")
    c.sendline("/bye")
    c.expect(pexpect.EOF)
    c.close()
    assert "/set system abXc" in hist.read_text()

    c = pexpect.spawn(CLI, ["chat", "--no-kv-merge", "--n-ctx", "256"], env=env, encoding="utf-8", timeout=120)
    c.expect(">>> ")
    for _ in range(3):            # up: /bye, /show info, then /set system abXc of the previous run
        c.send("\x1b[A")
    c.send("\r")
    c.expect(">>> ")
    c.sendline("/show info")
    c.expect("system 'abXc'")
    c.sendline("/bye")
    c.expect(pexpect.EOF)
