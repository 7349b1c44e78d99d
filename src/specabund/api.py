"""The Python interface: the same workflows as the ``specabund`` command line, as functions.

Example
-------
::

    import specabund

    specabund.simulate(60, "demo", seed=1)
    specabund.preprocess("demo/fits", "demo/processed_data", reference_csv="demo/X_FE.csv")
    run = specabund.train("demo/processed_data/reference_dataset.npz", workdir="demo",
                          labels=["MG_FE"], overrides={"training.epochs": 2})
    model = specabund.load_model(run.run_dir)
    table = model.predict("demo/fits", mc_samples=5)      # the columns of `specabund predict`

Nothing here prints, configures logging, seeds a global random generator or picks a device: every
function that runs a network takes ``device`` (``'cpu'`` unless told otherwise; ``'auto'`` picks CUDA when
available because it is asked to). Folders follow the ``[paths]`` of the configuration under ``workdir``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SpecabundError
from .io import read_lamost
from .workspace import Workspace

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .predict.inputs import PredictionInputs
    from .preprocess.steps import PreprocessResult
    from .spectrum import Spectrum
    from .training.saved import LoadedEnsemble, LoadedModel
    from .workflows import EvaluationOutcome, TrainOutcome

__all__ = [
    "Model",
    "evaluate",
    "load_model",
    "predict",
    "preprocess",
    "preprocess_spectrum",
    "read_lamost",
    "simulate",
    "train",
]

PathLike = str | Path


def _workspace(workdir: PathLike | None, config: PathLike | None = None) -> Workspace:
    from .config import load_config

    root = Path(workdir if workdir is not None else ".").resolve()
    cfg_file = _in(root, config)
    return Workspace.from_config(root, load_config(cfg_file)["paths"])


def _in(root: Path, path: PathLike | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    return p if p.is_absolute() else root / p


def _device(device: str) -> str:
    from .training.trainer import resolve_device

    return str(resolve_device(device))


# ------------------------------------------------------------------------------------------ spectra


def preprocess_spectrum(
    spectrum: Spectrum | PathLike,
    options: Any = None,
    *,
    rv_kms: float | None = None,
    **kwargs: Any,
) -> PreprocessResult:
    """Preprocess one spectrum (a :class:`~specabund.spectrum.Spectrum` or a LAMOST FITS path).

    Parameters
    ----------
    spectrum : Spectrum or path
        The observed spectrum, or a file :func:`read_lamost` reads.
    options : PreprocessOptions or mapping, optional
        The options (default: those of ``[preprocess]`` in the packaged configuration).
    rv_kms : float, optional
        Catalogue radial velocity (wins over the header redshift).
    **kwargs
        Passed to :func:`specabund.preprocess.steps.preprocess_spectrum` (``keep_stages``, ``template``).

    Returns
    -------
    PreprocessResult
        Flux and inverse variance on the common grid, the status and the per-step metadata.
    """
    from .config import load_settings
    from .preprocess.options import PreprocessOptions
    from .preprocess.steps import preprocess_spectrum as _preprocess

    if options is None:
        options = load_settings().preprocess_options()
    elif isinstance(options, Mapping):
        options = PreprocessOptions.from_dict(dict(options))
    if isinstance(spectrum, (str, Path)):
        spectrum = read_lamost(spectrum)
    return _preprocess(spectrum, options, rv_kms=rv_kms, **kwargs)


def simulate(
    n: int,
    output_dir: PathLike,
    *,
    seed: int = 42,
    layout: str = "mixed",
    gzip: bool = False,
    independent: bool = False,
    permuted: bool = False,
    prediction_fraction: float = 0.2,
    n_workers: int = 1,
) -> dict[str, Any]:
    """Write ``n`` simulated LAMOST spectra with their catalogues (``specabund simulate``).

    Writes ``output_dir/fits/``, ``X_FE.csv`` (reference catalogue), ``galah_X_FE.csv`` (prediction
    catalogue) and ``truth.csv``; see :func:`specabund.simulate.simulate_dataset`.

    Returns
    -------
    dict
        A summary of what was written.
    """
    from .simulate import simulate_dataset

    if independent and permuted:
        raise SpecabundError("independent and permuted exclude each other")
    return simulate_dataset(
        n,
        Path(output_dir),
        seed,
        layout=layout,
        gzip=gzip,
        independent=independent,
        permuted=permuted,
        prediction_fraction=prediction_fraction,
        n_workers=n_workers,
    )


def preprocess(
    fits_dir: PathLike,
    output_dir: PathLike,
    *,
    reference_csv: PathLike | None = None,
    prediction_csv: PathLike | None = None,
    config: PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    workdir: PathLike | None = None,
    plots: bool = False,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Preprocess FITS files into training-ready datasets (``specabund preprocess``).

    Parameters
    ----------
    fits_dir : path
        Folder searched recursively for FITS files.
    output_dir : path
        Receives ``reference_dataset.npz`` (split train/val/test), ``prediction_dataset.npz``, the
        manifest and the rejected list.
    reference_csv, prediction_csv : path, optional
        The label catalogues (at least one).
    config : path, optional
        A TOML file overlaying the packaged configuration.
    overrides : mapping, optional
        ``'section.key' -> value`` applied last (e.g. ``{'preprocess.n_workers': 2}``).
    workdir : path, optional
        The working directory whose plots folder receives the preprocessing plots (default: the current
        one); the other paths are taken as given (relative: to the current directory).
    plots : bool
        Write the stage-by-stage plots of a few spectra and the distributions.
    use_cache : bool
        Read and keep the per-chunk cache.

    Returns
    -------
    dict
        The manifest (counts, labels, rejections, options).
    """
    from .config import load_config
    from .workflows import preprocess_run

    fits_dir, output_dir = Path(fits_dir).resolve(), Path(output_dir).resolve()
    cfg = load_config(config, overrides)
    _, manifest = preprocess_run(
        Workspace(Path(workdir if workdir is not None else ".").resolve()),
        cfg,
        reference_csv=Path(reference_csv).resolve() if reference_csv is not None else None,
        prediction_csv=Path(prediction_csv).resolve() if prediction_csv is not None else None,
        fits_dir=fits_dir,
        output_dir=output_dir,
        use_cache=use_cache,
        plots=plots,
    )
    return manifest


