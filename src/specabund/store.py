"""Dataset stores: the ``.npz`` file and the chunked, compressed Zarr store, behind one interface.

Both hold the arrays described in :mod:`specabund.dataset` under the same names.

``npz`` (``<set>_dataset.npz``)
    One uncompressed zip of ``.npy`` arrays, loaded whole into memory; the format of small data sets.
``zarr`` (``<set>_dataset.zarr``, a folder)
    A Zarr v3 group. ``X`` and ``ivar`` are chunked along spectra (``chunk_rows`` spectra per chunk, all
    pixels) and compressed (Blosc zstd with bit shuffle); the per-spectrum columns (labels, identifiers,
    split, SNR, ...) are chunked along spectra too. :func:`open_zarr_dataset` reads the columns and leaves
    ``X``/``ivar`` on disk as :class:`LazyRows`, which read only the chunks a selection touches, so a data
    set of 11 million spectra opens in the memory of its columns. A store is written into a hidden
    sibling folder and renamed into place when complete: a killed writer leaves no partial store.

:func:`write_store` writes either format from row blocks (memory bounded by one block);
:func:`choose_format` picks one by size (``auto``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SpecabundError
from .utils import NpzWriter, atomic_write

log = logging.getLogger(__name__)

FORMATS = ("npz", "zarr")
#: ``auto`` writes Zarr when flux + inverse variance of a set would exceed this (bytes in memory).
AUTO_ZARR_BYTES = 1 << 30
#: Default spectra per Zarr chunk of ``X``/``ivar`` (3584 pixels: about 14 MB per chunk uncompressed).
DEFAULT_CHUNK_ROWS = 1000
#: Spectra per chunk of the per-spectrum columns.
COLUMN_CHUNK_ROWS = 100_000
_TMP_PREFIX = ".tmp-"

BlockFn = Callable[[str], Iterable[np.ndarray]]


def suffix(fmt: str) -> str:
    return ".zarr" if fmt == "zarr" else ".npz"


def is_zarr(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".zarr" or (p.is_dir() and (p / "zarr.json").exists())


def choose_format(fmt: str, n_rows: int, n_pixels: int) -> str:
    """``fmt`` itself, or for ``'auto'`` Zarr when ``X`` + ``ivar`` would exceed :data:`AUTO_ZARR_BYTES`."""
    if fmt not in (*FORMATS, "auto"):
        raise SpecabundError(f"unknown dataset format {fmt!r}; use npz, zarr or auto")
    if fmt != "auto":
        return fmt
    return "zarr" if 8 * int(n_rows) * int(n_pixels) > AUTO_ZARR_BYTES else "npz"


def resolve_dataset_path(path: str | Path) -> Path:
    """``path``, or its ``.zarr``/``.npz`` sibling when only that exists (default paths name ``.npz``)."""
    p = Path(path)
    if p.exists() or p.suffix not in (".npz", ".zarr"):
        return p
    other = p.with_suffix(".zarr" if p.suffix == ".npz" else ".npz")
    return other if other.exists() else p


def remove_other_format(path: Path) -> None:
    """Remove the other format's copy of the same set, so a folder never holds two versions of it."""
    other = path.with_suffix(".npz" if path.suffix == ".zarr" else ".zarr")
    if other.is_dir():
        shutil.rmtree(other, ignore_errors=True)
    elif other.exists():
        other.unlink()


# --------------------------------------------------------------------------------------------------
# writing


