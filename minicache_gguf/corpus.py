"""The built-in text: Python's own documentation (stdlib `pydoc_data.topics`, ~465 kB of English).

Split once, deterministically, at a topic boundary: the first ~20% of the characters is the
calibration text, the rest the evaluation text. Calibration and evaluation never share a topic,
and the evaluation text drops every paragraph that also occurs in the calibration text (the
documentation repeats some paragraphs across topics).
"""

from __future__ import annotations

from pathlib import Path

CALIBRATION_FRACTION = 0.2
SPLITS = ("calibration", "eval")


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
