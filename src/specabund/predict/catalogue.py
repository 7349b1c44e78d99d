"""The prediction run: uncertainties, calibration, OOD flags and the output catalogue.

Outputs in ``out_dir``:

``predictions.csv`` and ``predictions.fits`` (binary table, same columns)
    ``spec``, ``obsid``, then for every label ``<LABEL>``, ``<LABEL>_err`` (total, calibrated),
    ``<LABEL>_err_model``, ``<LABEL>_err_data`` (both calibrated with the same factor, so
    ``err**2 = err_model**2 + err_data**2``), then ``flag`` and ``flag_reason``, then ``filename``,
    ``group``, ``snr``, ``ood_mahalanobis``, ``ood_residual`` and, when reference labels exist,
    ``<LABEL>_ref``. One row per input spectrum, in input order.
``flag`` (int bitmask; 0 = fine)
    ``1`` no prediction (file unreadable, failed a quality cut, or catalogue row without file; the label
    columns are empty); ``2`` a predicted label outside the training label range; ``4`` spectrum far from
    the training spectra (PCA Mahalanobis distance above the reference's 99.5th percentile); ``8`` spectrum
    poorly reconstructed by the training PCA (residual above the 99.5th percentile); see :mod:`.ood`.
``flag_reason``
    ``'; '``-joined human-readable reasons ('' when ``flag == 0``).
``summary.json``
    counts, flags, settings, calibration state, speed and the list of files of the run (``files``).
With reference labels: ``metrics.json``, ``metrics.csv``, ``<LABEL>_one_to_one.png``,
``residual_histograms.png``, ``<LABEL>_distribution.png``.
With repeat observations (a group with two or more predicted spectra): ``repeats.csv``, ``repeats.json``,
``repeats_pulls.png`` (see :mod:`.repeats`).
Per-batch results (``batch_root/prediction_<LABEL>_batch_results/``): per batch of ``chunk_size`` spectra
a distribution plot and a row of statistics (and metrics against the reference) in ``batch_tracking.csv``,
plus the trend plot and summary (:class:`~specabund.tracking.BatchTracker`).

All-or-nothing: the files of ``out_dir`` are first written into a hidden staging folder inside it and
moved into place only when every one of them was written, so an error (full disk, an unwritable value)
or a kill leaves the previous run's catalogue, summary and reports as they were, and no partial file.
Files of the previous run that the new one does not write (e.g. ``metrics.json`` when the new input has
no reference labels) are removed, so the folder always describes one run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import OutputError
from ..metrics import regression_metrics
from ..plotting import save_figure
from ..tracking import TRACKING_FILE, BatchTracker
from ..training import plots as train_plots
from ..utils import atomic_write, atomic_write_json, atomic_write_text, ensure_dir
from ..workspace import batch_results_dir
from .calibration import LEVELS, StoredCalibration, coverage, load_stored, mode_name, z_scores
from .inputs import PredictionInputs
from .ood import out_of_range
from .plots import distribution_figure
from .repeats import repeat_pairs, write_repeats
from .uncertainty import Predictor, UncertainPrediction, predict_with_uncertainty, validate_labels

logger = logging.getLogger(__name__)

FLAG_FAILED = 1
FLAG_LABEL_RANGE = 2
FLAG_SPECTRUM_FAR = 4
FLAG_SPECTRUM_RESIDUAL = 8
FLAG_BITS = {
    "failed": FLAG_FAILED,
    "label_out_of_range": FLAG_LABEL_RANGE,
    "spectrum_far": FLAG_SPECTRUM_FAR,
    "spectrum_residual": FLAG_SPECTRUM_RESIDUAL,
}


def contract_columns(labels: Sequence[str]) -> list[str]:
    """The columns scripts rely on, in order."""
    cols = ["spec", "obsid"]
    for lab in labels:
        cols += [lab, f"{lab}_err", f"{lab}_err_model", f"{lab}_err_data"]
    return [*cols, "flag", "flag_reason"]


def _fits_text(x: Any) -> str:
    """FITS tables hold ASCII only: other characters become Python escapes (``é`` -> ``\\xe9``)."""
    return str(x).encode("ascii", "backslashreplace").decode("ascii").replace("\0", "\\x00")


def write_table(df: pd.DataFrame, out_dir: Path, stem: str = "predictions") -> tuple[Path, Path]:
    """Write ``df`` as ``<stem>.csv`` (UTF-8) and a FITS binary table ``<stem>.fits`` (both atomic).

    FITS strings are ASCII: non-ASCII characters of text columns (e.g. a ``spec`` name with accents) are
    written as backslash escapes there (``\\xe9``, ``\\u2013``) and kept as they are in the CSV.
    """
    from astropy.table import Table

    csv_path = out_dir / f"{stem}.csv"
    fits_path = out_dir / f"{stem}.fits"
    t = Table()
    escaped = False
    for col in df.columns:
        v = df[col].to_numpy()
        if v.dtype == object or v.dtype.kind == "U":
            text = [str(x) for x in v]
            safe = [_fits_text(x) for x in text]
            escaped = escaped or safe != text
            v = np.array(safe, dtype=str)
            if v.dtype.itemsize == 0 or len(v) == 0:
                v = v.astype("U1")
        t[_fits_text(col)] = v
    if escaped:
        t.meta["comments"] = ["non-ASCII characters of text columns are written as backslash escapes"]
    buf = io.BytesIO()
    t.write(buf, format="fits")
    with atomic_write(csv_path, "w", encoding="utf-8", newline="") as fh:
        df.to_csv(fh, index=False)
    with atomic_write(fits_path, "wb") as fh:
        fh.write(buf.getvalue())
    return csv_path, fits_path


def _chunk_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class CatalogueResult:
    """The catalogue of :func:`predict_catalogue` and what it was made with.

    Attributes
    ----------
    table : DataFrame
        The catalogue columns (module docstring), one row per input spectrum, in input order.
    labels : list of str
        The labels predicted.
    calibration : StoredCalibration
        The calibration and OOD reference used.
    scale : numpy.ndarray
        The uncertainty scale applied per label (ones when uncalibrated).
    flag : numpy.ndarray
        The ``flag`` column.
    meta : dict
        ``n_samples`` and ``n_members`` of the prediction.
    predict_seconds : float
        Time spent in the network.
    """

    table: pd.DataFrame
    labels: list[str]
    calibration: StoredCalibration
    scale: np.ndarray
    flag: np.ndarray
    meta: dict[str, Any]
    predict_seconds: float


ChunkHook = Callable[[int, UncertainPrediction, np.ndarray, np.ndarray], None]


def predict_catalogue(
    predictor: Predictor,
    inputs: PredictionInputs,
    *,
    labels: Sequence[str] | None = None,
    ensemble_mode: bool = False,
    n_samples: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    calibration: StoredCalibration | None = None,
    apply_calibration: bool = True,
    chunk_size: int = 10000,
    on_chunk: ChunkHook | None = None,
    progress: Callable[[int], None] | None = None,
) -> CatalogueResult:
    """The catalogue of every input spectrum, in memory (nothing is written).

    Parameters are those of :func:`run_prediction`; ``on_chunk(k, prediction, rows, flag)`` is called after
    chunk ``k`` (``rows``: the input rows of the chunk; ``flag``: the flags so far).
    """
    labs = validate_labels(predictor, labels)
    if int(inputs.ok.sum()):
        predictor.check_compatible(inputs.as_dataset())
    stored = calibration if calibration is not None else load_stored(predictor, ensemble_mode)
    scale = stored.scale_for(labs) if apply_calibration else np.ones(len(labs))
    n = len(inputs)
    ok_idx = np.flatnonzero(inputs.ok)
    n_ok = len(ok_idx)
    mean = np.full((n, len(labs)), np.nan)
    err_m = np.full((n, len(labs)), np.nan)
    err_d = np.full((n, len(labs)), np.nan)
    dist = np.full(n, np.nan)
    resid = np.full(n, np.nan)
    flag = np.where(inputs.ok, 0, FLAG_FAILED).astype(np.int32)
    reasons: list[list[str]] = [[] if s == "ok" else [str(s)] for s in inputs.status.tolist()]
    lo = np.array([stored.label_min.get(lab, np.nan) for lab in labs])
    hi = np.array([stored.label_max.get(lab, np.nan) for lab in labs])
    pred_meta: dict[str, Any] = {"n_samples": 1, "n_members": 1}
    t_pred = 0.0
    for k, start in enumerate(range(0, n_ok, chunk_size), start=1):
        sel_ok = np.arange(start, min(start + chunk_size, n_ok))
        rows = ok_idx[sel_ok]
        X, iv = inputs.X[sel_ok], inputs.ivar[sel_ok]
        t1 = time.perf_counter()
        raw = predict_with_uncertainty(
            predictor,
            X,
            iv,
            labels=labs,
            n_samples=n_samples,
            batch_size=batch_size,
            seed=_chunk_seed(seed, k),
            ensemble_mode=ensemble_mode,
            progress=progress,
        )
        t_pred += time.perf_counter() - t1
        pred = raw.scaled(scale)
        pred_meta = {"n_samples": pred.n_samples, "n_members": pred.n_members}
        mean[rows], err_m[rows], err_d[rows] = pred.mean, pred.err_model, pred.err_data
        bad = out_of_range(pred.mean, lo, hi)
        for r_i, row in enumerate(rows):
            if bad[r_i].any():
                flag[row] |= FLAG_LABEL_RANGE
                for j in np.flatnonzero(bad[r_i]):
                    reasons[row].append(
                        f"{labs[j]} {pred.mean[r_i, j]:.3g} outside training range [{lo[j]:.3g}, {hi[j]:.3g}]"
                    )
        if stored.ood is not None:
            d, r, far, poor = stored.ood.flags(X, iv)
            dist[rows], resid[rows] = d, r
            for r_i, row in enumerate(rows):
                if far[r_i]:
                    flag[row] |= FLAG_SPECTRUM_FAR
                    reasons[row].append(
                        f"spectrum far from training set (mahalanobis {d[r_i]:.3g} > "
                        f"{stored.ood.mahalanobis_threshold:.3g})"
                    )
                if poor[r_i]:
                    flag[row] |= FLAG_SPECTRUM_RESIDUAL
                    reasons[row].append(
                        f"spectrum unlike training set (pca residual {r[r_i]:.3g} > "
                        f"{stored.ood.residual_threshold:.3g})"
                    )
        if on_chunk is not None:
            on_chunk(k, pred, rows, flag)

    df = pd.DataFrame({"spec": inputs.spec, "obsid": inputs.obsid})
    for j, lab in enumerate(labs):
        df[lab] = mean[:, j]
        df[f"{lab}_err"] = np.sqrt(err_m[:, j] ** 2 + err_d[:, j] ** 2)
        df[f"{lab}_err_model"] = err_m[:, j]
        df[f"{lab}_err_data"] = err_d[:, j]
    df["flag"] = flag
    df["flag_reason"] = ["; ".join(r) for r in reasons]
    df["filename"] = inputs.filename
    df["group"] = inputs.group
    df["snr"] = inputs.snr
    df["ood_mahalanobis"] = dist
    df["ood_residual"] = resid
    for lab in (lab for lab in labs if lab in inputs.reference):
        df[f"{lab}_ref"] = inputs.reference[lab]
    return CatalogueResult(
        table=df, labels=labs, calibration=stored, scale=scale, flag=flag, meta=pred_meta,
        predict_seconds=t_pred,
    )  # fmt: skip


def run_prediction(
    predictor: Predictor,
    inputs: PredictionInputs,
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
    ensemble_mode: bool = False,
    n_samples: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    calibration: StoredCalibration | None = None,
    apply_calibration: bool = True,
    batch_root: str | Path | None = None,
    chunk_size: int = 10000,
    plots: bool = True,
    extra: dict[str, Any] | None = None,
    extra_files: Mapping[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Predict every ``ok`` row of ``inputs`` and write the catalogue and reports (module docstring).

    Parameters
    ----------
    predictor : LoadedModel or LoadedEnsemble
        The trained model.
    inputs : PredictionInputs
        Spectra (preprocessed like the training data: checked).
    out_dir : path
        Output folder.
    labels : sequence of str, optional
        Labels to report (default all the model predicts; an unknown one raises listing the valid ones).
    ensemble_mode, n_samples, batch_size, seed
        See :func:`~specabund.predict.uncertainty.predict_with_uncertainty`; chunk ``k`` uses a seed
        derived from ``(seed, k)``.
    calibration : StoredCalibration, optional
        Default: what :func:`~specabund.predict.calibration.load_stored` finds with the model.
    apply_calibration : bool
        Multiply the uncertainties by the stored scales.
    batch_root : path, optional
        Folder receiving ``prediction_<LABEL>_batch_results/`` (none written when ``None``).
    chunk_size : int
        Spectra per tracked batch.
    plots : bool
        Write the figures.
    extra : dict, optional
        Added to ``summary.json`` (e.g. the command-line settings).
    extra_files : mapping of str to str, optional
        Further text files of the run (name -> content, e.g. ``resolved_config.toml``), committed together
        with the catalogue.
    progress : callable, optional
        ``progress(n)`` after every batch: ``n`` more spectra predicted (the calls add up to the number of
        ``ok`` rows); e.g. a progress bar's ``update``.

    Returns
    -------
    dict
        The content of ``summary.json``.

    Raises
    ------
    OutputError
        A file cannot be written (full disk, read-only folder): nothing of this run is left in ``out_dir``
        and the previous run's files are unchanged.
    """
    t0 = time.perf_counter()
    labs = validate_labels(predictor, labels)
    out_dir = ensure_dir(out_dir)
    if int(inputs.ok.sum()):  # before any batch folder is made
        predictor.check_compatible(inputs.as_dataset())
    trackers = _trackers(batch_root, labs)

    def on_chunk(k: int, pred: UncertainPrediction, rows: np.ndarray, flag: np.ndarray) -> None:
        if trackers:
            _track_batch(trackers, k, labs, pred, rows, inputs, flag, plots)

    cat = predict_catalogue(
        predictor,
        inputs,
        labels=labs,
        ensemble_mode=ensemble_mode,
        n_samples=n_samples,
        batch_size=batch_size,
        seed=seed,
        calibration=calibration,
        apply_calibration=apply_calibration,
        chunk_size=chunk_size,
        on_chunk=on_chunk,
        progress=progress,
    )
    for tr in trackers.values():
        if tr.completed():
            if plots:
                tr.finalize()
            else:  # the summary without the trend figure
                atomic_write_text(tr.folder / f"{tr.name}_batch_summary.txt", tr.summary_text())
    df, stored, scale, flag = cat.table, cat.calibration, cat.scale, cat.flag
    pred_meta, t_pred, n, n_ok = cat.meta, cat.predict_seconds, len(inputs), int(inputs.ok.sum())
    mean = df[labs].to_numpy(dtype=float)
    err_m = df[[f"{lab}_err_model" for lab in labs]].to_numpy(dtype=float)
    err_d = df[[f"{lab}_err_data" for lab in labs]].to_numpy(dtype=float)
    ref_labels = [lab for lab in labs if lab in inputs.reference]
    with _staging(out_dir) as stage:
        write_table(df, stage)
        summary: dict[str, Any] = {
            "model": str(predictor.run_dir),
            "mode": mode_name(ensemble_mode),
            "labels": labs,
            "mc_samples": pred_meta["n_samples"],
            "n_members": pred_meta["n_members"],
            "seed": seed,
            "n_input": n,
            "n_predicted": n_ok,
            "n_failed": int((flag & FLAG_FAILED).astype(bool).sum()),
            "n_flagged": int((flag != 0).sum()),
            "flag_bits": FLAG_BITS,
            "flag_counts": {k: int((flag & v).astype(bool).sum()) for k, v in FLAG_BITS.items()},
            "failure_reasons": _counts([s.split(":")[0] for s in inputs.status.tolist() if s != "ok"]),
            "calibrated": bool(stored.calibrated and apply_calibration),
            "calibration_scale": {lab: float(s) for lab, s in zip(labs, scale, strict=True)},
            "label_range_source": stored.range_source,
            "ood_reference": stored.ood.summary() if stored.ood is not None else None,
            "median_err": {lab: _nanmedian(df[f"{lab}_err"]) for lab in labs},
            "median_err_model": {lab: _nanmedian(df[f"{lab}_err_model"]) for lab in labs},
            "median_err_data": {lab: _nanmedian(df[f"{lab}_err_data"]) for lab in labs},
            "predict_seconds": t_pred,
            "spectra_per_second": n_ok / t_pred if t_pred > 0 else None,
        }
        if stored.ood is None:
            logger.info("no OOD reference with the model (see 'predict --calibrate'): spectra unchecked")
        if ref_labels:
            summary["reference_metrics"] = _reference_outputs(df, ref_labels, inputs, stage, plots)
        pairs = repeat_pairs(
            inputs.group,
            inputs.spec,
            labs,
            mean,
            np.sqrt(err_m**2 + err_d**2),
            usable=inputs.ok,
        )
        if len(pairs):
            summary["repeats"] = write_repeats(stage, pairs, labs, plot=plots)
        for name, text in (extra_files or {}).items():
            atomic_write_text(stage / name, text)
        summary["elapsed_seconds"] = time.perf_counter() - t0
        summary.update(extra or {})
        summary["files"] = sorted([*(p.name for p in stage.iterdir()), SUMMARY_FILE])
        atomic_write_json(stage / SUMMARY_FILE, summary)
    return summary


