"""Finding trained model runs under ``models/``."""

from __future__ import annotations

from pathlib import Path

from .errors import SpecabundError

_MARKERS = ("config.json", "ensemble.json")


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds a saved model (``config.json``) or an ensemble (``ensemble.json``)."""
    return path.is_dir() and any((path / m).exists() for m in _MARKERS)


def list_runs(models_dir: str | Path) -> list[Path]:
    """Saved runs directly under ``models_dir``, oldest first (by modification time)."""
    d = Path(models_dir)
    if not d.is_dir():
        return []
    runs = [p for p in d.iterdir() if is_run_dir(p)]
    return sorted(
        runs, key=lambda p: (max((p / m).stat().st_mtime for m in _MARKERS if (p / m).exists()), p.name)
    )


def resolve_run(models_dir: str | Path, run: str | Path | None = None) -> Path:
    """The run folder named ``run`` (a name under ``models_dir`` or a path); the newest run when ``None``.

    Raises
    ------
    SpecabundError
        When no such run exists (the message lists the available runs and how to make one).
    """
    models_dir = Path(models_dir)
    runs = list_runs(models_dir)
    if run is None:
        if not runs:
            raise SpecabundError(f"no trained model under {models_dir}; train one with 'specabund train'")
        return runs[-1]
    p = Path(run)
    for cand in (p, models_dir / p):
        if is_run_dir(cand):
            return cand
    names = ", ".join(r.name for r in runs) or "(none)"
    raise SpecabundError(f"model run {str(run)!r} not found under {models_dir}; available runs: {names}")
