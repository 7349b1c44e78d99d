"""What the prediction stage reads: a preprocessed dataset, or raw FITS files preprocessed on the fly.

Raw files are preprocessed with :func:`specabund.preprocess.process_file` and exactly the options the model
was trained with (:func:`resolve_preprocess`). Every input spectrum gets a row; those that cannot be read,
fail a quality cut or (with a catalogue) have no file keep their status as the reason and no flux.
"""

from __future__ import annotations

import glob as globmod
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..catalog import Catalog, match_catalog, read_catalog, spec_key
from ..dataset import Dataset
from ..errors import ConfigError, DataMismatchError, SpecabundError
from ..io import FITS_SUFFIXES, iter_fits_files
from ..preprocess import PreprocessOptions, preprocess_hash, process_file
from ..preprocess.steps import log_linear_grid
from ..utils import finite_float32
from .uncertainty import Predictor

logger = logging.getLogger(__name__)


@dataclass
class PredictionInputs:
    """Spectra to predict, one row per input (``status == 'ok'`` rows carry flux).

    Attributes
    ----------
    spec, obsid, filename, group : numpy.ndarray of str
        ``(N,)`` identifiers; ``group`` names the star (repeat observations share it).
    snr : numpy.ndarray
        ``(N,)`` SNR (NaN when unknown).
    status : numpy.ndarray of str
        ``'ok'`` or why the spectrum has no prediction.
    X, ivar : numpy.ndarray
        ``(n_ok, P)`` flux and inverse variance of the ``ok`` rows, in row order.
    wavelength : numpy.ndarray
        ``(P,)`` grid.
    preprocess_hash : str
        Hash of the preprocessing that produced ``X``.
    reference : dict of str to numpy.ndarray
        Reference labels ``(N,)`` (NaN when absent), e.g. GALAH values of a prediction catalogue.
    """

    spec: np.ndarray
    obsid: np.ndarray
    filename: np.ndarray
    group: np.ndarray
    snr: np.ndarray
    status: np.ndarray
    X: np.ndarray
    ivar: np.ndarray
    wavelength: np.ndarray
    preprocess_hash: str
    reference: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.spec)
        for name in ("obsid", "filename", "group", "snr", "status"):
            if len(getattr(self, name)) != n:
                raise DataMismatchError(f"{name} has {len(getattr(self, name))} rows, spec has {n}")
        if len(self.X) != int(self.ok.sum()) or self.X.shape != self.ivar.shape:
            raise DataMismatchError("X/ivar must hold exactly the rows with status 'ok'")

    def __len__(self) -> int:
        return len(self.spec)

    @property
    def ok(self) -> np.ndarray:
        return np.asarray(self.status) == "ok"

    def as_dataset(self) -> Dataset:
        """The ``ok`` rows as a :class:`~specabund.dataset.Dataset` (for compatibility checks)."""
        ok = self.ok
        labels = list(self.reference)
        y = np.stack([self.reference[k][ok] for k in labels], axis=1) if labels else np.zeros((ok.sum(), 0))
        nan = np.full(int(ok.sum()), np.nan, dtype=np.float32)
        return Dataset(
            X=self.X,
            ivar=self.ivar,
            wavelength=self.wavelength,
            y=y.astype(np.float32),
            elements=labels,
            filenames=self.filename[ok],
            obsid=self.obsid[ok],
            spec=self.spec[ok],
            teff=nan,
            logg=nan,
            fe_h=nan,
            snr=finite_float32(self.snr[ok]),
            split=np.full(int(ok.sum()), -1, dtype=np.int8),
            group=self.group[ok],
            preprocess_hash=self.preprocess_hash,
        )

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PredictionInputs:
        """Every row of a preprocessed dataset (labels that are not all NaN become the reference)."""
        ref = {lab: ds.y[:, j].astype(np.float64) for j, lab in enumerate(ds.elements)}
        ref = {k: v for k, v in ref.items() if np.isfinite(v).any()}
        return cls(
            spec=np.asarray(ds.spec, dtype=str),
            obsid=np.asarray(ds.obsid, dtype=str),
            filename=np.asarray(ds.filenames, dtype=str),
            group=np.asarray(ds.group, dtype=str),
            snr=np.asarray(ds.snr, dtype=np.float64),
            status=np.full(len(ds), "ok", dtype=object).astype(str),
            X=np.asarray(ds.X, dtype=np.float32),
            ivar=np.asarray(ds.ivar, dtype=np.float32),
            wavelength=np.asarray(ds.wavelength, dtype=np.float64),
            preprocess_hash=str(ds.preprocess_hash),
            reference=ref,
        )

    @classmethod
    def from_fits(
        cls,
        files: Sequence[Path],
        options: PreprocessOptions,
        *,
        normalize: bool = True,
        catalog: Catalog | None = None,
        fits_dir: Path | None = None,
        n_workers: int = 1,
    ) -> PredictionInputs:
        """Preprocess raw FITS files (one row each; with a catalogue, rows in catalogue order, then files
        the catalogue does not name, then catalogue rows without a file).

        The catalogue gives ``spec`` names, radial velocities (``rv``, which win over the header), SNR,
        ``group`` and reference labels.
        """
        files = [Path(f) for f in files]
        if catalog is not None:
            root = fits_dir if fits_dir is not None else _common_dir(files)
            match = match_catalog(catalog, files, root)
            ordered = list(match.files) + list(match.unmatched_files)
            rows: list[int | None] = [int(r) for r in match.rows] + [None] * len(match.unmatched_files)
            missing = match.unmatched_rows
            table = catalog.table
        else:
            ordered, rows, missing, table = list(files), [None] * len(files), [], None
        rv: list[float | None] = []
        for r in rows:
            v = None
            if table is not None and r is not None and "rv" in table:
                x = float(table["rv"].iloc[r])
                v = x if np.isfinite(x) else None
            rv.append(v)
        results = _run_files(ordered, rv, options, normalize, n_workers)
        n = len(ordered) + len(missing)
        spec = np.empty(n, dtype=object)
        group = np.empty(n, dtype=object)
        obsid = np.full(n, "", dtype=object)
        fname = np.full(n, "", dtype=object)
        snr = np.full(n, np.nan)
        status = np.empty(n, dtype=object)
        labels = list(catalog.label_names) if catalog is not None else []
        ref = {lab: np.full(n, np.nan) for lab in labels}
        cat_y = catalog.labels(labels) if catalog is not None else np.zeros((0, 0))
        fluxes, ivars = [], []
        for i, (path, r, res) in enumerate(zip(ordered, rows, results, strict=True)):
            spec[i] = str(table["spec"].iloc[r]) if table is not None and r is not None else path.name
            obsid[i] = res["obsid"]
            fname[i] = path.name
            status[i] = res["status"]
            g = ""
            if table is not None and r is not None and "group" in table:
                g = str(table["group"].iloc[r])
                g = "" if g in ("", "nan", "None") else g
            group[i] = g or res["designation"] or spec_key(path.name)
            s = res["snr_header"] if np.isfinite(res["snr_header"]) else res["snr_measured"]
            if not np.isfinite(s) and table is not None and r is not None and "snr" in table:
                s = float(table["snr"].iloc[r])
            snr[i] = s
            if table is not None and r is not None:
                for lab, v in zip(labels, cat_y[r], strict=True):
                    ref[lab][i] = v
            if res["status"] == "ok":
                fluxes.append(res["flux"])
                ivars.append(res["ivar"])
        for k, (name, reason) in enumerate(missing):
            i = len(ordered) + k
            spec[i], group[i], status[i] = name, spec_key(name), reason
        grid = log_linear_grid(options.wave_min, options.wave_max, options.log_step)
        empty = np.zeros((0, len(grid)), dtype=np.float32)
        return cls(
            spec=spec.astype(str),
            obsid=obsid.astype(str),
            filename=fname.astype(str),
            group=group.astype(str),
            snr=snr,
            status=status.astype(str),
            X=np.stack(fluxes).astype(np.float32) if fluxes else empty,
            ivar=np.stack(ivars).astype(np.float32) if ivars else empty.copy(),
            wavelength=grid,
            preprocess_hash=preprocess_hash(options, normalize),
            reference={k: v for k, v in ref.items() if np.isfinite(v).any()},
        )