SUMMARY_FILE = "summary.json"
_STAGING_PREFIX = ".predict-staging-"


def _remove_stale_staging(out_dir: Path) -> None:
    """Remove staging folders of prediction runs whose process has ended (killed runs)."""
    import psutil

    for d in out_dir.glob(f"{_STAGING_PREFIX}*"):
        pid = d.name[len(_STAGING_PREFIX) :].split("-", 1)[0]
        if d.is_dir() and not (pid.isdigit() and psutil.pid_exists(int(pid)) and int(pid) != os.getpid()):
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _staging(out_dir: Path) -> Any:
    """A hidden folder in ``out_dir`` receiving a run's files, moved into ``out_dir`` on success.

    On an error the folder is removed and ``out_dir`` is unchanged; an :class:`OutputError` about a staged
    file is re-raised naming the file's final path.
    """
    _remove_stale_staging(out_dir)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=out_dir))
    except OSError as exc:
        raise OutputError(out_dir, exc) from exc
    try:
        yield stage
        _commit(stage, out_dir)
    except OutputError as exc:
        p = Path(exc.path)
        if p.parent == stage:
            raise OutputError(out_dir / p.name, exc.cause) from exc
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(stage: Path, out_dir: Path) -> None:
    """Move the staged files into ``out_dir`` (summary.json last) and drop the previous run's leftovers."""
    old: list[str] = []
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        old = [str(f) for f in json.loads((out_dir / SUMMARY_FILE).read_text(encoding="utf-8"))["files"]]
    names = sorted(p.name for p in stage.iterdir())
    names.sort(key=lambda nm: nm == SUMMARY_FILE)
    for name in names:
        try:
            os.replace(stage / name, out_dir / name)
        except OSError as exc:
            raise OutputError(out_dir / name, exc) from exc
    for name in set(old) - set(names):
        if name and os.sep not in name and "/" not in name and not name.startswith("."):
            with contextlib.suppress(OSError):
                (out_dir / name).unlink()


