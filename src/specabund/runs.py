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


CHECKPOINT = "checkpoint.pt"


def is_partial_run(path: Path) -> bool:
    """True when ``path`` holds an interrupted training: a ``checkpoint.pt`` (its own, or an ensemble
    member's) but no ``config.json``/``ensemble.json`` yet (those are written when training ends)."""
    path = Path(path)
    if not path.is_dir() or is_run_dir(path):
        return False
    return (path / CHECKPOINT).exists() or any(path.glob(f"member_*/{CHECKPOINT}"))


def resolve_resumable(models_dir: str | Path, run: str | Path) -> Path:
    """The folder of run ``run`` for ``specabund train --resume``: finished or interrupted.

    A run is resumable from its first checkpoint on (written at the end of every epoch).

    Raises
    ------
    SpecabundError
        When no such folder exists (the message lists the runs), or the folder holds no checkpoint: the
        run was stopped before its first epoch ended, so the message says to start it again.
    """
    models_dir = Path(models_dir)
    p = Path(run)
    candidates = [p] if p.is_absolute() else [models_dir / p, p]
    for cand in candidates:
        if is_run_dir(cand) or is_partial_run(cand):
            return cand
    for cand in candidates:
        if cand.is_dir():
            raise _no_checkpoint(cand)
    runs = [r.name for r in list_runs(models_dir)]
    runs += [d.name for d in sorted(models_dir.iterdir()) if is_partial_run(d)] if models_dir.is_dir() else []
    names = ", ".join(runs) or "(none)"
    raise SpecabundError(
        f"model run {str(run)!r} not found under {models_dir}; runs that can be resumed: {names}"
    )


def _no_checkpoint(folder: Path) -> SpecabundError:
    return SpecabundError(
        f"{folder} holds no {CHECKPOINT}: the run was stopped before its first epoch ended, so there is "
        f"nothing to resume; start it again with 'specabund train --run-name {folder.name} --overwrite' "
        "and the options of the first attempt"
    )
