"""Small shared helpers: atomic writes, hashing, JSON-safe conversion, pixels without data."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import ConfigError, DataMismatchError, OutputError, SpecabundError

#: A ``map(function, items)`` that returns the results in the order of ``items``.
MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]

#: Errors that concern the file being written whatever path they name.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _is_write_error(exc: BaseException, path: Path, tmp: str) -> bool:
    """Whether ``exc`` is an OS error about writing ``path`` (not, e.g., about reading an input meanwhile)."""
    if not isinstance(exc, OSError) or isinstance(exc, SpecabundError):
        return False
    if exc.errno in _WRITE_ERRNOS or exc.filename is None:
        return exc.errno is not None
    return str(exc.filename) in (tmp, str(path), str(path.parent))


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and rename it onto ``path`` on success.

    A crash or exception leaves the old ``path`` (if any) untouched and removes the
    temporary file, so readers never see a half-written file.

    Raises
    ------
    OutputError
        The folder cannot be created or written, or the disk is full (names ``path`` and the cause).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(path, exc) from exc
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if _is_write_error(exc, path, tmp):
            assert isinstance(exc, OSError)
            raise OutputError(path, exc) from exc
        raise


def ensure_dir(path: str | Path) -> Path:
    """Create the folder ``path`` (and its parents) if needed and return it.

    Raises
    ------
    OutputError
        It cannot be created (read-only file system, a parent is a file, no permission, ...).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(path, exc) from exc
    if not path.is_dir():
        raise OutputError(path, NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path)))
    return path


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(len(os.sched_getaffinity(0)), 1)
        except OSError:
            pass
    return max(os.cpu_count() or 1, 1)


def cap_workers(requested: int, what: str = "workers") -> tuple[int, str | None]:
    """Bound a number of worker processes or threads by the CPUs available.

    Returns
    -------
    n : int
        ``requested`` if it is at most :func:`available_cpus`, else that number.
    message : str or None
        Why it was lowered (``None`` when it was not), for the command line to show.
    """
    cpus = available_cpus()
    requested = int(requested)
    if requested <= cpus:
        return max(requested, 1), None
    return cpus, f"{what} = {requested} is more than the {cpus} CPU(s) available; using {cpus}"


@contextlib.contextmanager
def process_map(n_workers: int, batch_size: int | str = "auto") -> Iterator[MapFn]:
    """A ``map(function, items)`` over worker processes, the pool kept open for the ``with`` block.

    The one parallel map of the package (preprocessing, simulation): joblib's process pool handing
    ``batch_size`` items to a worker at once, its results coming back lazily and in order; the built-in
    ``map`` for one worker. ``function`` must be picklable (a module-level function).

    Parameters
    ----------
    n_workers : int
        Worker processes; 1 or less runs in this process.
    batch_size : int or 'auto'
        Items handed to a worker at once.

    Yields
    ------
    callable
        ``map(function, items)`` returning an iterable of results in the order of ``items``.
    """
    if n_workers <= 1:
        yield map
        return
    from joblib import Parallel, delayed

    with Parallel(n_jobs=n_workers, batch_size=batch_size, return_as="generator") as par:

        def pmap(function: Callable[[Any], Any], items: Iterable[Any]) -> Iterable[Any]:
            return par(delayed(function)(x) for x in items)

        yield pmap


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    return {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(shape),
    }


