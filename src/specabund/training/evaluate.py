"""Evaluate a trained model on a labelled dataset: metrics tables, predictions and diagnostic plots.

Outputs in ``out_dir``:

``metrics.json``
    metrics per label and subset, plus the evaluation settings.
``metrics.csv``
    columns ``label, subset, n, mae, rmse, bias, robust_scatter, r2``; subsets are ``all``, one per SNR
    bin (``snr_<20``, ``snr_20-50``, ...), ``dwarfs`` (``logg >= logg_split``) and ``giants``.
``predictions.csv``
    columns ``spec``, ``snr`` and, per label, ``<LABEL>_true``, ``<LABEL>_pred``, ``<LABEL>_err``.
``<LABEL>_one_to_one.png``, ``<LABEL>_residuals_vs_params.png``, ``<LABEL>_kiel.png``
    one-to-one with residual panel, residuals against SNR/Teff/logg/[Fe/H], Kiel diagrams;
``residual_histograms.png``
    residual distribution of every label.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..dataset import Dataset
from ..errors import DataMismatchError, SpecabundError
from ..metrics import DEFAULT_SNR_BINS, regression_metrics, snr_bin_labels
from ..plotting import save_figure
from ..utils import atomic_write, atomic_write_json
from . import plots
from .saved import LoadedEnsemble, LoadedModel

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ["label", "subset", "n", "mae", "rmse", "bias", "robust_scatter", "r2"]


def read_mist_iso(path: str | Path) -> list[pd.DataFrame]:
    """Read a MIST isochrone file (``.iso``) into one DataFrame per age.

    The format: comment lines start with ``#``; each age block begins with a header comment line whose
    first name is ``EEP`` (``# EEP log10_isochrone_age_yr initial_mass ... log_Teff log_g ... phase``)
    followed by whitespace-separated rows. Each frame's ``attrs`` holds ``log10_isochrone_age_yr`` and,
    when the file header gives it, ``feh`` ([Fe/H]).

    Raises
    ------
    SpecabundError
        When the file is missing, has no isochrone block, a row has the wrong number of columns, or the
        columns ``log_Teff``/``log_g`` are absent.
    """
    path = Path(path)
    if not path.exists():
        raise SpecabundError(f"{path}: isochrone file not found")
    blocks: list[tuple[list[str], list[list[float]]]] = []
    feh: float | None = None
    prev_names: list[str] | None = None
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                tokens = line.lstrip("#").split()
                if tokens and tokens[0] == "EEP":
                    blocks.append((tokens, []))
                elif prev_names is not None and "[Fe/H]" in prev_names and len(tokens) == len(prev_names):
                    try:
                        feh = float(tokens[prev_names.index("[Fe/H]")])
                    except ValueError:
                        pass
                prev_names = tokens
                continue
            if not blocks:
                raise SpecabundError(f"{path}:{lineno}: data row before any '# EEP ...' header line")
            names, rows = blocks[-1]
            values = line.split()
            if len(values) != len(names):
                raise SpecabundError(
                    f"{path}:{lineno}: row has {len(values)} columns, header has {len(names)}"
                )
            try:
                rows.append([float(v) for v in values])
            except ValueError as exc:
                raise SpecabundError(f"{path}:{lineno}: non-numeric value ({exc})") from exc
    out = []
    for names, rows in blocks:
        if not rows:
            continue
        missing = [c for c in ("log_Teff", "log_g") if c not in names]
        if missing:
            raise SpecabundError(f"{path}: isochrone columns {missing} missing")
        df = pd.DataFrame(rows, columns=names)
        for col in ("EEP", "phase"):
            if col in df:
                df[col] = df[col].round().astype(int)
        if "log10_isochrone_age_yr" in df:
            df.attrs["log10_isochrone_age_yr"] = float(df["log10_isochrone_age_yr"].iloc[0])
        if feh is not None:
            df.attrs["feh"] = feh
        out.append(df)
    if not out:
        raise SpecabundError(f"{path}: no isochrone block found (expected '# EEP ...' header lines)")
    return out


def _param(ds: Dataset, attr: str, label: str, pred: dict[str, np.ndarray]) -> np.ndarray:
    """Catalogue parameter, else the dataset label column, else the model's prediction, else NaN."""
    v = np.asarray(getattr(ds, attr), dtype=float)
    if np.isfinite(v).any():
        return v
    if label in ds.elements:
        col = np.asarray(ds.y[:, ds.elements.index(label)], dtype=float)
        if np.isfinite(col).any():
            return col
    if label in pred:
        return pred[label]
    return np.full(len(ds), np.nan)


def evaluate(
    model: LoadedModel | LoadedEnsemble,
    dataset: Dataset,
    labels: Sequence[str] | None,
    out_dir: str | Path,
    snr_bins: Sequence[float] = DEFAULT_SNR_BINS,
    logg_split: float = 3.8,
    isochrones: Sequence[pd.DataFrame] | str | Path | None = None,
    batch_size: int = 256,
    plots_enabled: bool = True,
) -> dict[str, Any]:
    """Predict ``dataset`` with ``model`` and write metrics, predictions and plots to ``out_dir``.

    Parameters
    ----------
    model : LoadedModel or LoadedEnsemble
        From :func:`~specabund.training.load_model`.
    dataset : Dataset
        Labelled spectra on the model's grid (checked with ``model.check_compatible``).
    labels : sequence of str or None
        Labels to evaluate (subset of ``model.labels``; ``None`` = all). A label absent from the dataset
        is predicted but has NaN truth and ``n = 0`` metrics.
    out_dir : path
        Output folder (created).
    snr_bins : sequence of float
        SNR bin edges for the per-bin metrics.
    logg_split : float
        ``logg >= logg_split`` are dwarfs, below are giants (catalogue logg, else the ``LOGG`` label,
        else the predicted ``LOGG``).
    isochrones : list of DataFrame, path or None
        MIST isochrones (or a ``.iso`` path) drawn on the Kiel diagrams.
    batch_size : int
        Spectra per forward pass.
    plots_enabled : bool
        Write the PNG figures.

    Returns
    -------
    dict
        ``{"metrics": {label: {subset: {...}}}, "n_spectra", "labels", "snr_bins", "logg_split",
        "model", "files": {...}}`` (the content of ``metrics.json`` plus the written paths).
    """
    model.check_compatible(dataset)
    labels = list(model.labels if labels is None else labels)
    unknown = [lab for lab in labels if lab not in model.labels]
    if unknown:
        raise DataMismatchError(
            f"model {model.run_dir} does not predict {unknown}; it predicts {model.labels}"
        )
    if isinstance(isochrones, (str, Path)):
        isochrones = read_mist_iso(isochrones)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    mean, sigma = model.predict(dataset.X, dataset.ivar, batch_size=batch_size)
    n = len(dataset)
    true: dict[str, np.ndarray] = {}
    pred: dict[str, np.ndarray] = {}
    err: dict[str, np.ndarray] = {}
    for lab in labels:
        j = model.labels.index(lab)
        pred[lab], err[lab] = mean[:, j], sigma[:, j]
        if lab in dataset.elements:
            true[lab] = np.asarray(dataset.y[:, dataset.elements.index(lab)], dtype=float)
        else:
            logger.info("label %s not in the dataset: its truth is NaN", lab)
            true[lab] = np.full(n, np.nan)

    all_pred = {lab: mean[:, j] for j, lab in enumerate(model.labels)}
    snr = np.asarray(dataset.snr, dtype=float)
    teff = _param(dataset, "teff", "TEFF", all_pred)
    logg = _param(dataset, "logg", "LOGG", all_pred)
    fe_h = _param(dataset, "fe_h", "FE_H", all_pred)

    edges = list(snr_bins)
    subsets: dict[str, np.ndarray] = {"all": np.ones(n, dtype=bool)}
    for name, lo, hi in zip(snr_bin_labels(edges), edges[:-1], edges[1:], strict=True):
        subsets[f"snr_{name}"] = (snr >= lo) & (snr < hi)
    subsets["dwarfs"] = logg >= logg_split
    subsets["giants"] = logg < logg_split

    metrics: dict[str, dict[str, dict[str, float]]] = {}
    rows = []
    for lab in labels:
        metrics[lab] = {}
        for sub, sel in subsets.items():
            m = regression_metrics(true[lab][sel], pred[lab][sel])
            metrics[lab][sub] = m
            rows.append({"label": lab, "subset": sub, **m})

    pred_df = pd.DataFrame({"spec": np.asarray(dataset.spec, dtype=str), "snr": snr})
    for lab in labels:
        pred_df[f"{lab}_true"] = true[lab]
        pred_df[f"{lab}_pred"] = pred[lab]
        pred_df[f"{lab}_err"] = err[lab]

    files: dict[str, str] = {}
    with atomic_write(out_dir / "predictions.csv", "w", encoding="utf-8", newline="") as fh:
        pred_df.to_csv(fh, index=False)
    files["predictions"] = str(out_dir / "predictions.csv")
    with atomic_write(out_dir / "metrics.csv", "w", encoding="utf-8", newline="") as fh:
        pd.DataFrame(rows, columns=METRIC_COLUMNS).to_csv(fh, index=False)
    files["metrics_csv"] = str(out_dir / "metrics.csv")

    if plots_enabled:
        params = {"snr": snr, "teff": teff, "logg": logg, "fe_h": fe_h}
        residuals = {lab: pred[lab] - true[lab] for lab in labels}
        for lab in labels:
            # colour the Kiel diagram by the true label, or by the prediction when there is no truth
            colour = true[lab] if np.isfinite(true[lab]).any() else pred[lab]
            figs = {
                "one_to_one": plots.one_to_one_figure(
                    true[lab], pred[lab], lab, color=snr, color_label="SNR"
                ),
                "residuals_vs_params": plots.residual_vs_params_figure(residuals[lab], params, lab),
                "kiel": plots.kiel_figure(teff, logg, colour, residuals[lab], lab, isochrones),
            }
            for key, fig in figs.items():
                path = save_figure(fig, out_dir / f"{lab}_{key}.png")
                files[f"{lab}_{key}"] = str(path)
        path = save_figure(plots.residual_hist_figure(residuals), out_dir / "residual_histograms.png")
        files["residual_histograms"] = str(path)

    result: dict[str, Any] = {
        "model": str(model.run_dir),
        "n_spectra": n,
        "labels": labels,
        "snr_bins": [float(e) for e in edges],
        "logg_split": float(logg_split),
        "metrics": metrics,
    }
    atomic_write_json(out_dir / "metrics.json", result)
    files["metrics_json"] = str(out_dir / "metrics.json")
    result["files"] = files
    return result