def _nanmedian(s: pd.Series) -> float:
    v = s.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def _counts(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it] = out.get(it, 0) + 1
    return dict(sorted(out.items()))


def _trackers(batch_root: str | Path | None, labels: list[str]) -> dict[str, BatchTracker]:
    if batch_root is None:
        return {}
    out = {}
    for lab in labels:
        folder = batch_results_dir(batch_root, "prediction", lab)
        # a new prediction run replaces the previous run's batch records
        if (folder / TRACKING_FILE).exists():
            (folder / TRACKING_FILE).unlink()
        for old in folder.glob("batch_*_*") if folder.is_dir() else []:
            old.unlink()
        out[lab] = BatchTracker(folder, lab)
    return out


def _track_batch(
    trackers: dict[str, BatchTracker],
    k: int,
    labs: list[str],
    pred: UncertainPrediction,
    rows: np.ndarray,
    inputs: PredictionInputs,
    flag: np.ndarray,
    plots: bool,
) -> None:
    for j, lab in enumerate(labs):
        tr = trackers[lab]
        v = pred.mean[:, j]
        e = pred.err_total[:, j]
        m: dict[str, Any] = {
            "n": len(v),
            "mean": float(np.mean(v)),
            "std": float(np.std(v)),
            "median": float(np.median(v)),
            "p16": float(np.percentile(v, 16)),
            "p84": float(np.percentile(v, 84)),
            "median_err": float(np.median(e)),
            "median_err_model": float(np.median(pred.err_model[:, j])),
            "median_err_data": float(np.median(pred.err_data[:, j])),
            "fraction_flagged": float(np.mean(flag[rows] != 0)),
        }
        ref = inputs.reference.get(lab)
        r = ref[rows] if ref is not None else None
        if r is not None and np.isfinite(r).any():
            met = regression_metrics(r, v)
            m.update({f"ref_{key}": met[key] for key in ("n", "rmse", "bias", "robust_scatter", "mae")})
            m["coverage_68"] = coverage(z_scores(v, r, e), LEVELS[0])
        tr.record(k, m)
        if plots:
            fig = distribution_figure(lab, v, r, title=f"{lab}: prediction batch {k}")
            save_figure(fig, tr.batch_path(k, "distribution.png"))


