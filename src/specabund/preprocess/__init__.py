"""Preprocessing: per-spectrum steps (:mod:`.steps`) and the dataset pipeline (:mod:`.pipeline`)."""

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