def write_store(
    path: str | Path,
    *,
    n_rows: int,
    n_pixels: int,
    blocks: BlockFn,
    arrays: dict[str, Any],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Path:
    """Write a dataset store atomically; the format follows the suffix of ``path`` (``.npz``/``.zarr``).

    Parameters
    ----------
    n_rows, n_pixels : int
        Shape of ``X`` and ``ivar``.
    blocks : callable
        ``blocks('X')`` and ``blocks('ivar')`` yield consecutive row blocks (any sizes) of those arrays.
    arrays : dict
        Every other array of the format (``wavelength``, ``elements``, ``y``, ..., ``extra_*``); 0-d arrays
        are scalars (``preprocess_hash``).
    chunk_rows : int
        Spectra per Zarr chunk of ``X``/``ivar``.
    """
    path = Path(path)
    if path.suffix == ".zarr":
        _write_zarr(path, n_rows, n_pixels, blocks, arrays, chunk_rows)
    else:
        with atomic_write(path, "wb") as fh:
            w = NpzWriter(fh)
            w.add_chunks("X", (n_rows, n_pixels), np.float32, blocks("X"))
            w.add_chunks("ivar", (n_rows, n_pixels), np.float32, blocks("ivar"))
            for key, arr in arrays.items():
                w.add_array(key, arr)
            w.close()
    remove_other_format(path)
    return path


def _rechunk(blocks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of row blocks into blocks of exactly ``rows`` rows (the last may be shorter)."""
    pending: list[np.ndarray] = []
    have = 0
    for b in blocks:
        b = np.asarray(b)
        while len(b):
            take = min(rows - have, len(b))
            pending.append(b[:take])
            have += take
            b = b[take:]
            if have == rows:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending, have = [], 0
    if have:
        yield np.concatenate(pending)


def _compressors() -> Any:
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _write_zarr(
    path: Path, n_rows: int, n_pixels: int, blocks: BlockFn, arrays: dict[str, Any], chunk_rows: int
) -> None:
    import zarr

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{_TMP_PREFIX}{path.name}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        g.attrs["specabund_dataset"] = 1
        chunk_rows = max(1, min(int(chunk_rows), max(int(n_rows), 1)))
        for key in ("X", "ivar"):
            a = g.create_array(
                key,
                shape=(n_rows, n_pixels),
                dtype="float32",
                chunks=(chunk_rows, n_pixels),
                compressors=_compressors(),
                fill_value=0.0,
            )
            start = 0
            for b in _rechunk(blocks(key), chunk_rows):
                a[start : start + len(b)] = np.ascontiguousarray(b, dtype=np.float32)
                start += len(b)
            if start != n_rows:
                raise ValueError(f"array {key!r}: got {start} rows, expected {n_rows}")
        for key, arr in arrays.items():
            _put_column(g, key, np.asarray(arr))
        if path.exists():
            old = path.parent / f"{_TMP_PREFIX}{path.name}-old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _put_column(g: Any, key: str, arr: np.ndarray) -> None:
    is_text = arr.dtype.kind in "US"
    dtype: Any = str if is_text else arr.dtype
    if arr.ndim == 0:
        a = g.create_array(key, shape=(), dtype=dtype)
        a[...] = str(arr) if is_text else arr
        return
    chunks = (max(1, min(COLUMN_CHUNK_ROWS, len(arr))), *arr.shape[1:])
    a = g.create_array(key, shape=arr.shape, dtype=dtype, chunks=chunks)
    if arr.size:
        a[...] = arr.astype(str) if is_text else arr


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


# --------------------------------------------------------------------------------------------------
# reading


class LazyRows(np.lib.mixins.NDArrayOperatorsMixin):
    """Rows of a 2-D on-disk array, read on demand; behaves like a read-only numpy array otherwise.

    Indexing by rows (an int, a slice, integer indices or a boolean mask; optionally followed by column
    selections) reads just the chunks it touches and returns numpy. :meth:`subset` gives a lazy view of
    some rows. Anything else (``np.asarray``, ufuncs, ``astype``) reads the whole array into memory, so
    code written for in-memory data keeps working on small stores.
    """

    def __init__(self, array: Any, rows: np.ndarray | None = None) -> None:
        self._arr = array
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    # array-like attributes
    @property
    def shape(self) -> tuple[int, int]:
        n = self._arr.shape[0] if self._rows is None else len(self._rows)
        return (int(n), int(self._arr.shape[1]))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._arr.dtype)

    ndim = 2
    __array_priority__ = 10

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def chunk_rows(self) -> int:
        """Spectra per stored chunk."""
        return int(self._arr.chunks[0])

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyRows(shape={self.shape}, dtype={self.dtype}, chunk_rows={self.chunk_rows})"

    @property
    def base_rows(self) -> np.ndarray:
        """Row numbers of this view in the stored array."""
        return np.arange(self._arr.shape[0]) if self._rows is None else self._rows

    def _read_base(self, base: np.ndarray) -> np.ndarray:
        base = np.asarray(base, dtype=np.int64)
        if len(base) == 0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        lo, hi = int(base.min()), int(base.max()) + 1
        if hi - lo == len(base) and np.all(np.diff(base) == 1):
            return np.asarray(self._arr[lo:hi])
        order = np.argsort(base, kind="stable")
        sorted_base = base[order]
        uniq, inv = np.unique(sorted_base, return_inverse=True)
        block = np.asarray(self._arr.oindex[uniq, :])[inv]
        out = np.empty_like(block)
        out[order] = block
        return out

    def _positions(self, key: Any) -> np.ndarray | int:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            k = int(key)
            if not -n <= k < n:
                raise IndexError(f"row {k} out of range for {n} rows")
            return k % n
        if isinstance(key, slice):
            return np.arange(n)[key]
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} rows")
            return np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"cannot index rows with {idx.dtype}")
        return np.where(idx < 0, idx + n, idx).astype(np.int64)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        pos = self._positions(key)
        if isinstance(pos, int):
            out = self._read_base(np.array([self.base_rows[pos]]))[0]
        else:
            out = self._read_base(pos if self._rows is None else self._rows[pos])
        if rest:
            out = out[(slice(None), *rest)] if not isinstance(pos, int) else out[rest]
        return out

    def subset(self, key: Any) -> LazyRows:
        """A lazy view of the rows ``key`` (mask or indices)."""
        pos = self._positions(key)
        pos = np.atleast_1d(pos)
        return LazyRows(self._arr, pos if self._rows is None else self._rows[pos])

    def iter_blocks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, block)`` of consecutive rows, ``rows`` at a time (default: the chunk size)."""
        rows = rows or self.chunk_rows
        for s in range(0, len(self), rows):
            yield s, self[s : s + rows]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.nbytes > 1 << 30:
            log.info("reading %s (%.1f GB) into memory", self, self.nbytes / 1e9)
        full = self[:]
        return full if dtype is None else full.astype(dtype, copy=False)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        args = [np.asarray(x) if isinstance(x, LazyRows) else x for x in inputs]
        return getattr(ufunc, method)(*args, **kwargs)

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)

    def copy(self) -> np.ndarray:
        return np.asarray(self).copy()

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, b in self.iter_blocks():
            yield from b


def is_lazy(a: Any) -> bool:
    return isinstance(a, LazyRows)


#: Arrays of a dataset that are not one value per spectrum (everything else is).
GLOBAL_ARRAYS = frozenset({"wavelength", "elements", "preprocess_hash"})


def open_zarr_dataset(path: str | Path, rows: slice | None = None) -> dict[str, Any]:
    """The arrays of a Zarr dataset store: ``X``/``ivar`` as :class:`LazyRows`, the rest in memory.

    With ``rows`` (a slice of spectra, step 1) only those rows of the per-spectrum arrays are read (the
    column chunks they touch), e.g. one part of a large store; ``X``/``ivar`` are views of those rows.
    """
    import zarr

    path = Path(path)
    if not path.exists():
        raise SpecabundError(f"{path}: dataset store not found")
    if rows is not None and rows.step not in (None, 1):
        raise ValueError(f"rows must be a slice with step 1, got {rows}")
    try:
        g = zarr.open_group(str(path), mode="r")
        data: dict[str, Any] = {}
        sel = None
        if rows is not None:
            sel = slice(*rows.indices(int(g["X"].shape[0]))[:2])
        for key in g.array_keys():
            a = g[key]
            if key in ("X", "ivar"):
                data[key] = LazyRows(a) if sel is None else LazyRows(a, np.arange(sel.start, sel.stop))
                continue
            if a.ndim == 0:
                v = a[...]
            elif sel is None or key in GLOBAL_ARRAYS:
                v = a[:]
            else:
                v = a[sel]
            v = np.asarray(v)
            if v.dtype.kind in "TO":  # variable-length UTF-8 reads as StringDType
                v = _fixed_width(v)
            data[key] = v
    except SpecabundError:
        raise
    except Exception as exc:
        raise SpecabundError(f"{path}: not a readable dataset store ({exc})") from exc
    return data


def _fixed_width(v: np.ndarray) -> np.ndarray:
    """Variable-length strings as fixed-width unicode (what ``.npz`` files hold)."""
    if v.ndim == 0:
        return np.asarray(str(v[()]))
    width = int(np.strings.str_len(v.astype(np.dtypes.StringDType())).max()) if v.size else 1
    return v.astype(f"<U{max(width, 1)}")


def block_hash(*arrays: Any, rows: int = 4096) -> hashlib._Hash:
    """SHA-256 over the float32 bytes of the arrays in order, reading lazy ones block by block."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, LazyRows):
            for _, b in a.iter_blocks(max(rows, a.chunk_rows)):
                h.update(np.ascontiguousarray(b, dtype=np.float32).tobytes())
        else:
            h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h
