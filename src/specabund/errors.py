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


#: Plain-words explanations of the OS errors a user can act on, by errno name.
_OS_HINTS = {
    "ENOSPC": "no space left on the device",
    "EDQUOT": "disk quota exceeded",
    "EROFS": "read-only file system",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "ENOTDIR": "a parent of the path is a file, not a folder",
    "EISDIR": "the path is a folder, not a file",
    "EFBIG": "file too large for the file system",
    "ENAMETOOLONG": "file name too long",
    "EEXIST": "the path already exists",
    "ENOENT": "no such file or folder",
    "EIO": "input/output error (failing disk or lost network share)",
}


def describe_os_error(exc: OSError) -> str:
    """The cause of an OS error in words (``'no space left on the device'``) with its errno name."""
    import errno as _errno

    name = _errno.errorcode.get(exc.errno or 0, "")
    hint = _OS_HINTS.get(name) or (exc.strerror or str(exc)).rstrip(".")
    return f"{hint} ({name})" if name else hint


class OutputError(SpecabundError, OSError):
    """Writing an output failed (full disk, read-only folder, a path under a file, ...).

    Also an :class:`OSError` (``errno``, ``strerror`` and ``filename`` are those of the cause, with the
    output path as ``filename``), so code catching ``OSError`` keeps working.

    Parameters
    ----------
    path : str or Path
        The output that could not be written.
    cause : OSError
        The underlying error.
    """

    def __init__(self, path: str | Path, cause: OSError) -> None:
        OSError.__init__(self, cause.errno, cause.strerror or str(cause), str(path))
        self.path = str(path)
        self.cause = cause
        other = cause.filename
        self.detail = f" ({other})" if other and str(other) != self.path else ""

    def __str__(self) -> str:
        return f"cannot write {self.path}: {describe_os_error(self.cause)}{self.detail}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.cause))


class LockedError(SpecabundError):
    """An output folder is in use by another running specabund command."""


class ManifestError(DataMismatchError):
    """A model folder's files do not match its ``manifest.json`` (edited, swapped or corrupt)."""