# ------------------------------------------------------------------------------------------ train/test


def train(
    data: PathLike | None = None,
    *,
    workdir: PathLike | None = None,
    labels: Sequence[str] = (),
    config: PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    resume: str | None = None,
    overwrite: bool = False,
    init_from: PathLike | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
    progress: bool = False,
) -> TrainOutcome:
    """Train a network (``specabund train``): the run is saved under the models folder of ``workdir``.

    Parameters
    ----------
    data : path, optional
        A reference dataset (split by its ``split`` column) or a train file with ``val_dataset.npz``
        beside it (relative: under ``workdir``); default: the reference dataset under
        ``[paths] processed_dir``.
    workdir : path, optional
        The working directory (default: the current one).
    labels : sequence of str
        Labels to learn (default: every abundance; Teff, logg, [Fe/H] are added when present).
    config : path, optional
        TOML overlaying the packaged configuration (relative: under ``workdir``, like ``--config``).
    overrides : mapping, optional
        ``'section.key' -> value`` applied last, e.g.
        ``{'training.epochs': 5, 'model.name': 'rescnn_small'}``.
    run_name : str, optional
        Folder name of the run (default: labels and a time stamp).
    resume : str, optional
        Continue this interrupted (or finished) run from its last checkpoint.
    overwrite : bool
        Replace an existing run of the same name.
    init_from : path, optional
        Fine-tune from this trained run.
    device : str
        ``'cpu'`` (default), ``'cuda'``, ``'cuda:1'`` or ``'auto'``.
    num_threads : int, optional
        ``torch`` threads during training (default ``training.num_threads``; 0 keeps the current value).
    progress : bool
        Show progress bars.

    Returns
    -------
    TrainOutcome
        ``run_dir``, the per-model ``results`` (best epoch, metrics), the ``labels`` and more.
    """
    from .workflows import plan_training, run_training

    ws = _workspace(workdir)
    plan = plan_training(
        ws,
        data,
        tuple(labels),
        config_file=_in(ws.root, config),
        overrides=overrides,
        resume=resume,
        run_name=run_name,
        overwrite=overwrite,
        init_from=init_from,
    )
    return run_training(plan, _device(device), num_threads=num_threads, progress=progress)


