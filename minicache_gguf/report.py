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


def write(out_dir, stem: str, markdown: str, data: dict, plot: Callable[[Path], Path]) -> list[Path]:
    """out_dir/stem.md, stem.json and stem.png (drawn by plot(path))."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    return [out / f"{stem}.md", out / f"{stem}.json", plot(out / f"{stem}.png")]
