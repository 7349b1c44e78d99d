"""Exception and warning types raised by specabund."""

from __future__ import annotations

from pathlib import Path


class SpecabundError(Exception):
    """Base class of every error specabund raises on purpose."""


class SpecabundWarning(UserWarning):
    """Base class of specabund's own warnings (turned into errors in the test suite)."""


class FitsFormatError(SpecabundError):
    """A file cannot be read as a LAMOST low-resolution spectrum.

    Parameters
    ----------
    path : str or Path
        The offending file.
    reason : str
        What is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CatalogError(SpecabundError):
    """A label catalogue (CSV) is malformed or does not fit the request."""


class ConfigError(SpecabundError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataMismatchError(SpecabundError):
    """Data do not match what a model or dataset expects (grid, config, labels)."""
