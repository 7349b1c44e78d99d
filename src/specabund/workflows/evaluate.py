"""The ``test`` workflow: metrics, plots, batch results, baseline comparison, information limit."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import (
    save_config,
)
from ..utils import atomic_write
from ..workspace import FolderLock, Workspace
from .common import RESOLVED_CONFIG

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..dataset import Dataset

logger = logging.getLogger(__name__)


#: Rows per tracked batch of the evaluation's per-label batch results.
EVALUATION_BATCH = 1000


# --------------------------------------------------------------------------------------------- test


@dataclass
class EvaluationOutcome:
    """What :func:`evaluate_run` did.

    Attributes
    ----------
    run_dir : Path
        The evaluated model run.
    out_dir : Path
        The evaluation folder (``metrics.csv``, ``predictions.csv``, plots, ``resolved_config.toml``).
    labels : list of str
        The labels evaluated.
    n_spectra : int
        Spectra evaluated.
    result : dict
        What :func:`specabund.training.evaluate.evaluate` returned (``metrics`` per label and bin, files).
    verdicts : DataFrame or None
        The CNN's rows of the comparison with the labels-only baseline (when baselines exist).
    information_limit : DataFrame or None
        RMSE against the Cramer-Rao bound (with ``truth``).
    """

    run_dir: Path
    out_dir: Path
    labels: list[str]
    n_spectra: int
    result: dict[str, Any]
    verdicts: pd.DataFrame | None = None
    information_limit: pd.DataFrame | None = field(default=None)


def evaluate_run(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    device: str,
    *,
    data_path: str | Path | None = None,
    model: str | Path | None = None,
    elements: Sequence[str] = (),
    truth: str | Path | None = None,
    isochrones: str | Path | None = None,
    command: str = "specabund test",
) -> EvaluationOutcome:
    """The ``test`` workflow: evaluate a trained run on held-out data.

    Writes the evaluation folder, the per-label evaluation batch results, the CNN rows of the baseline
    comparison and, with ``truth``, ``information_limit.csv``.

    Parameters
    ----------
    workspace : Workspace
        The working directory (its folder names are replaced by ``cfg['paths']``).
    cfg : mapping
        The resolved configuration.
    device : str
        The resolved device.
    data_path : path, optional
        The data (its test split when it has one); default the test dataset under ``processed_dir``.
    model : str or path, optional
        Run name under the models folder, or a path (default: the newest run).
    elements : sequence of str
        Labels to evaluate (default: every label of the model).
    truth : path, optional
        Simulator ``truth.csv``: also report RMSE against the Cramer-Rao bound.
    isochrones : path, optional
        MIST ``.iso`` file drawn on the Kiel diagrams.
    command : str
        Named in the lock file of the evaluation folder.
    """
    from ..dataset import load_dataset
    from ..elements import resolve_labels
    from ..runs import resolve_run
    from ..training.evaluate import evaluate
    from ..training.saved import load_model

    ws = workspace.with_paths(cfg["paths"])
    run_dir = resolve_run(ws.models(), model)
    loaded = load_model(run_dir, device)
    ds = load_dataset(ws.resolve(data_path) if data_path is not None else ws.dataset_path("test"))
    if (ds.split == 2).any() and (ds.split != 2).any():
        ds = ds.split_subset("test")
    labels = resolve_labels(list(elements) or None, loaded.labels, what=f"labels of model {run_dir.name}")
    out = ws.result_dir("evaluation")
    ev = cfg["evaluation"]
    with FolderLock(out, command):
        res = evaluate(
            loaded,
            ds,
            labels,
            out,
            snr_bins=ev["snr_bins"],
            logg_split=ev["logg_split"],
            isochrones=Path(isochrones) if isochrones is not None else None,
        )
        save_config(cfg, out / RESOLVED_CONFIG)
        evaluation_batches(ws, out, labels)
        verdicts = cnn_comparison_rows(ws, out, labels, ev["snr_bins"])
        limit = None
        if truth is not None:
            limit = information_limit(ws.resolve(truth), ds, out, labels, ev["snr_bins"])
    return EvaluationOutcome(
        run_dir=run_dir,
        out_dir=out,
        labels=labels,
        n_spectra=len(ds),
        result=res,
        verdicts=verdicts,
        information_limit=limit,
    )


def evaluation_batches(ws: Workspace, out: Path, labels: Sequence[str]) -> None:
    """Per-batch metrics rows in the evaluation batch-results folders (from ``predictions.csv``)."""
    import pandas as pd

    from ..metrics import regression_metrics
    from ..tracking import BatchTracker

    pred = pd.read_csv(out / "predictions.csv")
    for lab in labels:
        tracker = BatchTracker(ws.batch_results("evaluation", lab), lab)
        for k, start in enumerate(range(0, len(pred), EVALUATION_BATCH), start=1):
            part = pred.iloc[start : start + EVALUATION_BATCH]
            m = regression_metrics(part[f"{lab}_true"].to_numpy(), part[f"{lab}_pred"].to_numpy())
            m["median_err"] = float(np.nanmedian(part[f"{lab}_err"])) if len(part) else float("nan")
            tracker.record(k, m)
        tracker.finalize(["rmse", "robust_scatter", "bias", "r2", "median_err"])


def cnn_comparison_rows(
    ws: Workspace, out: Path, labels: Sequence[str], snr_bins: Sequence[float]
) -> pd.DataFrame | None:
    """Add the CNN to the baseline comparison table (same test split); return its labels-only verdicts."""
    try:
        from ..baselines.comparison import labels_only_verdicts, update_comparison
    except ImportError:
        return None
    import pandas as pd

    from ..metrics import metrics_by_snr

    pred = pd.read_csv(out / "predictions.csv")
    rows = []
    for lab in labels:
        if not lab.endswith("_FE"):
            continue
        by = metrics_by_snr(pred[f"{lab}_true"], pred[f"{lab}_pred"], pred["snr"], list(snr_bins))
        for bin_name, m in by.items():
            rows.append(
                {
                    "model": "cnn",
                    "element": lab,
                    "snr_bin": bin_name,
                    **{k: m[k] for k in ("n", "rmse", "robust_scatter", "bias", "r2")},
                }
            )
    if not rows:
        return None
    table = update_comparison(ws.results_path, rows)
    verdicts = labels_only_verdicts(table[table["model"] == "cnn"])
    return verdicts[verdicts["verdict"].astype(bool)] if len(verdicts) else verdicts


def information_limit(
    truth: Path, ds: Dataset, out: Path, labels: Sequence[str], snr_bins: Sequence[float]
) -> pd.DataFrame:
    """RMSE against the Cramer-Rao bound of the simulator, written to ``information_limit.csv``."""
    import pandas as pd

    from ..evaluation.crb import cramer_rao_bounds, information_limit_table, load_truth

    labels = list(labels)
    pred = pd.read_csv(out / "predictions.csv")
    t = load_truth(truth, ds)
    bounds = cramer_rao_bounds(t, ds.ivar, ds.wavelength, labels)
    y_true = pred[[f"{lab}_true" for lab in labels]].to_numpy()
    y_pred = pred[[f"{lab}_pred" for lab in labels]].to_numpy()
    table = information_limit_table(y_true, y_pred, bounds, ds.snr, labels, list(snr_bins))
    with atomic_write(out / "information_limit.csv", "w", encoding="utf-8", newline="") as fh:
        table.to_csv(fh, index=False)
    return table
