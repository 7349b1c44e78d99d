"""Calibration of the predicted uncertainties on the validation set, stored with the model.

For each label the pulls ``z = (pred - true) / err_total`` of the validation spectra should have unit
width. :func:`fit_scale` finds the factor ``s`` with which ``z / s`` does:

``'coverage'`` (default)
    ``s`` = the 68.27th percentile of ``|z|``, so that exactly 68.27 % of the validation spectra fall
    inside ``pred +- s * err`` (robust to a few outliers and to non-Gaussian tails);
``'mad'``
    ``s = 1.4826 * median(|z - median(z)|)``.

:func:`calibrate` predicts the validation set (MC-Dropout or the ensemble, as at prediction time), fits
the scales, measures the coverage of the 68.27 % and 95.45 % intervals before and after (and on a test set
when given), fits the out-of-distribution reference (:mod:`.ood`) on the training spectra (else the
validation spectra) and the training label range, and writes ``calibration.json`` and
``ood_reference.npz`` into the run folder (atomically). The JSON holds one entry per mode (``'single'``,
``'ensemble'``) and a fingerprint of the weights, so a retrained model ignores a stale calibration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ..dataset import Dataset
from ..errors import SpecabundError
from ..metrics import robust_scatter
from ..training.saved import CONFIG_FILE, WEIGHTS_FILE, LoadedEnsemble, LoadedModel
from ..utils import atomic_write_json, hash_bytes, hash_file
from .ood import SpectralOOD, label_range
from .uncertainty import Predictor, UncertainPrediction, members_of, predict_with_uncertainty

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
OOD_FILE = "ood_reference.npz"
LEVELS = (0.6827, 0.9545)
METHODS = ("coverage", "mad")


def mode_name(ensemble_mode: bool) -> str:
    return "ensemble" if ensemble_mode else "single"


def z_scores(pred: np.ndarray, true: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``(pred - true) / sigma`` (NaN where any is missing or sigma <= 0)."""
    pred, true, sigma = (np.asarray(a, dtype=np.float64) for a in (pred, true, sigma))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (pred - true) / sigma
    return np.where(np.isfinite(z) & (sigma > 0), z, np.nan)


def coverage(z: np.ndarray, level: float) -> float:
    """Fraction of finite ``z`` with ``|z|`` inside the central Gaussian interval of probability ``level``."""
    z = np.asarray(z, dtype=np.float64)
    z = z[np.isfinite(z)]
    if z.size == 0:
        return float("nan")
    q = float(stats.norm.ppf(0.5 + level / 2))
    return float(np.mean(np.abs(z) <= q))


def fit_scale(z: np.ndarray, method: str = "coverage") -> float:
    """Factor ``s`` such that ``z / s`` has unit width (see the module docstring); 1.0 without data."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    z = np.asarray(z, dtype=np.float64)
    z = z[np.isfinite(z)]
    if z.size < 5:
        return 1.0
    s = float(np.quantile(np.abs(z), LEVELS[0])) if method == "coverage" else robust_scatter(z)
    return s if np.isfinite(s) and s > 0 else 1.0


def fit_scale_noisy_labels(
    resid: np.ndarray, sigma: np.ndarray, label_err: np.ndarray, method: str = "coverage"
) -> float:
    """Factor ``s`` such that ``resid / sqrt((s sigma)^2 + label_err^2)`` has unit width.

    With labels that carry their own errors (a survey pipeline's, or another survey's), the residuals on
    the validation set are the prediction's error *and* the label's: a scale fitted to ``resid / sigma``
    would inflate the predicted uncertainties by the catalogue's noise. ``s`` is found by bisection (the
    coverage of the 68.27 % interval grows with ``s``; for ``'mad'`` the robust width falls). When the label
    errors alone already cover the residuals the smallest scale tried, 1e-3, is returned.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    r, sg, e = (np.asarray(a, dtype=np.float64) for a in (resid, sigma, label_err))
    e = np.where(np.isfinite(e) & (e > 0), e, 0.0)
    ok = np.isfinite(r) & np.isfinite(sg) & (sg > 0)
    r, sg, e = r[ok], sg[ok], e[ok]
    if r.size < 5:
        return 1.0

    def width(k: float) -> float:
        z = r / np.sqrt((k * sg) ** 2 + e**2)
        if method == "coverage":  # |z| quantile that should be 1
            return float(np.quantile(np.abs(z), LEVELS[0]))
        return robust_scatter(z)

    lo, hi = 1e-3, 1e3
    if width(lo) <= 1.0:
        return lo
    if width(hi) >= 1.0:
        return hi
    for _ in range(60):  # geometric bisection: ~1e-9 relative
        mid = math.sqrt(lo * hi)
        if width(mid) > 1.0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def label_errors_of(
    ds: Dataset, labels: Sequence[str], assumed: dict[str, float] | None = None
) -> np.ndarray:
    """(N, L) label errors of ``ds``: its catalogue errors (``y_err``) where known, else ``assumed[label]``,
    else 0 (NaN-free)."""
    out = np.zeros((len(ds), len(labels)))
    for j, lab in enumerate(labels):
        col = np.full(len(ds), np.nan)
        if ds.y_err is not None and lab in ds.elements:
            col = np.asarray(ds.y_err[:, ds.elements.index(lab)], dtype=np.float64)
        if assumed and lab in assumed:
            col = np.where(np.isfinite(col) & (col > 0), col, float(assumed[lab]))
        out[:, j] = np.where(np.isfinite(col) & (col > 0), col, 0.0)
    return out


