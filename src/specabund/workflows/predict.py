"""The ``predict`` workflows: a catalogue for datasets or raw FITS files, and the calibration."""

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
from ..utils import atomic_write_json
from ..workspace import FolderLock, Workspace
from .common import RESOLVED_CONFIG

if TYPE_CHECKING:  # pragma: no cover
    pass

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- predict


@dataclass
class PredictionOutcome:
    """What :func:`predict_run` or :func:`calibrate_run` did.

    Attributes
    ----------
    run_dir : Path
        The model run.
    out_dir : Path
        The output folder.
    summary : dict
        ``summary.json`` of a prediction, or the calibration report.
    input : Path or None
        The dataset predicted (or calibrated on); None for raw files.
    """

    run_dir: Path
    out_dir: Path
    summary: dict[str, Any]
    input: Path | None = None


def _prediction_target(
    ws: Workspace, model: str | Path | None, device: str, output_dir: str | Path | None
) -> tuple[Path, Any, Path]:
    from ..runs import resolve_run
    from ..training.saved import load_model

    run_dir = resolve_run(ws.models_path, model)
    predictor = load_model(run_dir, device)
    out = ws.resolve(output_dir) if output_dir is not None else ws.result_dir("prediction")
    return run_dir, predictor, out


def _settings(
    run_dir: Path, device: str, mc_samples: int, batch_size: int, seed: int, ensemble_mode: bool
) -> dict[str, Any]:
    """The ``settings`` recorded in a prediction summary or calibration report."""
    return {
        "model": str(run_dir),
        "device": str(device),
        "mc_samples": mc_samples,
        "batch_size": batch_size,
        "seed": seed,
        "ensemble_mode": ensemble_mode,
    }