class NpzWriter:
    """Write an uncompressed ``.npz`` deterministically, optionally streaming arrays chunk by chunk.

    Zip entries get a fixed time stamp, so the same arrays always give the same bytes, and an array can be
    written from an iterator of row blocks without holding it in memory. Object arrays are refused
    (the file must load with ``allow_pickle=False``).
    """

    def __init__(self, fh: IO[bytes]) -> None:
        self._zf = zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def abandon(self) -> None:
        """Drop an archive whose writing failed without finishing it.

        Nothing more is written to the file, and the archive's finaliser does not try to write its central
        directory into the (by then closed) file, which would print "Exception ignored ... seek of closed
        file" after the real error.
        """
        self._zf.fp = None

    def add_array(self, name: str, arr: Any) -> None:
        arr = np.asarray(arr)
        self.add_chunks(name, arr.shape, arr.dtype, [arr])

    def add_chunks(self, name: str, shape: tuple[int, ...], dtype: Any, chunks: Iterable[np.ndarray]) -> None:
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype object; npz files must load without pickle")
        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        written = 0
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) else dtype.itemsize
        try:
            with self._zf.open(info, "w", force_zip64=True) as out:
                np.lib.format.write_array_header_2_0(out, _npy_header(shape, dtype))
                for chunk in chunks:
                    c = np.ascontiguousarray(chunk, dtype=dtype)
                    out.write(c.tobytes())
                    written += c.nbytes
        except BaseException:
            self.abandon()
            raise
        expected = row_bytes * (shape[0] if len(shape) else 1)
        if written != expected:
            raise ValueError(f"array {name!r}: wrote {written} bytes, shape {shape} needs {expected}")

    def close(self) -> None:
        self._zf.close()


def atomic_savez(path: str | Path, **arrays: Any) -> None:
    """Write an uncompressed ``.npz`` atomically and deterministically. Object arrays are refused."""
    for key, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"array {key!r} has dtype object; npz files must load without pickle")
    with atomic_write(path, "wb") as fh, NpzWriter(fh) as w:
        for key, arr in arrays.items():
            w.add_array(key, arr)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and nested containers into JSON-serialisable objects."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (NaN/inf become null)."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def hash_bytes(*chunks: bytes) -> str:
    """SHA-256 hex digest of the concatenated chunks."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """Stable SHA-256 of a JSON-serialisable object (keys sorted)."""
    return hash_bytes(json.dumps(to_jsonable(obj), sort_keys=True).encode())


def hash_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def reject_unknown_keys(cls: type, data: Mapping[str, Any], what: str) -> None:
    """Raise :class:`ConfigError` naming the keys of ``data`` that are not fields of the dataclass ``cls``.

    ``what`` names the keys in the message, e.g. ``'model config keys'``.
    """
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def finite_float32(values: Any) -> np.ndarray:
    """``values`` as float32, with anything float32 cannot hold (|x| beyond its range, inf) as NaN."""
    a = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(a) & (np.abs(a) <= np.finfo(np.float32).max)
    return np.where(ok, a, np.nan).astype(np.float32)


def usable_pixels(flux: np.ndarray, ivar: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the pixels with data: finite flux and (when given) finite, positive ``ivar``.

    Parameters
    ----------
    flux : ndarray
        Continuum-normalised flux, any shape.
    ivar : ndarray, optional
        Inverse variance of ``flux``, same shape; when omitted only non-finite fluxes are unusable.

    Returns
    -------
    ndarray of bool
        True where the pixel can be used.

    Raises
    ------
    DataMismatchError
        When ``ivar`` and ``flux`` differ in shape.
    """
    good = np.isfinite(flux)
    if ivar is not None:
        iv = np.asarray(ivar)
        if iv.shape != np.shape(flux):
            raise DataMismatchError(f"ivar shape {iv.shape} != X shape {np.shape(flux)}")
        good &= np.isfinite(iv) & (iv > 0)
    return good


def fill_bad_pixels(
    X: np.ndarray, ivar: np.ndarray | None = None, fill: float = 1.0, dtype: Any = np.float32
) -> np.ndarray:
    """Return a copy of ``X`` with unusable pixels replaced by ``fill`` (the continuum, 1.0).

    A pixel is unusable when its flux is not finite or its inverse variance is zero, negative or not
    finite (:func:`usable_pixels`).

    Parameters
    ----------
    X : ndarray, shape (N, P)
        Continuum-normalised flux.
    ivar : ndarray, shape (N, P), optional
        Inverse variance of ``X``; when omitted only non-finite fluxes are replaced.
    fill : float
        Replacement value.
    dtype : numpy dtype
        Type of the copy (float32 by default).

    Returns
    -------
    ndarray
        The filled copy.
    """
    out = np.array(X, dtype=dtype, copy=True)
    out[~usable_pixels(out, ivar)] = fill
    return out