def evaluate(
    run: PathLike | None = None,
    data: PathLike | None = None,
    *,
    workdir: PathLike | None = None,
    labels: Sequence[str] = (),
    config: PathLike | None = None,
    truth: PathLike | None = None,
    isochrones: PathLike | None = None,
    device: str = "cpu",
) -> EvaluationOutcome:
    """Evaluate a trained run on held-out data (``specabund test``).

    Parameters
    ----------
    run : str or path, optional
        Run name under the models folder, or a path (default: the newest run).
    data : path, optional
        The data (its test split when it has one; relative: under ``workdir``); default: the test dataset
        under ``processed_dir``.
    workdir : path, optional
        The working directory (default: the current one).
    labels : sequence of str
        Labels to evaluate (default: every label of the model).
    config : path, optional
        TOML overlaying the packaged configuration (``[evaluation]``, ``[paths]``; relative: under
        ``workdir``).
    truth : path, optional
        Simulator ``truth.csv``: also RMSE against the Cramer-Rao bound.
    isochrones : path, optional
        MIST ``.iso`` file drawn on the Kiel diagrams.
    device : str
        ``'cpu'`` (default), ``'cuda'`` or ``'auto'``.

    Returns
    -------
    EvaluationOutcome
        The metrics (``result['metrics'][label]['all']``), the output folder and more.
    """
    from .config import load_config
    from .workflows import evaluate_run

    ws = _workspace(workdir, config)
    cfg = load_config(_in(ws.root, config))
    return evaluate_run(
        ws,
        cfg,
        _device(device),
        data_path=data,
        model=run,
        elements=tuple(labels),
        truth=truth,
        isochrones=isochrones,
    )


# ------------------------------------------------------------------------------------------ predict


