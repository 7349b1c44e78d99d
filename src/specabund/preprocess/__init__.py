"""Preprocessing: per-spectrum steps (:mod:`.steps`, one module a step) and the dataset pipeline.

:mod:`.pipeline` turns FITS files and catalogues into datasets; :mod:`.report` writes the validation report
and :mod:`.plots` the figures of one spectrum's stages.
"""

from __future__ import annotations

from .options import PreprocessOptions
from .pipeline import PipelineSettings, preprocess_hash, process_file, run_preprocess, split_groups

__all__ = [
    "PipelineSettings",
    "PreprocessOptions",
    "preprocess_hash",
    "process_file",
    "run_preprocess",
    "split_groups",
]