def _process_one(args: tuple[Path, float | None, PreprocessOptions, bool]) -> dict[str, Any]:
    return process_file(*args)


def _run_files(
    files: list[Path], rv: list[float | None], options: PreprocessOptions, normalize: bool, n_workers: int
) -> list[dict[str, Any]]:
    args = [(f, v, options, normalize) for f, v in zip(files, rv, strict=True)]
    if n_workers > 1 and len(args) > 1:
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            return list(pool.map(_process_one, args, chunksize=8))
    return [_process_one(a) for a in args]


def _common_dir(files: Sequence[Path]) -> Path:
    if not files:
        return Path(".")
    parents = [str(Path(f).resolve().parent) for f in files]
    return Path(os.path.commonpath(parents))


def collect_files(
    fits_dir: Path | None = None, files: str | None = None, pattern: str | None = None
) -> tuple[list[Path], Path | None]:
    """FITS files from a folder (recursive), a glob, or a text file listing one path per line.

    Returns the files and the folder relative paths refer to. A listed path that does not exist is kept
    (it gets an 'unreadable' row).
    """
    if (fits_dir is None) == (files is None):
        raise ConfigError("give either a FITS folder or a file glob/list")
    if fits_dir is not None:
        if not Path(fits_dir).is_dir():
            raise SpecabundError(f"{fits_dir}: FITS folder not found (or not a folder)")
        return iter_fits_files(fits_dir, pattern), Path(fits_dir)
    assert files is not None
    p = Path(files)
    if p.is_file() and not p.name.lower().endswith(FITS_SUFFIXES):
        base = p.parent
        out = []
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise SpecabundError(
                f"{p}: a list of FITS files must be UTF-8 text, one path per line ({exc.reason} at byte "
                f"{exc.start})"
            ) from exc
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                q = Path(line)
                out.append(q if q.is_absolute() else base / q)
        return out, None
    if p.is_file():
        return [p], p.parent
    found = sorted(Path(x) for x in globmod.glob(files, recursive=True))
    found = [f for f in found if f.is_file() and f.name.lower().endswith(FITS_SUFFIXES)]
    if not found:
        raise SpecabundError(f"no FITS file matches {files!r}")
    return found, None


