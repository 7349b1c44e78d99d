"""The ``analyze`` workflow: feature importance and residual analysis of a trained run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import (
    save_config,
)
from ..errors import SpecabundError
from ..workspace import FolderLock, Workspace
from .common import RESOLVED_CONFIG

if TYPE_CHECKING:  # pragma: no cover
    from ..dataset import Dataset

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- analyze

#: ``specabund analyze --type`` values.
ANALYSIS_TYPES = ("feature_importance", "residual_analysis", "both")


@dataclass
class AnalysisPlan:
    """The model, data and labels of an analysis (see :func:`plan_analysis`)."""

    workspace: Workspace
    cfg: dict[str, Any]
    run_dir: Path
    model: Any
    data_path: Path
    dataset: Dataset
    labels: list[str]
    kinds: list[str]


def plan_analysis(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    device: str,
    *,
    elements: Sequence[str] = (),
    analysis_type: str = "both",
    model: str | Path | None = None,
    data_path: str | Path | None = None,
) -> AnalysisPlan:
    """Load the model and data of ``specabund analyze`` and choose the labels.

    Labels default to every abundance the model predicts (else all its labels); ``data_path`` to the test
    dataset under ``processed_dir``.
    """
    from ..dataset import load_dataset
    from ..elements import is_abundance, normalize_label
    from ..runs import resolve_run
    from ..training.saved import load_model

    if analysis_type not in ANALYSIS_TYPES:
        raise SpecabundError(f"analysis type {analysis_type!r}; choose from {', '.join(ANALYSIS_TYPES)}")
    ws = workspace.with_paths(cfg["paths"])
    run_dir = resolve_run(ws.models_path, model)
    loaded = load_model(run_dir, device)
    path = ws.resolve(data_path) if data_path is not None else ws.dataset_path("test")
    if not path.exists():
        raise SpecabundError(f"{path}: no such dataset; run 'specabund preprocess' or give --data-path")
    ds = load_dataset(path)
    loaded.check_compatible(ds)
    if elements:
        labels = [normalize_label(e) for e in elements]
        unknown = [lab for lab in labels if lab not in loaded.labels]
        if unknown:
            raise SpecabundError(
                f"model {run_dir.name} does not predict {unknown}; it predicts {loaded.labels}"
            )
    else:
        labels = [lab for lab in loaded.labels if is_abundance(lab)] or list(loaded.labels)
    kinds = ["feature_importance", "residual_analysis"] if analysis_type == "both" else [analysis_type]
    return AnalysisPlan(ws, dict(cfg), run_dir, loaded, path, ds, labels, kinds)


AnalysisHook = Callable[[str, str, Any], None]


def run_analysis(
    plan: AnalysisPlan,
    *,
    save_batch_results: bool = False,
    on_result: AnalysisHook | None = None,
    command: str = "specabund analyze",
) -> list[tuple[str, str, Any]]:
    """Run the analyses of ``plan``; return ``(kind, label, result)`` per analysis.

    ``result`` is an :class:`~specabund.analysis.runner.AnalysisResult`, or ``None`` for a residual
    analysis skipped because the data hold no true values of the label. ``on_result(kind, label, result)``
    is called as each one finishes. Each analysis folder gets the resolved configuration.
    """
    from ..analysis import ImportanceSettings, run_feature_importance, run_residual_analysis

    cfg, ws, ds = plan.cfg, plan.workspace, plan.dataset
    acfg = cfg["analysis"]
    settings = ImportanceSettings.from_mapping(acfg)
    batch = int(acfg["analysis_batch_size"])
    max_n = int(acfg["max_spectra"]) or None
    seed = int(cfg["data"]["seed"])
    done: list[tuple[str, str, Any]] = []
    for kind in plan.kinds:
        out = ws.result_dir(kind)
        with FolderLock(out, command):
            for lab in plan.labels:
                res: Any = None
                if kind == "feature_importance":
                    res = run_feature_importance(
                        plan.model, ds, lab, out, settings=settings, batch_size=batch,
                        save_batch_results=save_batch_results, max_spectra=max_n, seed=seed,
                    )  # fmt: skip
                elif lab in ds.elements:
                    res = run_residual_analysis(
                        plan.model, ds, lab, out, batch_size=batch, save_batch_results=save_batch_results,
                        max_spectra=max_n, seed=seed, snr_bins=tuple(cfg["evaluation"]["snr_bins"]),
                    )  # fmt: skip
                done.append((kind, lab, res))
                if on_result is not None:
                    on_result(kind, lab, res)
            save_config(cfg, out / RESOLVED_CONFIG)
    return done
