"""Baseline models for comparison with the CNN: XGBoost, LightGBM and a Cannon-style polynomial model.

* :mod:`.boosting` - one gradient-boosted tree regressor per label on PCA-reduced (default) or raw spectra.
* :mod:`.cannon` - per-pixel polynomial model in all labels (the Cannon), fitted by weighted least squares
  with intrinsic scatter and censoring; labels inferred per spectrum by Levenberg-Marquardt.
* :mod:`.regional` - one Cannon per k-means region of the stellar parameters (the default Cannon baseline).
* :mod:`.registry` - the protocol every baseline offers the runner (``fit``, ``predict``, ``save``, ``load``)
  and the registry of baselines by name (:data:`BASELINES`).
* :mod:`.runner` - :func:`run_baseline`: resumable batch training with per-batch metrics and plots.
* :mod:`.comparison` - the ``<out_root>/baseline/comparison.csv`` table shared with the CNN and its figure.
"""

from __future__ import annotations

from .boosting import BOOSTING_KINDS, BoostingConfig, BoostingRegressor
from .cannon import DEFAULT_SCATTER_GRID, CannonModel
from .comparison import (
    COMPARISON_COLUMNS,
    comparison_figure,
    comparison_path,
    comparison_rows,
    read_comparison,
    save_comparison_figure,
    update_comparison,
)
from .features import PCAReducer
from .regional import RegionalCannon, load_cannon
from .registry import (
    BASELINES,
    Baseline,
    BaselineKind,
    CannonSettings,
    RunContext,
    baseline_kind,
    cannon_label_names,
    label_column,
)
from .runner import (
    BASE_MODELS,
    MODEL_CHOICES,
    batch_results_dir,
    load_baseline,
    resolve_models,
    run_baseline,
    show_batch_results,
)

__all__ = [
    "BASELINES",
    "BASE_MODELS",
    "BOOSTING_KINDS",
    "COMPARISON_COLUMNS",
    "DEFAULT_SCATTER_GRID",
    "MODEL_CHOICES",
    "Baseline",
    "BaselineKind",
    "BoostingConfig",
    "BoostingRegressor",
    "CannonModel",
    "CannonSettings",
    "PCAReducer",
    "RegionalCannon",
    "RunContext",
    "baseline_kind",
    "batch_results_dir",
    "cannon_label_names",
    "comparison_figure",
    "comparison_path",
    "comparison_rows",
    "label_column",
    "load_baseline",
    "load_cannon",
    "read_comparison",
    "resolve_models",
    "run_baseline",
    "save_comparison_figure",
    "show_batch_results",
    "update_comparison",
]
