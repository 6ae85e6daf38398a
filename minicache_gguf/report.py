"""Writing a command's results: markdown + JSON + a PNG, the same way for analyze, eval and bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable


def progress(total: int, desc: str, enabled: bool):
    """A tqdm progress bar on stderr, or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def figure(*args, **kw):
    """A matplotlib figure on the non-interactive backend: (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS_HINT = 'plots need matplotlib: pip install "minicache-gguf[plots]"'


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write(out_dir, stem: str, markdown: str, data: dict, plot: Callable[[Path], Path]) -> list[Path]:
    """out_dir/stem.md, stem.json and stem.png (drawn by plot(path); without matplotlib, the PNG
    is left out with one line on stderr saying how to get it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    written = [out / f"{stem}.md", out / f"{stem}.json"]
    if not have_matplotlib():
        print(f"minicache-gguf: {stem}.png not written: {PLOTS_HINT}", file=sys.stderr)
        return written
    return written + [plot(out / f"{stem}.png")]