def z_summary(z: np.ndarray) -> dict[str, float]:
    """Count, mean, std, robust width and the two coverages of ``z``."""
    f = np.asarray(z, dtype=np.float64)
    f = f[np.isfinite(f)]
    nan = float("nan")
    return {
        "n": int(f.size),
        "mean": float(f.mean()) if f.size else nan,
        "median": float(np.median(f)) if f.size else nan,
        "std": float(f.std()) if f.size else nan,
        "robust_width": robust_scatter(f),
        "coverage_68": coverage(f, LEVELS[0]),
        "coverage_95": coverage(f, LEVELS[1]),
    }


def model_fingerprint(predictor: Predictor, ensemble_mode: bool = False) -> str:
    """Hash of the weights and configs of the members that would be used."""
    parts: list[bytes] = []
    for m in members_of(predictor, ensemble_mode):
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            p = m.run_dir / name
            parts.append(hash_file(p).encode() if p.exists() else name.encode())
    return hash_bytes(*parts)[:16]


def _labels_of(ds: Dataset, labels: Sequence[str]) -> np.ndarray:
    y = np.full((len(ds), len(labels)), np.nan)
    for j, lab in enumerate(labels):
        if lab in ds.elements:
            y[:, j] = ds.y[:, ds.elements.index(lab)]
    return y


@dataclass
class CalibrationResult:
    """What :func:`calibrate` measured and stored.

    Attributes
    ----------
    labels : list of str
        Calibrated labels.
    scale : numpy.ndarray
        Per-label factor applied to the uncertainties.
    report : dict
        z statistics and coverage before/after on the validation (and test) set, OOD reference summary,
        label range; the content of the calibration report.
    z_val : numpy.ndarray
        Uncalibrated validation pulls ``(N, L)`` (for plots).
    z_test : numpy.ndarray or None
        Uncalibrated test pulls.
    """

    labels: list[str]
    scale: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)
    z_val: np.ndarray | None = None
    z_test: np.ndarray | None = None


def _pulls(
    predictor: Predictor, ds: Dataset, labels: list[str], kw: dict[str, Any]
) -> tuple[UncertainPrediction, np.ndarray, np.ndarray]:
    predictor.check_compatible(ds)
    pred = predict_with_uncertainty(predictor, ds.X, ds.ivar, labels=labels, **kw)
    true = _labels_of(ds, labels)
    return pred, true, z_scores(pred.mean, true, pred.err_total)