def predict_run(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    device: str,
    *,
    data_path: str | Path | None = None,
    fits_dir: str | Path | None = None,
    files: str | None = None,
    catalog: str | Path | None = None,
    model: str | Path | None = None,
    output_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    ensemble_mode: bool = False,
    mc_samples: int = 50,
    batch_size: int = 64,
    seed: int = 0,
    apply_calibration: bool = True,
    preprocess_config: str | Path | None = None,
    n_workers: int = 1,
    chunk_size: int = 10000,
    plots: bool = True,
    command: str = "specabund predict",
    client: Any = None,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> PredictionOutcome:
    """The ``predict`` workflow: a catalogue for a dataset or raw FITS files (see
    :func:`specabund.predict.run_prediction` for the outputs).

    Parameters
    ----------
    workspace : Workspace
        The working directory (folder names from ``cfg['paths']``).
    cfg : mapping
        The resolved configuration (written beside the catalogue).
    device : str
        The resolved device.
    data_path : path, optional
        A preprocessed dataset (default: the prediction dataset under ``processed_dir``).
    fits_dir, files : optional
        Raw FITS: a folder, or a glob / text file listing paths (instead of ``data_path``).
    catalog : path, optional
        CSV naming raw spectra (spec, rv, group, reference labels).
    model : str or path, optional
        Run name or path (default: the newest run).
    output_dir : path, optional
        Output folder (default: the prediction results folder).
    labels, ensemble_mode, mc_samples, batch_size, seed, apply_calibration, chunk_size, plots
        See :func:`specabund.predict.run_prediction`.
    preprocess_config : path, optional
        ``manifest.json`` of the model's training data.
    n_workers : int
        Processes preprocessing raw files.
    command : str
        Named in the lock file of the output folder.
    client : dask.distributed.Client, optional
        Predict a preprocessed dataset in parts of ``chunk_size`` spectra, one Dask task each
        (:func:`specabund.predict.parts.predict_in_parts`); a ``.zarr`` store is always predicted in parts
        (streamed, in process without a client). The summary then has ``parts``.
    progress : callable, optional
        ``progress(total)`` is called once with the number of spectra to predict and returns the callback
        ``update(n)`` (n more spectra done) passed to :func:`specabund.predict.run_prediction`.
    """
    from ..config import dumps
    from ..dataset import load_dataset
    from ..predict import (
        PredictionInputs,
        collect_files,
        read_prediction_catalog,
        resolve_preprocess,
        run_prediction,
    )
    from ..predict.parts import predict_in_parts
    from ..store import is_zarr, resolve_dataset_path

    if sum(x is not None for x in (data_path, fits_dir, files)) > 1:
        raise SpecabundError("give only one of data_path, fits_dir and files")
    if client is not None and data_path is None and (fits_dir is not None or files is not None):
        raise SpecabundError("a Dask cluster predicts a preprocessed dataset (preprocess with it first)")
    ws = workspace.with_paths(cfg["paths"])
    run_dir, predictor, out = _prediction_target(ws, model, device, output_dir)
    settings = _settings(run_dir, device, mc_samples, batch_size, seed, ensemble_mode)
    path: Path | None = None
    with FolderLock(out, command):
        if fits_dir is not None or files is not None:
            paths, root = collect_files(ws.resolve(fits_dir) if fits_dir is not None else None, files)
            opts, normalize, source = resolve_preprocess(
                predictor,
                ws.resolve(preprocess_config) if preprocess_config is not None else None,
                [ws.manifest_path()],
            )
            cat = read_prediction_catalog(ws.resolve(catalog)) if catalog is not None else None
            inputs = PredictionInputs.from_fits(
                paths, opts, normalize=normalize, catalog=cat, fits_dir=root, n_workers=n_workers
            )
            settings.update(input=str(fits_dir or files), preprocess_options_from=source)
        else:
            path = resolve_dataset_path(
                ws.resolve(data_path) if data_path is not None else ws.dataset_path("prediction")
            )
            if client is not None or is_zarr(path):  # survey scale: stream, write the catalogue in parts
                s = predict_in_parts(
                    path,
                    run_dir,
                    out,
                    part_rows=chunk_size,
                    device=str(device),
                    labels=list(labels) if labels else None,
                    ensemble_mode=ensemble_mode,
                    n_samples=mc_samples,
                    batch_size=batch_size,
                    seed=seed,
                    apply_calibration=apply_calibration,
                    plots=plots,
                    client=client,
                    extra={"settings": {**settings, "input": str(path), "cluster": client is not None}},
                )
                save_config(cfg, out / RESOLVED_CONFIG)
                return PredictionOutcome(run_dir=run_dir, out_dir=out, summary=s, input=path)
            inputs = PredictionInputs.from_dataset(load_dataset(path))
            settings.update(input=str(path))
        summary = run_prediction(
            predictor,
            inputs,
            out,
            labels=list(labels) if labels else None,
            ensemble_mode=ensemble_mode,
            n_samples=mc_samples,
            batch_size=batch_size,
            seed=seed,
            apply_calibration=apply_calibration,
            batch_root=ws.results(),
            chunk_size=chunk_size,
            plots=plots,
            extra={"settings": settings},
            extra_files={RESOLVED_CONFIG: "# resolved specabund configuration\n" + dumps(cfg)},
            progress=progress(int(inputs.ok.sum())) if progress is not None else None,
        )
    return PredictionOutcome(run_dir=run_dir, out_dir=out, summary=summary, input=path)


def calibrate_run(
    workspace: Workspace,
    cfg: Mapping[str, Any],
    device: str,
    *,
    data_path: str | Path | None = None,
    model: str | Path | None = None,
    output_dir: str | Path | None = None,
    train_data: str | Path | None = None,
    test_data: str | Path | None = None,
    labels: Sequence[str] | None = None,
    ensemble_mode: bool = False,
    mc_samples: int = 50,
    batch_size: int = 64,
    seed: int = 0,
    method: str = "coverage",
    plots: bool = True,
    command: str = "specabund predict",
    label_errors: Mapping[str, float] | None = None,
) -> PredictionOutcome:
    """Fit the uncertainty calibration and OOD reference of a run (``specabund predict --calibrate``).

    Stores ``calibration.json``/``ood_reference.npz`` in the run folder and writes
    ``calibration_report.json`` (and the pull histograms) to the output folder.

    Parameters
    ----------
    data_path : path, optional
        The validation dataset (default: ``val_dataset.npz`` under ``processed_dir``).
    train_data, test_data : path, optional
        OOD/label-range reference and held-out coverage check (default: beside ``data_path``, when there).
    method : {'coverage', 'mad'}
        See :func:`specabund.predict.calibration.fit_scale`.
    label_errors : mapping, optional
        Typical error per label of the validation labels where the dataset carries none (see
        :func:`specabund.predict.calibrate`).

    Other parameters are those of :func:`predict_run`.
    """
    from ..dataset import load_dataset
    from ..plotting import save_figure
    from ..predict import calibrate
    from ..predict.plots import z_histogram_figure

    ws = workspace.with_paths(cfg["paths"])
    run_dir, predictor, out = _prediction_target(ws, model, device, output_dir)
    settings = _settings(run_dir, device, mc_samples, batch_size, seed, ensemble_mode)
    from ..store import resolve_dataset_path

    val_given = ws.resolve(data_path) if data_path is not None else ws.dataset_path("val")
    val_path = resolve_dataset_path(val_given)
    beside = val_path.parent  # the training and test sets beside it, .npz or .zarr
    tr = ws.resolve(train_data) if train_data else resolve_dataset_path(beside / "train_dataset.npz")
    te = ws.resolve(test_data) if test_data else resolve_dataset_path(beside / "test_dataset.npz")
    with FolderLock(out, command), FolderLock(run_dir, command):  # the calibration is stored with the model
        res = calibrate(
            predictor,
            load_dataset(val_path),
            train_dataset=load_dataset(tr) if tr.exists() else None,
            test_dataset=load_dataset(te) if te.exists() else None,
            labels=list(labels) if labels else None,
            ensemble_mode=ensemble_mode,
            n_samples=mc_samples,
            batch_size=batch_size,
            seed=seed,
            method=method,
            label_errors=dict(label_errors) if label_errors else None,
        )
        report = {**res.report, "val_data": str(val_path), "settings": settings}
        report["train_data"] = str(tr) if tr.exists() else None
        report["test_data"] = str(te) if te.exists() else None
        atomic_write_json(out / "calibration_report.json", report)
        if plots and res.z_val is not None:
            fig = z_histogram_figure(res.labels, res.z_val, res.scale, res.z_test)
            save_figure(fig, out / "calibration_z_histograms.png")
        save_config(cfg, out / RESOLVED_CONFIG)
    return PredictionOutcome(run_dir=run_dir, out_dir=out, summary=report, input=val_path)