def _reference_outputs(
    df: pd.DataFrame, labels: list[str], inputs: PredictionInputs, out_dir: Path, plots: bool
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    rows = []
    residuals = {}
    for lab in labels:
        t = df[f"{lab}_ref"].to_numpy(dtype=float)
        p = df[lab].to_numpy(dtype=float)
        e = df[f"{lab}_err"].to_numpy(dtype=float)
        clean = df["flag"].to_numpy() == 0
        z = z_scores(p, t, e)
        entry = {
            "all": regression_metrics(t, p),
            "unflagged": regression_metrics(t[clean], p[clean]),
            "coverage_68": coverage(z, LEVELS[0]),
            "coverage_95": coverage(z, LEVELS[1]),
        }
        metrics[lab] = entry
        for subset in ("all", "unflagged"):
            rows.append({"label": lab, "subset": subset, **entry[subset]})
        residuals[lab] = p - t
        if plots:
            save_figure(
                train_plots.one_to_one_figure(t, p, lab, color=inputs.snr, color_label="SNR"),
                out_dir / f"{lab}_one_to_one.png",
            )
            save_figure(
                distribution_figure(lab, p, t, title=f"{lab}: predicted vs reference distribution"),
                out_dir / f"{lab}_distribution.png",
            )
    if plots:
        save_figure(train_plots.residual_hist_figure(residuals), out_dir / "residual_histograms.png")
    atomic_write_json(out_dir / "metrics.json", metrics)
    with atomic_write(out_dir / "metrics.csv", "w", encoding="utf-8", newline="") as fh:
        pd.DataFrame(rows).to_csv(fh, index=False)
    return metrics
