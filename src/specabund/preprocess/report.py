"""Data-validation report and preprocessing plots written at the end of ``specabund preprocess``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..io import read_lamost
from ..plotting import save_figure
from ..utils import atomic_write_json, atomic_write_text
from .options import PreprocessOptions
from .plots import plot_stages
from .steps import preprocess_spectrum, velocity_problem

log = logging.getLogger(__name__)

_DATASETS = ("reference", "prediction")
_SMALL_KEYS = (
    "y",
    "y_err",
    "elements",
    "snr",
    "extra_n_raw_pixels",
    "extra_good_fraction",
    "extra_snr_measured",
)


def _load_small(path: Path) -> dict[str, np.ndarray] | None:
    """The per-spectrum arrays of a dataset, without X/ivar (npz members load lazily; a Zarr store's
    ``X``/``ivar`` stay on disk)."""
    from ..store import is_zarr, open_zarr_dataset, resolve_dataset_path

    path = resolve_dataset_path(path)
    if not path.exists():
        return None
    if is_zarr(path):
        data = open_zarr_dataset(path)
        return {k: data[k] for k in _SMALL_KEYS if k in data}
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in _SMALL_KEYS if k in z.files}


def label_statistics(
    y: np.ndarray, names: list[str], outlier_sigma: float = 5.0, y_err: np.ndarray | None = None
) -> pd.DataFrame:
    """Per label: count, NaN count, range, mean, std and robust outliers (beyond ``outlier_sigma`` MADs);
    with ``y_err`` also the number of labels with a known error and the median error."""
    rows = []
    for j, name in enumerate(names):
        v = y[:, j].astype(float)
        err_cols: dict[str, Any] = {}
        if y_err is not None:
            e = y_err[:, j].astype(float)
            e = e[np.isfinite(e)]
            err_cols = {"n_err": int(e.size), "median_err": float(np.median(e)) if e.size else np.nan}
        f = v[np.isfinite(v)]
        med = float(np.median(f)) if f.size else np.nan
        mad = float(1.4826 * np.median(np.abs(f - med))) if f.size else np.nan
        out = int(np.sum(np.abs(f - med) > outlier_sigma * mad)) if f.size and mad > 0 else 0
        rows.append(
            {
                "label": name,
                "n": int(f.size),
                "n_nan": int(v.size - f.size),
                "min": float(f.min()) if f.size else np.nan,
                "max": float(f.max()) if f.size else np.nan,
                "mean": float(f.mean()) if f.size else np.nan,
                "std": float(f.std()) if f.size else np.nan,
                "median": med,
                "robust_sigma": mad,
                f"n_outliers_{outlier_sigma:g}sigma": out,
                **err_cols,
            }
        )
    return pd.DataFrame(rows)


def masking_table(masked: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Catalogue values masked per column (rows: labels, ``<label>_err``, ``rv``, ``snr``) and reason."""
    from ..catalog import MASK_REASONS

    reasons = list(MASK_REASONS)
    if any("flag_kept" in c for c in masked.values()):
        reasons.append("flag_kept")
    rows = [{"column": name, **{r: int(c.get(r, 0)) for r in reasons}} for name, c in masked.items()]
    return pd.DataFrame(rows, columns=["column", *reasons])


