"""The preprocessed dataset format (``*_dataset.npz`` or ``*_dataset.zarr``) shared by every stage.

An ``.npz`` written by :func:`save_dataset` loads with plain ``numpy.load`` (no pickle); a ``.zarr`` store
(:mod:`specabund.store`) holds the same arrays chunked and compressed, and loads with ``X``/``ivar`` left
on disk (:class:`~specabund.store.LazyRows`). Both hold:

``X`` (N, P) float32
    continuum-normalised flux on the common grid.
``ivar`` (N, P) float32
    inverse variance of ``X`` (0 = no data).
``wavelength`` (P,) float64
    rest-frame vacuum wavelength grid in Angstrom.
``y`` (N, L) float32
    labels, NaN when missing; column ``j`` is ``elements[j]``.
``y_err`` (N, L) float32
    uncertainty of each label from the catalogue's error column (``MG_FE_ERR``, ``e_mg_fe``, ``teff_err``),
    NaN when unknown or when the label is missing. Datasets written before it existed load with all NaN.
``elements`` (L,) str
    label names in ``C_FE`` form; may include ``TEFF``, ``LOGG``, ``FE_H``, ``M_H``, ``ALPHA_M``, ``MG_H``
    or any other label named when preprocessing.
``filenames``, ``obsid``, ``spec`` (N,) str
    FITS file name, LAMOST obsid (empty string when unknown) and the catalogue's ``spec`` key.
``teff``, ``logg``, ``fe_h``, ``snr`` (N,) float32
    stellar parameters from the catalogue (NaN when absent) and g-band SNR.
``split`` (N,) int8
    0 train, 1 validation, 2 test, -1 not split (prediction data).
``group`` (N,) str
    star identifier: spectra of one star share it (kept in one split).
``preprocess_hash`` () str
    hash of the preprocessing configuration that produced the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataMismatchError, SpecabundError
from .store import (
    GLOBAL_ARRAYS,
    LazyRows,
    is_zarr,
    open_zarr_dataset,
    remove_other_format,
    resolve_dataset_path,
    write_store,
)
from .utils import atomic_savez

SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "none": -1}


@dataclass
class Dataset:
    """In-memory form of a ``*_dataset.npz`` file (see module docstring)."""

    X: np.ndarray
    ivar: np.ndarray
    wavelength: np.ndarray
    y: np.ndarray
    elements: list[str]
    filenames: np.ndarray
    obsid: np.ndarray
    spec: np.ndarray
    teff: np.ndarray
    logg: np.ndarray
    fe_h: np.ndarray
    snr: np.ndarray
    split: np.ndarray
    group: np.ndarray
    preprocess_hash: str = ""
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    #: (N, L) label uncertainties aligned with ``y``; None means unknown (all NaN). A copy made with other
    #: labels (``dataclasses.replace(ds, y=..., elements=...)`` without ``y_err``) gets unknown errors.
    y_err: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.X)
        if self.X.ndim != 2:
            raise DataMismatchError(f"X must be 2-D, got shape {self.X.shape}")
        if self.ivar.shape != self.X.shape:
            raise DataMismatchError(f"ivar shape {self.ivar.shape} != X shape {self.X.shape}")
        if len(self.wavelength) != self.X.shape[1]:
            raise DataMismatchError(f"wavelength has {len(self.wavelength)} pixels, X has {self.X.shape[1]}")
        if self.y.shape != (n, len(self.elements)):
            raise DataMismatchError(f"y shape {self.y.shape} != ({n}, {len(self.elements)})")
        for name in ("filenames", "obsid", "spec", "teff", "logg", "fe_h", "snr", "split", "group"):
            if len(getattr(self, name)) != n:
                raise DataMismatchError(f"{name} has length {len(getattr(self, name))}, X has {n}")
        y_shape = self.y.shape
        if self.y_err is not None and len(self.y_err) != y_shape[0]:
            raise DataMismatchError(f"y_err has {len(self.y_err)} rows, y has {y_shape[0]}")
        if self.y_err is None or np.shape(self.y_err) != y_shape:
            self.y_err = np.full(y_shape, np.nan, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.X)

    @property
    def n_pixels(self) -> int:
        return self.X.shape[1]

    def label_index(self, name: str) -> int:
        try:
            return self.elements.index(name)
        except ValueError:
            raise DataMismatchError(f"label {name!r} not in dataset labels {self.elements}") from None

    def subset(self, index: np.ndarray) -> Dataset:
        """A new dataset with the rows ``index`` (boolean mask or integer indices)."""
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in {"wavelength", "elements", "preprocess_hash"}:
                kw[f.name] = v
            elif f.name == "extra":
                kw[f.name] = {k: a[index] for k, a in v.items()}
            elif isinstance(v, LazyRows):  # stays on disk
                kw[f.name] = v.subset(index)
            else:
                kw[f.name] = v[index]
        return Dataset(**kw)

    def split_subset(self, which: str) -> Dataset:
        """The rows of split ``'train'``, ``'val'`` or ``'test'``."""
        return self.subset(self.split == SPLIT_CODES[which])

    @classmethod
    def concatenate(cls, parts: list[Dataset]) -> Dataset:
        if not parts:
            raise SpecabundError("cannot concatenate zero datasets")
        first = parts[0]
        for p in parts[1:]:
            if p.elements != first.elements or not np.array_equal(p.wavelength, first.wavelength):
                raise DataMismatchError("datasets differ in labels or wavelength grid")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in {"wavelength", "elements", "preprocess_hash"}:
                kw[f.name] = getattr(first, f.name)
            elif f.name == "extra":
                keys = set(first.extra)
                kw[f.name] = {k: np.concatenate([p.extra[k] for p in parts]) for k in keys}
            else:
                kw[f.name] = np.concatenate([getattr(p, f.name) for p in parts])
        return cls(**kw)


def save_dataset(path: str | Path, ds: Dataset, chunk_rows: int = 1000) -> None:
    """Write ``ds`` atomically as an uncompressed npz (strings as fixed-width unicode, no pickle), or as a
    Zarr store when ``path`` ends in ``.zarr`` (``chunk_rows`` spectra per chunk)."""
    if Path(path).suffix == ".zarr":
        X, ivar = ds.X, ds.ivar

        def blocks(key: str) -> Any:
            a = X if key == "X" else ivar
            for s in range(0, len(ds), chunk_rows):
                yield np.asarray(a[s : s + chunk_rows], dtype=np.float32)

        write_store(
            path,
            n_rows=len(ds),
            n_pixels=ds.n_pixels,
            blocks=blocks,
            arrays=_columns_of(ds),
            chunk_rows=chunk_rows,
        )
        return
    arrays: dict[str, Any] = {
        "X": ds.X.astype(np.float32, copy=False),
        "ivar": ds.ivar.astype(np.float32, copy=False),
        **_columns_of(ds),
    }
    atomic_savez(path, **arrays)
    remove_other_format(Path(path))


def _columns_of(ds: Dataset) -> dict[str, Any]:
    """Every array of the format except ``X`` and ``ivar``."""
    arrays: dict[str, Any] = {
        "wavelength": ds.wavelength.astype(np.float64, copy=False),
        "y": ds.y.astype(np.float32, copy=False),
        "y_err": np.asarray(ds.y_err, dtype=np.float32),
        "elements": np.asarray(ds.elements, dtype=str),
        "filenames": np.asarray(ds.filenames, dtype=str),
        "obsid": np.asarray(ds.obsid, dtype=str),
        "spec": np.asarray(ds.spec, dtype=str),
        "teff": ds.teff.astype(np.float32, copy=False),
        "logg": ds.logg.astype(np.float32, copy=False),
        "fe_h": ds.fe_h.astype(np.float32, copy=False),
        "snr": ds.snr.astype(np.float32, copy=False),
        "split": ds.split.astype(np.int8, copy=False),
        "group": np.asarray(ds.group, dtype=str),
        "preprocess_hash": np.asarray(ds.preprocess_hash, dtype=str),
    }
    for k, v in ds.extra.items():
        arrays[f"extra_{k}"] = v
    return arrays


def load_dataset(path: str | Path, rows: slice | None = None) -> Dataset:
    """Read a dataset written by :func:`save_dataset` (``allow_pickle=False``) or a Zarr store.

    A ``.npz`` path that does not exist is read from its ``.zarr`` sibling when that exists (and the other
    way round). A Zarr store's ``X`` and ``ivar`` stay on disk (:class:`~specabund.store.LazyRows`).

    Parameters
    ----------
    path : path
        The ``.npz`` file or ``.zarr`` store.
    rows : slice, optional
        Only these spectra (step 1), as ``load_dataset(path).subset(rows)`` would give: a Zarr store reads
        just their rows of every per-spectrum column (not all columns whole), an ``.npz`` is read whole.

    Raises
    ------
    SpecabundError
        When the file is missing or lacks a required array (the message names the file).
    """
    path = resolve_dataset_path(path)
    if not path.exists():
        raise SpecabundError(f"{path}: dataset file not found")
    if is_zarr(path):
        data = open_zarr_dataset(path, rows)
    else:
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as exc:  # zip/format errors
            raise SpecabundError(f"{path}: not a readable dataset npz ({exc})") from exc
        if rows is not None:
            n_all = len(data["X"]) if "X" in data else 0
            if rows.step not in (None, 1):
                raise ValueError(f"rows must be a slice with step 1, got {rows}")
            sel = slice(*rows.indices(n_all)[:2])
            data = {k: v if k in GLOBAL_ARRAYS or np.ndim(v) == 0 else v[sel] for k, v in data.items()}
    required = ["X", "wavelength", "y", "elements", "filenames"]
    missing = [k for k in required if k not in data]
    if missing:
        raise SpecabundError(f"{path}: dataset lacks arrays {missing}")
    n = len(data["X"])
    nan = np.full(n, np.nan, dtype=np.float32)
    y = data["y"] if np.ndim(data["y"]) == 2 else data["y"].reshape(n, -1)
    y_err = data.get("y_err")
    empty = np.full(n, "", dtype="<U1")
    return Dataset(
        X=data["X"],
        ivar=data["ivar"] if "ivar" in data else np.ones(data["X"].shape, dtype=np.float32),
        wavelength=data["wavelength"],
        y=y,
        elements=[str(e) for e in data["elements"].tolist()],
        filenames=data["filenames"],
        obsid=data.get("obsid", empty),
        spec=data.get("spec", data["filenames"]),
        teff=data.get("teff", nan),
        logg=data.get("logg", nan),
        fe_h=data.get("fe_h", nan),
        snr=data.get("snr", nan),
        split=data.get("split", np.full(n, -1, dtype=np.int8)),
        group=data.get("group", data["filenames"]),
        preprocess_hash=str(data.get("preprocess_hash", np.asarray(""))),
        extra={k[6:]: v for k, v in data.items() if k.startswith("extra_")},
        y_err=None if y_err is None or y_err.size != y.size else y_err.reshape(y.shape),
    )