def _options_from_json(path: Path) -> tuple[PreprocessOptions, bool]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read preprocessing configuration ({exc})") from exc
    return _options_from_dict(data, str(path))


def _options_from_dict(data: dict[str, Any], where: str) -> tuple[PreprocessOptions, bool]:
    if "options" in data:  # a preprocess manifest.json
        opts = dict(data["options"])
        normalize = bool(data.get("settings", {}).get("normalize", data.get("normalize", True)))
    else:
        opts = {k: v for k, v in data.items() if k != "normalize"}
        normalize = bool(data.get("normalize", True))
    try:
        return PreprocessOptions.from_dict(opts), normalize
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def resolve_preprocess(
    predictor: Predictor, explicit: Path | None = None, candidates: Iterable[Path] = ()
) -> tuple[PreprocessOptions, bool, str]:
    """The preprocessing options the model was trained with, checked against its ``preprocess_hash``.

    Tried in order: ``config.json['preprocess_options']`` (when the trainer stores it), ``explicit`` (a
    ``manifest.json`` or an options JSON: a mismatching hash is an error), each of ``candidates`` (e.g. the
    training data's ``manifest.json``), and the default options.

    Returns
    -------
    options, normalize, source

    Raises
    ------
    DataMismatchError
        ``explicit`` does not reproduce the model's hash, or nothing does.
    """
    want = str(predictor.preprocess_hash)
    cfg = predictor.config
    if isinstance(cfg.get("preprocess_options"), dict):
        opts, norm = _options_from_dict(cfg["preprocess_options"], "config.json preprocess_options")
        if preprocess_hash(opts, norm) == want:
            return opts, norm, "config.json"
        logger.warning("config.json preprocess_options do not reproduce the model's preprocess_hash")
    if explicit is not None:
        opts, norm = _options_from_json(Path(explicit))
        got = preprocess_hash(opts, norm)
        if got != want:
            raise DataMismatchError(
                f"{explicit}: these preprocessing options have hash {got!r}, the model was trained on "
                f"data with preprocess_hash {want!r}"
            )
        return opts, norm, str(explicit)
    for cand in candidates:
        cand = Path(cand)
        if cand.exists():
            try:
                opts, norm = _options_from_json(cand)
            except ConfigError:
                continue
            if preprocess_hash(opts, norm) == want:
                return opts, norm, str(cand)
    for norm in (True, False):
        opts = PreprocessOptions()
        if preprocess_hash(opts, norm) == want:
            return opts, norm, "defaults" + ("" if norm else " (normalize=false)")
    raise DataMismatchError(
        f"cannot reconstruct the preprocessing of model {predictor.run_dir} (preprocess_hash {want!r}): "
        "give the training data's manifest.json with --preprocess-config"
    )


def read_prediction_catalog(path: Path) -> Catalog:
    """A catalogue that may hold only ``spec`` (plus optional rv, snr, group and reference labels)."""
    return read_catalog(path, None, require_labels=False)