def write_validation_report(
    output_dir: Path, manifest: dict[str, Any], data: dict[str, dict[str, np.ndarray]] | None = None
) -> Path:
    """Write ``<output_dir>/validation/`` (report text, JSON, plots): label ranges, outliers, NaN counts,
    spectra-length consistency, SNR. Returns the report path.

    ``data`` maps ``reference``/``prediction`` to the arrays the report uses (``y``, ``y_err``,
    ``elements``, ``snr``, ``extra_n_raw_pixels``) of that dataset, when the caller has them (the datasets
    need not exist yet); by default they are read from the datasets in ``output_dir``."""
    vdir = output_dir / "validation"
    pdir = vdir / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    lines = ["specabund data-validation report", f"preprocess hash: {manifest['preprocess_hash']}", ""]
    payload: dict[str, Any] = {"preprocess_hash": manifest["preprocess_hash"]}
    for name in _DATASETS:
        d = _load_small(output_dir / f"{name}_dataset.npz") if data is None else data.get(name)
        if d is None:
            continue
        names = [str(e) for e in d["elements"].tolist()]
        stats = label_statistics(d["y"], names, y_err=d.get("y_err"))
        n_raw = d.get("extra_n_raw_pixels", np.zeros(0, dtype=int))
        lengths = pd.Series(n_raw).value_counts()
        common = int(lengths.index[0]) if len(lengths) else 0
        length_info = {
            "grid_pixels": manifest["grid"]["n_pixels"],
            "raw_pixels_most_common": common,
            "raw_pixels_min": int(n_raw.min()) if n_raw.size else 0,
            "raw_pixels_max": int(n_raw.max()) if n_raw.size else 0,
            "fraction_other_length": float(1 - lengths.iloc[0] / n_raw.size) if n_raw.size else 0.0,
        }
        snr = d["snr"].astype(float)
        masked = manifest.get("label_masking", {}).get(name, {})
        mtable = masking_table(masked)
        payload[name] = {
            "n": len(snr),
            "labels": stats.to_dict(orient="records"),
            "catalogue_values_masked": masked,
            "lengths": length_info,
            "snr_median": float(np.nanmedian(snr)) if np.isfinite(snr).any() else None,
        }
        lines += [
            f"== {name} dataset: {len(snr)} spectra",
            "All spectra share the output grid of "
            f"{length_info['grid_pixels']} pixels; raw lengths {length_info['raw_pixels_min']}-"
            f"{length_info['raw_pixels_max']} (most common {common}, "
            f"{100 * length_info['fraction_other_length']:.1f}% differ, absorbed by resampling).",
            stats.to_string(index=False, float_format=lambda x: f"{x:.4g}"),
            "",
        ]
        if len(mtable):
            lines += [
                "Catalogue values masked (set to NaN) when the catalogue was read, per column and reason "
                "(over all catalogue rows):",
                mtable.to_string(index=False),
                "",
            ]
        fig = _label_hist_figure(d["y"], names, f"{name}: label distributions")
        save_figure(fig, pdir / f"{name}_label_distributions.png")
        if len(names) > 1 and len(snr) > 2:
            save_figure(
                label_correlation_figure(d["y"], names, name), pdir / f"{name}_label_correlations.png"
            )
        fig = Figure(figsize=(9, 3.2), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        fin = snr[np.isfinite(snr) & (snr > 0)]
        if fin.size:
            ax1.hist(np.log10(fin), bins=40, color="C0")
        ax1.set_xlabel("log10 SNR (g band)")
        ax1.set_ylabel("spectra")
        if n_raw.size:
            ax2.hist(n_raw, bins=40, color="C1")
        ax2.set_xlabel("raw spectrum length (pixels)")
        fig.suptitle(f"{name}: SNR and raw lengths")
        save_figure(fig, pdir / f"{name}_snr_lengths.png")
    lines += ["rejected by reason:"] + [f"  {k}: {v}" for k, v in manifest["rejected_by_reason"].items()]
    report = vdir / "validation_report.txt"
    atomic_write_text(report, "\n".join(lines) + "\n")
    atomic_write_json(vdir / "validation_report.json", payload)
    return report


def label_correlation_figure(y: np.ndarray, names: list[str], title: str = "") -> Figure:
    """Heat map of the pairwise (NaN-aware) Pearson correlations between labels.

    Strong correlations (for example [Mg/Fe] with [Ca/Fe] through the alpha knee) are what a data-driven
    model can exploit instead of an element's own lines; this plot says how much room there is for that.
    """
    import seaborn as sns

    corr = pd.DataFrame(y, columns=names).corr(min_periods=3)
    n = len(names)
    fig = Figure(figsize=(0.55 * n + 2.5, 0.5 * n + 1.8), layout="constrained")
    ax = fig.subplots()
    sns.heatmap(
        corr,
        ax=ax,
        vmin=-1,
        vmax=1,
        cmap="RdBu_r",
        annot=n <= 16,
        fmt=".2f",
        annot_kws={"size": 6},
        square=True,
    )
    ax.set_title(f"{title}: label correlations".strip(": "))
    return fig


def _label_hist_figure(y: np.ndarray, names: list[str], title: str) -> Figure:
    n = max(len(names), 1)
    ncol = min(n, 4)
    nrow = int(np.ceil(n / ncol))
    fig = Figure(figsize=(3.2 * ncol, 2.6 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for j, (ax, name) in enumerate(zip(axes, names, strict=False)):
        v = y[:, j]
        v = v[np.isfinite(v)]
        if v.size:
            ax.hist(v, bins=40, color="C2")
        ax.set_xlabel(name)
        ax.set_title(f"n={v.size}, NaN={len(y) - v.size}", fontsize=8)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def write_preprocessing_plots(
    output_dir: Path,
    plots_dir: Path,
    opts: PreprocessOptions,
    candidates: Iterable[tuple[Path, float | None]],
    n_examples: int,
    max_abs_rv_kms: float,
    data: dict[str, dict[str, np.ndarray]] | None = None,
) -> list[Path]:
    """Stage-by-stage plots of a few spectra and distributions of SNR, labels and rejection reasons.

    Parameters
    ----------
    output_dir : Path
        The preprocessing output (``rejected.csv`` and the datasets are read from it).
    plots_dir : Path
        The plots go to ``plots_dir/preprocessing``.
    opts : PreprocessOptions
        Options the spectra were preprocessed with.
    candidates : iterable of (Path, float or None)
        FITS files with their catalogue radial velocity (km/s, None when absent), in order; the first
        ``n_examples`` that preprocess to 'ok' get a stage plot.
    n_examples : int
        Spectra to plot stage by stage.
    max_abs_rv_kms : float
        Plausibility limit of the velocities (:func:`~specabund.preprocess.steps.velocity_problem`).
    data : dict, optional
        Per set (``reference``/``prediction``), the arrays ``elements``, ``y`` and ``snr`` of its dataset,
        when the caller has them (the datasets need not be written yet); by default read from the datasets.

    Returns
    -------
    list of Path
        The figures written.
    """
    out = plots_dir / "preprocessing"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    shown = 0
    for path, rv_kms in candidates:
        if shown >= n_examples:
            break
        try:
            spec = read_lamost(path)
        except Exception:
            continue
        v, problem = velocity_problem(rv_kms, spec.meta.get("z"), opts, max_abs_rv_kms)
        if problem is not None:
            continue
        res = preprocess_spectrum(spec, opts, rv_kms=v, keep_stages=True)
        if res.status != "ok":
            continue
        fig = plot_stages(res)
        fig.suptitle(f"{path.name}: preprocessing stages (SNR {res.snr_measured:.0f}, rv {res.rv_source})")
        written.append(save_figure(fig, out / f"stages_{shown + 1}_{path.name.split('.')[0]}.png"))
        shown += 1
    rej_path = output_dir / "rejected.csv"
    if rej_path.exists():
        rej = pd.read_csv(rej_path)
        fig = Figure(figsize=(7, 3.5), layout="constrained")
        ax = fig.subplots()
        if len(rej):
            counts = rej["reason"].astype(str).str.split(":").str[0].value_counts()
            ax.barh(counts.index.tolist(), counts.to_numpy(), color="C3")
            ax.set_xlabel("spectra")
        else:
            ax.text(0.5, 0.5, "no spectrum rejected", ha="center", va="center")
        ax.set_title("rejections by reason")
        written.append(save_figure(fig, out / "rejection_reasons.png"))
    for name in _DATASETS:
        d = _load_small(output_dir / f"{name}_dataset.npz") if data is None else data.get(name)
        if d is None:
            continue
        names = [str(e) for e in d["elements"].tolist()]
        written.append(
            save_figure(_label_hist_figure(d["y"], names, f"{name}: labels"), out / f"{name}_labels.png")
        )
        snr = d["snr"].astype(float)
        fig = Figure(figsize=(5, 3.2), layout="constrained")
        ax = fig.subplots()
        fin = snr[np.isfinite(snr) & (snr > 0)]
        if fin.size:
            ax.hist(fin, bins=np.logspace(np.log10(fin.min()), np.log10(fin.max() + 1), 40), color="C0")
            ax.set_xscale("log")
        ax.set_xlabel("SNR (g band)")
        ax.set_ylabel("spectra")
        ax.set_title(f"{name}: SNR distribution")
        written.append(save_figure(fig, out / f"{name}_snr.png"))
    log.info("wrote %d preprocessing plots to %s", len(written), out)
    return written