def calibrate(
    predictor: Predictor,
    val_dataset: Dataset,
    *,
    train_dataset: Dataset | None = None,
    test_dataset: Dataset | None = None,
    labels: Sequence[str] | None = None,
    ensemble_mode: bool = False,
    n_samples: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    method: str = "coverage",
    n_components: int = 16,
    percentile: float = 99.5,
    write: bool = True,
    label_errors: dict[str, float] | None = None,
) -> CalibrationResult:
    """Fit per-label uncertainty scales on ``val_dataset`` and store them with the model.

    Parameters
    ----------
    predictor : LoadedModel or LoadedEnsemble
        The trained model (its ``run_dir`` receives ``calibration.json`` and ``ood_reference.npz``).
    val_dataset : Dataset
        Labelled validation spectra (the val split of the model's training data).
    train_dataset : Dataset, optional
        Training spectra: reference of the OOD statistics and of the label range (else the validation set).
    test_dataset : Dataset, optional
        Held-out labelled spectra on which coverage before/after calibration is also reported.
    labels : sequence of str, optional
        Labels to calibrate (default: every model label; a label without validation values keeps scale 1).
    ensemble_mode, n_samples, batch_size, seed
        As in :func:`~specabund.predict.uncertainty.predict_with_uncertainty`; calibrate in the mode used
        for prediction.
    method : {'coverage', 'mad'}
        See :func:`fit_scale`.
    n_components, percentile : int, float
        Of the OOD reference (:class:`~specabund.predict.ood.SpectralOOD`).
    write : bool
        Write the files into the run folder.
    label_errors : dict, optional
        Typical error of the validation labels per label (e.g. ``{"TEFF": 100.0}`` for a survey pipeline's
        Teff), used where the dataset carries no catalogue error (``y_err``). With label errors the scale is
        fitted to ``resid / sqrt((s err)^2 + label_err^2)`` (:func:`fit_scale_noisy_labels`), so the
        calibrated uncertainty is the prediction's own, not the prediction's plus the catalogue's.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    all_labels = list(predictor.labels)
    labs = list(labels) if labels else all_labels
    kw: dict[str, Any] = {
        "n_samples": n_samples,
        "batch_size": batch_size,
        "seed": seed,
        "ensemble_mode": ensemble_mode,
    }
    pred_v, true_v, z_v = _pulls(predictor, val_dataset, labs, kw)
    e_v = label_errors_of(val_dataset, labs, label_errors)
    noisy = [bool(np.any(e_v[:, j] > 0)) for j in range(len(labs))]
    scale = np.array(
        [
            fit_scale_noisy_labels(
                pred_v.mean[:, j] - true_v[:, j], pred_v.err_total[:, j], e_v[:, j], method
            )
            if noisy[j]
            else fit_scale(z_v[:, j], method)
            for j in range(len(labs))
        ]
    )
    per_label: dict[str, Any] = {}
    z_t = None
    if test_dataset is not None:
        pred_t, true_t, z_t = _pulls(predictor, test_dataset, labs, kw)
        e_t = label_errors_of(test_dataset, labs, label_errors)

    def after(pred: UncertainPrediction, true: np.ndarray, e: np.ndarray, j: int) -> dict[str, float]:
        total = np.sqrt((scale[j] * pred.err_total[:, j]) ** 2 + e[:, j] ** 2)
        return z_summary(z_scores(pred.mean[:, j], true[:, j], total))

    for j, lab in enumerate(labs):
        entry: dict[str, Any] = {
            "scale": float(scale[j]),
            "val_before": z_summary(z_v[:, j]),
            "val_after": after(pred_v, true_v, e_v, j),
            "median_err_model": float(np.nanmedian(pred_v.err_model[:, j])),
            "median_err_data": float(np.nanmedian(pred_v.err_data[:, j])),
        }
        if noisy[j]:
            # the 'after' pulls include the label errors: (pred - label) / sqrt((s err)^2 + label_err^2)
            entry["label_errors"] = {
                "median": float(np.median(e_v[:, j])),
                "fraction_known": float(np.mean(e_v[:, j] > 0)),
                "assumed": float(label_errors[lab]) if label_errors and lab in label_errors else None,
            }
        if z_t is not None:
            entry["test_before"] = z_summary(z_t[:, j])
            entry["test_after"] = after(pred_t, true_t, e_t, j)
        per_label[lab] = entry

    ref = train_dataset if train_dataset is not None else val_dataset
    ref_name = "train" if train_dataset is not None else "val"
    if train_dataset is not None:
        predictor.check_compatible(train_dataset)
    ood = SpectralOOD.fit(
        ref.X,
        ref.ivar,
        n_components=n_components,
        percentile=percentile,
        rng=np.random.default_rng(seed),
    )
    lo, hi = label_range(_labels_of(ref, all_labels))
    mode = mode_name(ensemble_mode)
    report: dict[str, Any] = {
        "mode": mode,
        "method": method,
        "mc_samples": pred_v.n_samples,
        "n_members": pred_v.n_members,
        "seed": seed,
        "n_val": len(val_dataset),
        "n_test": len(test_dataset) if test_dataset is not None else 0,
        "labels": per_label,
        "ood": {**ood.summary(), "reference": ref_name},
        "label_range": {
            "source": ref_name,
            "min": {lab: float(v) for lab, v in zip(all_labels, lo, strict=True)},
            "max": {lab: float(v) for lab, v in zip(all_labels, hi, strict=True)},
        },
    }
    if write:
        _store(predictor, ensemble_mode, report, ood)
    return CalibrationResult(labels=labs, scale=scale, report=report, z_val=z_v, z_test=z_t)


def _store(predictor: Predictor, ensemble_mode: bool, report: dict[str, Any], ood: SpectralOOD) -> None:
    run_dir = Path(predictor.run_dir)
    existing = read_calibration(run_dir) or {}
    fp = model_fingerprint(predictor, ensemble_mode)
    modes = dict(existing.get("modes", {}))
    modes[report["mode"]] = {
        "fingerprint": fp,
        "method": report["method"],
        "mc_samples": report["mc_samples"],
        "n_members": report["n_members"],
        "n_val": report["n_val"],
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scale": {lab: e["scale"] for lab, e in report["labels"].items()},
        "coverage_val_before": {lab: e["val_before"]["coverage_68"] for lab, e in report["labels"].items()},
        "coverage_val_after": {lab: e["val_after"]["coverage_68"] for lab, e in report["labels"].items()},
    }
    ood.save(run_dir / OOD_FILE)
    content = {
        "format_version": 1,
        "modes": modes,
        "label_range": report["label_range"],
        "ood": {**report["ood"], "file": OOD_FILE, "fingerprint": fp},
    }
    atomic_write_json(run_dir / CALIBRATION_FILE, content)
    logger.info("wrote %s (%s mode)", run_dir / CALIBRATION_FILE, report["mode"])


def read_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """Content of ``calibration.json`` in ``run_dir``, or ``None`` when there is none."""
    import json

    path = Path(run_dir) / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SpecabundError(f"{path}: invalid JSON ({exc})") from exc


@dataclass
class StoredCalibration:
    """What prediction applies: scales (ones when uncalibrated), label range and OOD reference."""

    scale: dict[str, float]
    label_min: dict[str, float]
    label_max: dict[str, float]
    range_source: str
    ood: SpectralOOD | None
    calibrated: bool
    info: dict[str, Any] = field(default_factory=dict)

    def scale_for(self, labels: Sequence[str]) -> np.ndarray:
        return np.array([float(self.scale.get(lab, 1.0)) for lab in labels])


def load_stored(predictor: Predictor, ensemble_mode: bool = False) -> StoredCalibration:
    """Calibration for ``predictor`` in the given mode, with fallbacks when there is none.

    Without a usable ``calibration.json`` (absent, other mode, or made for other weights) the scales are 1,
    the label range falls back to the stored training mean +- 4 standard deviations (``range_source =
    'mean+-4std'``) and there is no spectral OOD reference.
    """
    labels = list(predictor.labels)
    first = predictor.members[0] if isinstance(predictor, LoadedEnsemble) else predictor
    assert isinstance(first, LoadedModel)
    mean, std = first.scaler.mean, first.scaler.std
    fallback = StoredCalibration(
        scale={},
        label_min={lab: float(m - 4 * s) for lab, m, s in zip(labels, mean, std, strict=True)},
        label_max={lab: float(m + 4 * s) for lab, m, s in zip(labels, mean, std, strict=True)},
        range_source="mean+-4std",
        ood=None,
        calibrated=False,
    )
    run_dir = Path(predictor.run_dir)
    content = read_calibration(run_dir)
    if content is None:
        logger.info("%s: no %s; uncertainties are not calibrated", run_dir, CALIBRATION_FILE)
        return fallback
    fp_single = model_fingerprint(predictor, False)
    fp_mode = model_fingerprint(predictor, ensemble_mode)
    rng = content.get("label_range", {})
    ood_info = content.get("ood", {})
    if ood_info.get("fingerprint") in (fp_single, fp_mode):
        fallback.label_min = {k: float(v) for k, v in rng.get("min", {}).items()}
        fallback.label_max = {k: float(v) for k, v in rng.get("max", {}).items()}
        fallback.range_source = str(rng.get("source", "calibration"))
        ood_path = run_dir / str(ood_info.get("file", OOD_FILE))
        if ood_path.exists():
            fallback.ood = SpectralOOD.load(ood_path)
    else:
        logger.warning("%s: calibration was made for other weights; ignoring it", run_dir)
        return fallback
    entry = content.get("modes", {}).get(mode_name(ensemble_mode))
    if entry is None or entry.get("fingerprint") != fp_mode:
        logger.info(
            "%s: no calibration for %s mode; uncertainties are not calibrated",
            run_dir,
            mode_name(ensemble_mode),
        )
        return fallback
    fallback.scale = {k: float(v) for k, v in entry["scale"].items()}
    fallback.calibrated = True
    fallback.info = {k: v for k, v in entry.items() if k != "scale"}
    return fallback
