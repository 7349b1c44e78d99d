"""Label-free precision test on repeat observations of the same star.

For two spectra of one star the predictions ``p1, p2`` with uncertainties ``s1, s2`` give the pull
``(p1 - p2) / sqrt(s1**2 + s2**2)``, which has unit width when the uncertainties are right (the true label
cancels). Groups of more than two spectra contribute every pair. Flagged rows (no prediction) are left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..metrics import robust_scatter
from ..plotting import save_figure
from ..utils import atomic_write, atomic_write_json
from .plots import pulls_figure


def repeat_pairs(
    groups: Sequence[str],
    spec: Sequence[str],
    labels: Sequence[str],
    mean: np.ndarray,
    err: np.ndarray,
    usable: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per pair of spectra sharing a group.

    Parameters
    ----------
    groups, spec : sequence of str
        Star identifier and spectrum name of every row.
    labels : sequence of str
        Column names of ``mean``/``err``.
    mean, err : numpy.ndarray
        ``(N, L)`` predictions and their (total) uncertainties.
    usable : numpy.ndarray of bool, optional
        Rows that may enter a pair (default: rows with a finite prediction of any label).

    Returns
    -------
    pandas.DataFrame
        Columns ``group, spec_1, spec_2`` and per label ``<L>_1, <L>_2, <L>_diff, <L>_err_pair, <L>_pull``.
    """
    groups = np.asarray(groups, dtype=str)
    spec = np.asarray(spec, dtype=str)
    mean = np.asarray(mean, dtype=float)
    err = np.asarray(err, dtype=float)
    if usable is None:
        usable = np.isfinite(mean).any(axis=1)
    rows: list[dict[str, Any]] = []
    idx = np.flatnonzero(usable & (groups != ""))
    order = idx[np.argsort(groups[idx], kind="stable")]
    uniq, start = np.unique(groups[order], return_index=True)
    bounds = [*start.tolist(), len(order)]
    for g, (a, b) in zip(uniq.tolist(), itertools.pairwise(bounds), strict=True):
        members = order[a:b]
        for i, j in itertools.combinations(members.tolist(), 2):
            row: dict[str, Any] = {"group": g, "spec_1": spec[i], "spec_2": spec[j]}
            for k, lab in enumerate(labels):
                d = mean[i, k] - mean[j, k]
                e = float(np.hypot(err[i, k], err[j, k]))
                row[f"{lab}_1"] = mean[i, k]
                row[f"{lab}_2"] = mean[j, k]
                row[f"{lab}_diff"] = d
                row[f"{lab}_err_pair"] = e
                row[f"{lab}_pull"] = d / e if e > 0 else np.nan
            rows.append(row)
    cols = ["group", "spec_1", "spec_2"] + [
        f"{lab}_{s}" for lab in labels for s in ("1", "2", "diff", "err_pair", "pull")
    ]
    return pd.DataFrame(rows, columns=cols)


def repeat_summary(pairs: pd.DataFrame, labels: Sequence[str]) -> dict[str, Any]:
    """Per label: pairs, pull mean/std/robust width, fraction of pulls within +-1 (0.683 expected), the
    median pair difference and the precision of one measurement estimated from the pairs
    (``robust_scatter(diff) / sqrt(2)``) against the median predicted uncertainty."""
    out: dict[str, Any] = {"n_pairs": len(pairs), "n_groups": int(pairs["group"].nunique()), "labels": {}}
    for lab in labels:
        pull = pairs[f"{lab}_pull"].to_numpy(dtype=float)
        diff = pairs[f"{lab}_diff"].to_numpy(dtype=float)
        ep = pairs[f"{lab}_err_pair"].to_numpy(dtype=float)
        ok = np.isfinite(pull)
        f = pull[ok]
        nan = float("nan")
        out["labels"][lab] = {
            "n_pairs": int(ok.sum()),
            "pull_mean": float(f.mean()) if f.size else nan,
            "pull_std": float(f.std()) if f.size else nan,
            "pull_robust_width": robust_scatter(f),
            "fraction_within_1": float(np.mean(np.abs(f) <= 1)) if f.size else nan,
            "median_abs_diff": float(np.median(np.abs(diff[ok]))) if f.size else nan,
            "precision_from_pairs": float(robust_scatter(diff[ok]) / np.sqrt(2)) if f.size else nan,
            "median_predicted_err": float(np.median(ep[ok]) / np.sqrt(2)) if f.size else nan,
        }
    return out


def write_repeats(
    out_dir: str | Path, pairs: pd.DataFrame, labels: Sequence[str], plot: bool = True
) -> dict[str, Any]:
    """Write ``repeats.csv``, ``repeats.json`` and (``plot``) ``repeats_pulls.png``; return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = repeat_summary(pairs, labels)
    with atomic_write(out_dir / "repeats.csv", "w", encoding="utf-8", newline="") as fh:
        pairs.to_csv(fh, index=False)
    atomic_write_json(out_dir / "repeats.json", summary)
    if not plot:
        return summary
    fig = pulls_figure(
        {lab: pairs[f"{lab}_pull"].to_numpy(dtype=float) for lab in labels},
        f"repeat observations: (p1 - p2) / sqrt(s1^2 + s2^2), {summary['n_pairs']} pairs",
    )
    save_figure(fig, out_dir / "repeats_pulls.png")
    return summary
