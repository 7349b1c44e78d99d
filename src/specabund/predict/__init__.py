"""Prediction with calibrated uncertainties (``specabund predict``).

:mod:`.uncertainty`
    MC-Dropout and ensemble prediction with model and data uncertainty terms.
:mod:`.calibration`
    Per-label uncertainty scales fitted on the validation set and stored with the model.
:mod:`.ood`
    Out-of-distribution flags (training label range, PCA distance of the spectrum).
:mod:`.inputs`
    Preprocessed datasets or raw FITS files preprocessed with the model's options.
:mod:`.catalogue`
    The prediction run and its catalogue (``predictions.csv``/``.fits``, ``summary.json``, plots).
:mod:`.repeats`
    Label-free precision test on repeat observations.
"""

from __future__ import annotations

from .calibration import (
    CALIBRATION_FILE,
    CalibrationResult,
    StoredCalibration,
    calibrate,
    coverage,
    fit_scale,
    load_stored,
    read_calibration,
    z_scores,
)
from .catalogue import FLAG_BITS, contract_columns, run_prediction, write_table
from .inputs import PredictionInputs, collect_files, read_prediction_catalog, resolve_preprocess
from .ood import SpectralOOD, label_range, out_of_range
from .repeats import repeat_pairs, repeat_summary, write_repeats
from .uncertainty import (
    UncertainPrediction,
    mc_dropout_mode,
    predict_with_uncertainty,
    validate_labels,
)

__all__ = [
    "CALIBRATION_FILE",
    "FLAG_BITS",
    "CalibrationResult",
    "PredictionInputs",
    "SpectralOOD",
    "StoredCalibration",
    "UncertainPrediction",
    "calibrate",
    "collect_files",
    "contract_columns",
    "coverage",
    "fit_scale",
    "label_range",
    "load_stored",
    "mc_dropout_mode",
    "out_of_range",
    "predict_with_uncertainty",
    "read_calibration",
    "read_prediction_catalog",
    "repeat_pairs",
    "repeat_summary",
    "resolve_preprocess",
    "run_prediction",
    "validate_labels",
    "write_repeats",
    "write_table",
    "z_scores",
]
