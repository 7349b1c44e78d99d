"""The ``preprocess`` workflow: FITS files into training-ready datasets."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import (
    parse_settings,
    save_config,
)
from ..errors import SpecabundError
from ..workspace import FolderLock, Workspace
from .common import RESOLVED_CONFIG

if TYPE_CHECKING:  # pragma: no cover
    pass

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- preprocess


def preprocess_run(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    *,
    reference_csv: str | Path | None = None,
    prediction_csv: str | Path | None = None,
    fits_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    n_workers: int | None = None,
    use_cache: bool = True,
    clear_cache: bool = False,
    plots: bool = True,
    progress: bool = False,
    command: str = "specabund preprocess",
    dataset_format: str = "auto",
    client: Any = None,
) -> tuple[Path, dict[str, Any]]:
    """The ``preprocess`` workflow: FITS files into training-ready datasets.

    Parameters
    ----------
    workspace : Workspace
        The working directory (folder names from ``cfg['paths']``).
    cfg : mapping
        The resolved configuration (``[preprocess]``, ``[data]``; written beside the datasets).
    reference_csv, prediction_csv : path, optional
        The label catalogues (at least one).
    fits_dir, output_dir : path, optional
        Default: ``[paths] fits_dir`` and ``processed_dir``.
    n_workers : int, optional
        Worker processes (default ``preprocess.n_workers``).
    use_cache, clear_cache : bool
        Read and keep / first delete the per-chunk cache.
    plots : bool
        Write the preprocessing plots under the plots folder.
    progress : bool
        Show progress bars.
    command : str
        Named in the lock file of the output folder.
    dataset_format : {'auto', 'npz', 'zarr'}
        Dataset files (``auto``: a Zarr store when flux + ivar of a set exceed 1 GB).
    client : dask.distributed.Client, optional
        Run each chunk as one Dask task (``--cluster``); None: local processes.

    Returns
    -------
    output_dir : Path
        Where the datasets went.
    manifest : dict
        Counts, labels, rejections and options.
    """
    from ..catalog import CatalogRules
    from ..preprocess import PipelineSettings, run_preprocess

    if reference_csv is None and prediction_csv is None:
        raise SpecabundError("give a reference catalogue, a prediction catalogue or both")
    settings = parse_settings(cfg)
    ws = workspace.with_paths(cfg["paths"])
    pipe, data = settings.pipeline, settings.data
    pipeline = PipelineSettings(
        chunk_size=pipe.chunk_size,
        n_workers=n_workers if n_workers is not None else pipe.n_workers,
        batch_size=pipe.batch_size,
        normalize=pipe.normalize,
        n_plot_examples=pipe.n_plot_examples,
        use_cache=use_cache,
        clear_cache=clear_cache,
        seed=data.seed,
        split_fractions=tuple(data.split_fractions),  # type: ignore[arg-type]
        elements=list(data.elements) or None,
        include_stellar_parameters=data.include_stellar_parameters,
        catalog_rules=CatalogRules.from_config(cfg["data"]),
        progress=progress,
        format=dataset_format,
    )
    fdir = ws.resolve(fits_dir if fits_dir is not None else ws.fits_dir)
    odir = ws.resolve(output_dir if output_dir is not None else ws.processed_dir)
    with FolderLock(odir, command):
        manifest = run_preprocess(
            fits_dir=fdir,
            output_dir=odir,
            reference_csv=ws.resolve(reference_csv) if reference_csv is not None else None,
            prediction_csv=ws.resolve(prediction_csv) if prediction_csv is not None else None,
            options=settings.preprocess_options(),
            settings=pipeline,
            plots_dir=ws.plots_path if plots else None,
            client=client,
        )
        save_config(cfg, odir / RESOLVED_CONFIG)
    return odir, manifest
