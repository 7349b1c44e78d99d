"""The working directory and its runtime folders (created on demand, never inside the package)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

RUNTIME_FOLDERS: tuple[str, ...] = ("fits", "processed_data", "models", "results", "logs", "plots")


@dataclass(frozen=True)
class Workspace:
    """Paths of the runtime folders under ``root``.

    Each accessor creates its folder (and the given sub-folders) on first use.
    """

    root: Path

    def _dir(self, name: str, *sub: str) -> Path:
        p = self.root.joinpath(name, *sub)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def fits(self, *sub: str) -> Path:
        return self._dir("fits", *sub)

    def processed(self, *sub: str) -> Path:
        return self._dir("processed_data", *sub)

    def models(self, *sub: str) -> Path:
        return self._dir("models", *sub)

    def results(self, *sub: str) -> Path:
        return self._dir("results", *sub)

    def logs(self, *sub: str) -> Path:
        return self._dir("logs", *sub)

    def plots(self, *sub: str) -> Path:
        return self._dir("plots", *sub)

    def resolve(self, path: str | Path) -> Path:
        """``path`` as given when absolute, else relative to the workspace root."""
        p = Path(path)
        return p if p.is_absolute() else self.root / p


def timestamp() -> str:
    """UTC time stamp for run and log names, e.g. ``20261129-101500``."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
