"""Shared fixtures. Tests that need ../shared skip without it, except under CI where that is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPECABUND_SHARED", ROOT.parent / "shared"))
LAMOST_DIR = SHARED / "data" / "lamost"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def lamost_dir() -> Path:
    """The folder of real LAMOST test files (../shared/data/lamost)."""
    if not LAMOST_DIR.is_dir():
        if _in_ci():
            pytest.fail(f"CI=true but the real LAMOST files are missing: {LAMOST_DIR}")
        pytest.skip(f"real LAMOST files not available at {LAMOST_DIR}")
    return LAMOST_DIR


@pytest.fixture(autouse=True)
def _matplotlib_agg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