@dataclass
class Model:
    """A trained run ready to predict (see :func:`load_model`).

    Attributes
    ----------
    run_dir : Path
        The run folder.
    predictor : LoadedModel or LoadedEnsemble
        The loaded network(s).
    device : str
        Where it runs.
    processed_manifest : Path or None
        ``manifest.json`` of the workspace's preprocessed data (a fallback source of the preprocessing
        options for raw files when the model does not carry them).
    """

    run_dir: Path
    predictor: LoadedModel | LoadedEnsemble
    device: str = "cpu"
    processed_manifest: Path | None = None

    @property
    def labels(self) -> list[str]:
        """The labels the model predicts."""
        return list(self.predictor.labels)

    def inputs(
        self,
        spectra: Any,
        *,
        catalog: PathLike | None = None,
        n_workers: int = 1,
        preprocess_config: PathLike | None = None,
    ) -> PredictionInputs:
        """What :meth:`predict` predicts: ``spectra`` as :class:`~specabund.predict.PredictionInputs`.

        ``spectra`` may be a :class:`~specabund.dataset.Dataset`, ``PredictionInputs``, a dataset file
        (``.npz``), a FITS file, a folder of FITS files (searched recursively), a glob, or a list of FITS
        files. Raw files are preprocessed with the model's own options.
        """
        from .dataset import Dataset, load_dataset
        from .predict import PredictionInputs, collect_files, read_prediction_catalog, resolve_preprocess

        if isinstance(spectra, PredictionInputs):
            return spectra
        if isinstance(spectra, Dataset):
            return PredictionInputs.from_dataset(spectra)
        if isinstance(spectra, (str, Path)) and str(spectra).endswith(".npz"):
            return PredictionInputs.from_dataset(load_dataset(Path(spectra)))
        if isinstance(spectra, (str, Path)):
            p = Path(spectra)
            if p.is_dir():
                files, root = collect_files(p, None)
            elif p.is_file():
                files, root = [p], p.parent
            else:
                files, root = collect_files(None, str(spectra))
        else:
            files = [Path(f) for f in spectra]
            if not files:
                raise SpecabundError("no spectra given")
            root = None
        candidates = [self.processed_manifest] if self.processed_manifest is not None else []
        opts, normalize, _ = resolve_preprocess(
            self.predictor,
            Path(preprocess_config) if preprocess_config is not None else None,
            candidates,
        )
        cat = read_prediction_catalog(Path(catalog)) if catalog is not None else None
        return PredictionInputs.from_fits(
            files, opts, normalize=normalize, catalog=cat, fits_dir=root, n_workers=n_workers
        )

    def predict(
        self,
        spectra: Any,
        *,
        mc_samples: int = 50,
        calibrated: bool = True,
        labels: Sequence[str] | None = None,
        ensemble_mode: bool = False,
        batch_size: int = 64,
        seed: int = 0,
        catalog: PathLike | None = None,
        n_workers: int = 1,
        preprocess_config: PathLike | None = None,
    ) -> pd.DataFrame:
        """Labels with uncertainties and flags for ``spectra``: the catalogue of ``specabund predict``.

        Parameters
        ----------
        spectra
            A dataset, a dataset file, FITS file(s), a folder or a glob (see :meth:`inputs`).
        mc_samples : int
            MC-Dropout passes per spectrum.
        calibrated : bool
            Apply the uncertainty calibration stored with the model (``specabund predict --calibrate``).
        labels : sequence of str, optional
            Labels to report (default: every label of the model).
        ensemble_mode : bool
            Combine the members of an ensemble run.
        batch_size : int
            Spectra per forward pass.
        seed : int
            Seed of the MC-Dropout masks (a local generator; the global ones are untouched).
        catalog : path, optional
            CSV naming raw spectra (spec, rv, group, reference labels).
        n_workers : int
            Processes preprocessing raw files.
        preprocess_config : path, optional
            ``manifest.json`` of the model's training data (when the model does not carry its options).

        Returns
        -------
        DataFrame
            One row per input spectrum, in input order: ``spec``, ``obsid``, per label ``<LABEL>``,
            ``<LABEL>_err``, ``<LABEL>_err_model``, ``<LABEL>_err_data``, then ``flag``, ``flag_reason``,
            ``filename``, ``group``, ``snr``, ``ood_mahalanobis``, ``ood_residual`` (and ``<LABEL>_ref``
            with reference labels).
        """
        from .predict.catalogue import predict_catalogue

        inputs = self.inputs(
            spectra, catalog=catalog, n_workers=n_workers, preprocess_config=preprocess_config
        )
        return predict_catalogue(
            self.predictor,
            inputs,
            labels=labels,
            ensemble_mode=ensemble_mode,
            n_samples=mc_samples,
            batch_size=batch_size,
            seed=seed,
            apply_calibration=calibrated,
        ).table


def load_model(
    run_or_path: PathLike | None = None,
    workdir: PathLike | None = None,
    *,
    device: str = "cpu",
    config: PathLike | None = None,
) -> Model:
    """Load a trained run for prediction.

    Parameters
    ----------
    run_or_path : str or path, optional
        A run folder, or a run name under the models folder of ``workdir`` (default: the newest run there).
    workdir : path, optional
        The working directory (default: the current one).
    device : str
        ``'cpu'`` (default), ``'cuda'`` or ``'auto'``.
    config : path, optional
        TOML whose ``[paths]`` name the folders of ``workdir`` (relative: under ``workdir``).
    """
    from .runs import resolve_run
    from .training.saved import load_model as _load

    ws = _workspace(workdir, config)
    run_dir = resolve_run(ws.models_path, run_or_path)
    dev = _device(device)
    return Model(
        run_dir=run_dir, predictor=_load(run_dir, dev), device=dev, processed_manifest=ws.manifest_path()
    )


def predict(run_or_path: PathLike | None, spectra: Any, **kwargs: Any) -> pd.DataFrame:
    """``load_model(run_or_path).predict(spectra, **kwargs)`` (``device``/``workdir`` go to the loader)."""
    load_kw = {k: kwargs.pop(k) for k in ("device", "workdir", "config") if k in kwargs}
    return load_model(run_or_path, **load_kw).predict(spectra, **kwargs)
