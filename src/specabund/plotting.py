"""Plot helpers shared by the stages: saving figures atomically."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .utils import atomic_write


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` to ``path`` atomically (format from the suffix) and return the path."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format=fmt, dpi=dpi)
    return path
