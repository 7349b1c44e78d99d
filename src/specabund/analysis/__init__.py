"""Model analysis: feature importance, residual analysis, browsing results and the HTML report.

* :mod:`.importance` - integrated gradients and occlusion of a trained network (captum), top regions;
* :mod:`.explain` - naming regions with the shipped line list, own lines vs other species;
* :mod:`.residuals` - residual metrics, figure and report;
* :mod:`.runner` - both analyses over (resumable, tracked) batches of spectra;
* :mod:`.show` - reading the batch results of every stage (``specabund show-results``);
* :mod:`.report_html` - the self-contained ``results/report.html`` (``specabund report``).
"""

from __future__ import annotations

from .explain import Explanation, explain_importance, explanation_text, own_line_mask
from .importance import (
    AttributionStats,
    ImportanceSettings,
    LabelMean,
    attribute_batch,
    importance_figure,
    integrated_gradients,
    occlusion,
    top_regions,
)
from .residuals import prediction_frame, residual_figure, residual_metrics, residual_report_text
from .runner import (
    FEATURE_IMPORTANCE_DIR,
    RESIDUAL_ANALYSIS_DIR,
    AnalysisResult,
    batch_folder,
    run_feature_importance,
    run_residual_analysis,
    select_spectra,
)

__all__ = [
    "FEATURE_IMPORTANCE_DIR",
    "RESIDUAL_ANALYSIS_DIR",
    "AnalysisResult",
    "AttributionStats",
    "Explanation",
    "ImportanceSettings",
    "LabelMean",
    "attribute_batch",
    "batch_folder",
    "explain_importance",
    "explanation_text",
    "importance_figure",
    "integrated_gradients",
    "occlusion",
    "own_line_mask",
    "prediction_frame",
    "residual_figure",
    "residual_metrics",
    "residual_report_text",
    "run_feature_importance",
    "run_residual_analysis",
    "select_spectra",
    "top_regions",
]
