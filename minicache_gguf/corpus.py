"""The built-in text: Python's own documentation (stdlib `pydoc_data.topics`, ~465 kB of English).

Split once, deterministically, at a topic boundary: the first ~20% of the characters is the
calibration text, the rest the evaluation text. Calibration and evaluation never share a topic,
and the evaluation text drops every paragraph that also occurs in the calibration text (the
documentation repeats some paragraphs across topics).

Evaluation domains (`eval_text`): "docs" is that evaluation split (the calibration's own domain);
"code" (Python source from the standard library) and "legal" (licence texts installed with
Python and this package's dependencies) are domains the calibration never saw. They are read
from the machine at run time (nothing is shipped or downloaded); results record their sha256.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

CALIBRATION_FRACTION = 0.2
SPLITS = ("calibration", "eval")
#: evaluation domains: the calibration's own (docs) and two it never saw
DOMAINS = ("docs", "code", "legal")
_CODE_FILES = ("argparse.py", "difflib.py", "textwrap.py")           # standard library modules
_LICENCE_DISTS = ("numpy", "matplotlib")                              # dependencies of this package


def _topics() -> list[str]:
    import pydoc_data.topics

    t = pydoc_data.topics.topics
    return [t[k].strip() for k in sorted(t)]


def builtin_text(split: str) -> str:
    """The calibration or eval part of the built-in corpus (disjoint: whole topics on each side)."""
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


def eval_text(domain: str) -> str:
    """The evaluation text of a domain (see the module docstring)."""
    if domain == "docs":
        return builtin_text("eval")
    if domain == "code":
        std = Path(sysconfig.get_paths()["stdlib"])
        return "\n\n".join((std / f).read_text(encoding="utf-8") for f in _CODE_FILES)
    if domain == "legal":
        import importlib.metadata as md

        parts = []
        std_licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        if std_licence.is_file():
            parts.append(std_licence.read_text(encoding="utf-8", errors="replace"))
        for dist in _LICENCE_DISTS:
            for f in sorted(md.distribution(dist).files or [], key=str):
                name = f.name.upper()
                if ("LICENSE" in name or "COPYING" in name) and f.locate().stat().st_size > 4000:
                    parts.append(f.locate().read_text(encoding="utf-8", errors="replace"))
        return "\n\n".join(parts)
    raise ValueError(f"domain={domain!r} is not valid: expected one of {DOMAINS}")


def text_arg(value: str | None) -> tuple[str, str]:
    """(text, description) of a --text value: a file, or builtin:<domain> (default builtin:docs)."""
    value = value or "builtin:docs"
    if value.startswith("builtin:"):
        domain = value.split(":", 1)[1]
        text = eval_text(domain)
        what = {"docs": "built-in eval split (pydoc_data; the calibration's domain)",
                "code": "Python standard library source (argparse, difflib, textwrap; out of domain)",
                "legal": "licence texts of Python, numpy and matplotlib (out of domain)"}[domain]
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
