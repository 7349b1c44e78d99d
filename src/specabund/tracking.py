"""Batch tracking shared by training, evaluation, prediction, baselines and analysis.

A :class:`BatchTracker` owns one folder (for example ``results/feature_importance/C_FE_batch_results``).
Each finished batch adds one row to ``batch_tracking.csv`` (rewritten atomically), so an interrupted run
knows which batches are done and continues at the next one. ``finalize`` writes the trend plot and the
text summary across batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .utils import atomic_write, atomic_write_text

TRACKING_FILE = "batch_tracking.csv"


class BatchTracker:
    """Record per-batch metrics in a folder and summarise them.

    Parameters
    ----------
    folder : Path
        Folder holding ``batch_tracking.csv`` and the per-batch outputs; created on demand.
    name : str
        Prefix of the summary files (e.g. the element, ``'C_FE'``).
    """

    def __init__(self, folder: str | Path, name: str) -> None:
        self.folder = Path(folder)
        self.name = name

    @property
    def csv_path(self) -> Path:
        return self.folder / TRACKING_FILE

    def table(self) -> pd.DataFrame:
        """All recorded batches, sorted by batch number (empty frame when none)."""
        if not self.csv_path.exists():
            return pd.DataFrame({"batch": pd.Series(dtype=int)})
        df = pd.read_csv(self.csv_path)
        return df.sort_values("batch").reset_index(drop=True)

    def completed(self) -> list[int]:
        """Batch numbers already recorded."""
        return [int(b) for b in self.table()["batch"].tolist()]

    def is_done(self, batch: int) -> bool:
        return int(batch) in set(self.completed())

    def batch_path(self, batch: int, suffix: str) -> Path:
        """Path of a per-batch output file, ``<folder>/batch_<k>_<suffix>``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f"batch_{int(batch)}_{suffix}"

    def record(self, batch: int, metrics: Mapping[str, Any]) -> None:
        """Add (or replace) the row of ``batch`` and rewrite the CSV atomically."""
        row: dict[str, Any] = {"batch": int(batch)}
        row.update({k: v for k, v in metrics.items() if k != "batch"})
        row["recorded_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        df = self.table()
        df = df[df["batch"] != int(batch)]
        df = pd.concat([df, pd.DataFrame([row])], ignore_index=True).sort_values("batch")
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.csv_path, "w", encoding="utf-8", newline="") as fh:
            df.to_csv(fh, index=False)

    def numeric_columns(self) -> list[str]:
        df = self.table()
        return [
            c
            for c in df.columns
            if c != "batch" and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()
        ]

    def trend_figure(self, metrics: Sequence[str] | None = None, title: str | None = None) -> Figure:
        """One panel per metric against batch number, with the running mean."""
        df = self.table()
        cols = list(metrics) if metrics is not None else self.numeric_columns()
        cols = [c for c in cols if c in df.columns]
        n = max(len(cols), 1)
        ncol = min(n, 3)
        nrow = math.ceil(n / ncol)
        fig = Figure(figsize=(4.2 * ncol, 3.0 * nrow), layout="constrained")
        axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
        for ax, col in zip(axes, cols, strict=False):
            x = df["batch"].to_numpy()
            y = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
            ax.plot(x, y, "o-", ms=3, label=col)
            if len(y) > 1:
                run = np.cumsum(np.nan_to_num(y)) / np.cumsum(np.isfinite(y)).clip(min=1)
                ax.plot(x, run, "--", color="0.4", lw=1, label="running mean")
            ax.set_xlabel("batch")
            ax.set_ylabel(col)
            ax.grid(alpha=0.3)
        for ax in axes[len(cols) :]:
            ax.set_visible(False)
        if not cols:
            axes[0].text(0.5, 0.5, "no batches recorded", ha="center", va="center")
        fig.suptitle(title or f"{self.name}: batch trends")
        return fig

    def summary_text(self, title: str | None = None) -> str:
        """Plain-text summary: number of batches and mean/std/min/max/last of every numeric column."""
        df = self.table()
        lines = [title or f"{self.name}: batch summary", f"batches recorded: {len(df)}"]
        if len(df):
            lines.append(f"batches: {df['batch'].min()}..{df['batch'].max()}")
            lines.append("")
            lines.append(f"{'metric':<28}{'mean':>12}{'std':>12}{'min':>12}{'max':>12}{'last':>12}")
            for col in self.numeric_columns():
                v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
                f = v[np.isfinite(v)]
                if f.size == 0:
                    continue
                lines.append(
                    f"{col:<28}{f.mean():>12.4g}{f.std():>12.4g}{f.min():>12.4g}{f.max():>12.4g}{v[-1]:>12.4g}"
                )
        return "\n".join(lines) + "\n"

    def finalize(self, metrics: Sequence[str] | None = None) -> dict[str, Path]:
        """Write ``<name>_batch_trends.png`` and ``<name>_batch_summary.txt``; return their paths."""
        self.folder.mkdir(parents=True, exist_ok=True)
        png = self.folder / f"{self.name}_batch_trends.png"
        txt = self.folder / f"{self.name}_batch_summary.txt"
        fig = self.trend_figure(metrics)
        with atomic_write(png, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110)
        atomic_write_text(txt, self.summary_text())
        return {"trends": png, "summary": txt}
