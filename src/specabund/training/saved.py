"""The saved-model folder: weights, configuration, resume checkpoint, and loading for prediction.

A trained run folder holds

``model.safetensors``
    the weights of the best epoch (``safetensors``; no pickle).
``config.json``
    model and training configuration, label names with the mean/std used to standardise them, the
    wavelength grid (``n``, ``start``, ``stop``, ``dlog`` and a hash of the grid rounded to 1e-6 Angstrom),
    the ``preprocess_hash`` of the data, the package version, hashes of the training and validation
    data, the best epoch and the validation metrics at that epoch.
``checkpoint.pt``
    state for ``resume`` (written every epoch; loaded with ``torch.load(weights_only=True)``, so it holds
    only tensors, dicts, lists, numbers and strings).
``metrics.csv``
    one row per epoch.
``manifest.json``
    SHA-256 of ``model.safetensors``, of the label list and of the parts of ``config.json`` that must
    match the weights (labels, their standardisation, architecture, wavelength grid, preprocessing hash).
    :func:`load_model` checks it, so weights swapped or a configuration edited after training (e.g.
    renamed labels) are refused instead of silently mislabelling predictions. Folders without it (made by
    earlier versions) load with a logged warning.

An ensemble folder holds ``ensemble.json`` and one run folder per member (``member_<k>``).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from ..dataset import Dataset
from ..errors import ConfigError, DataMismatchError, ManifestError, SpecabundError
from ..models import ModelConfig, build_model
from ..utils import atomic_write, atomic_write_json, hash_bytes, hash_file, hash_json
from .data import LabelScaler, log_step, prepare_input

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.csv"
ENSEMBLE_FILE = "ensemble.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
#: Keys of ``config.json`` that must agree with the weights (hashed into ``manifest.json``).
MANIFEST_CONFIG_KEYS = ("labels", "label_mean", "label_std", "model", "wavelength", "preprocess_hash")
#: Largest wavelength grid a model folder may declare (a guard against absurd configurations).
MAX_PIXELS = 1_000_000


def grid_info(wavelength: np.ndarray) -> dict[str, Any]:
    """Summary of a wavelength grid stored with a model: ``n``, ``start``, ``stop``, ``dlog``, ``hash``."""
    wl = np.asarray(wavelength, dtype=np.float64)
    return {
        "n": int(wl.size),
        "start": float(wl[0]),
        "stop": float(wl[-1]),
        "dlog": log_step(wl) if wl.size > 1 else 0.0,
        "hash": hash_bytes(np.ascontiguousarray(np.round(wl, 6)).tobytes()),
    }


def data_hash(X: np.ndarray, ivar: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of the flux, inverse variance and label arrays (as float32); arrays of an on-disk store
    are read block by block (same digest)."""
    from ..store import block_hash

    h = block_hash(X, ivar, y)
    h.update(str(tuple(int(s) for s in np.shape(X))).encode())
    return h.hexdigest()


def save_weights(path: Path, model: nn.Module) -> None:
    """Write the model's state dict to ``path`` as safetensors, atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    blob = safetensors.torch.save(tensors)
    with atomic_write(path, "wb") as fh:
        fh.write(blob)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True`` on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpecabundError(f"{path}: cannot read training checkpoint ({exc})") from exc


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecabundError(f"{path}: {what} is not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise SpecabundError(f"{path}: invalid JSON ({exc})") from exc
    except OSError as exc:
        raise SpecabundError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    if not isinstance(data, dict):
        raise SpecabundError(f"{path}: {what} must be a JSON object, not {type(data).__name__}")
    return data


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise SpecabundError(f"{run_dir}: not a trained model folder ({CONFIG_FILE} missing)")
    cfg = _read_json(path, "the model configuration")
    _check_config(cfg, path)
    return cfg


def _check_config(cfg: dict[str, Any], path: Path) -> None:
    """Raise :class:`SpecabundError` naming ``path`` when the entries needed to load a model are unusable."""

    def bad(why: str) -> SpecabundError:
        return SpecabundError(f"{path}: malformed model configuration: {why}")

    for key in ("model", "labels", "label_mean", "label_std", "wavelength"):
        if key not in cfg:
            raise bad(f"'{key}' missing")
    labels = cfg["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise bad("'labels' must be a non-empty list of label names")
    if len(set(labels)) != len(labels):
        raise bad(f"'labels' has duplicates: {labels}")
    for key in ("label_mean", "label_std"):
        v = cfg[key]
        if not isinstance(v, list) or len(v) != len(labels):
            raise bad(f"'{key}' must list one number per label ({len(labels)})")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in v):
            raise bad(f"'{key}' must hold finite numbers")
    if not all(x > 0 for x in cfg["label_std"]):
        raise bad("'label_std' must be positive")
    if not isinstance(cfg["model"], dict):
        raise bad("'model' must be an object")
    wl = cfg["wavelength"]
    if not isinstance(wl, dict) or not isinstance(wl.get("n"), int) or isinstance(wl.get("n"), bool):
        raise bad("'wavelength' must be an object with an integer 'n'")
    if not 1 <= wl["n"] <= MAX_PIXELS:
        raise bad(f"wavelength n = {wl['n']} is outside 1..{MAX_PIXELS}")
    for key in ("hash", "start", "stop"):
        if key not in wl:
            raise bad(f"'wavelength.{key}' missing")


def labels_sha256(labels: list[str]) -> str:
    """SHA-256 of a label list (names and order)."""
    return hash_bytes(json.dumps([str(x) for x in labels]).encode())


def _config_sha256(cfg: dict[str, Any]) -> str:
    return hash_json({k: cfg.get(k) for k in MANIFEST_CONFIG_KEYS})


def write_manifest(run_dir: Path, config: dict[str, Any]) -> None:
    """Write ``manifest.json``: hashes of the weights, the label list and the weight-bound config entries."""
    run_dir = Path(run_dir)
    atomic_write_json(
        run_dir / MANIFEST_FILE,
        {
            "format_version": 1,
            "weights": {"file": WEIGHTS_FILE, "sha256": hash_file(run_dir / WEIGHTS_FILE)},
            "labels": list(config["labels"]),
            "labels_sha256": labels_sha256(list(config["labels"])),
            "config_sha256": _config_sha256(config),
            "config_keys": list(MANIFEST_CONFIG_KEYS),
        },
    )


def check_manifest(run_dir: Path, cfg: dict[str, Any]) -> None:
    """Compare ``config.json`` and ``model.safetensors`` with ``manifest.json``.

    Raises
    ------
    ManifestError
        The weights, the label list or a weight-bound configuration entry differ from what training
        recorded, or the manifest is unreadable.
    """
    path = run_dir / MANIFEST_FILE
    if not path.exists():
        logger.warning(
            "%s: no %s (made by an earlier specabund?): cannot check that %s matches the weights",
            run_dir,
            MANIFEST_FILE,
            CONFIG_FILE,
        )
        return
    try:
        man = _read_json(path, "the model manifest")
    except SpecabundError as exc:
        raise ManifestError(str(exc)) from exc
    weights = man.get("weights")
    if not isinstance(weights, dict) or not isinstance(man.get("labels_sha256"), str):
        raise ManifestError(f"{path}: malformed manifest (weights or labels_sha256 missing)")
    wpath = run_dir / WEIGHTS_FILE
    if hash_file(wpath) != weights.get("sha256"):
        raise ManifestError(
            f"{wpath}: the weights differ from those recorded in {MANIFEST_FILE} (replaced or corrupt); "
            "retrain the model or restore its files"
        )
    if labels_sha256(cfg["labels"]) != man["labels_sha256"]:
        was = man.get("labels")
        raise ManifestError(
            f"{run_dir / CONFIG_FILE}: labels {cfg['labels']} differ from those the weights were trained "
            f"for{f' ({was})' if isinstance(was, list) else ''} ({MANIFEST_FILE}); restore config.json"
        )
    if "config_sha256" in man and _config_sha256(cfg) != man["config_sha256"]:
        raise ManifestError(
            f"{run_dir / CONFIG_FILE}: entries bound to the weights ({', '.join(MANIFEST_CONFIG_KEYS)}) were "
            f"changed after training ({MANIFEST_FILE}); restore config.json"
        )


def _check_grid_and_hash(
    expected_grid: dict[str, Any], expected_hash: str, dataset: Dataset, what: str
) -> None:
    got = grid_info(dataset.wavelength)
    if got["n"] != expected_grid["n"] or got["hash"] != expected_grid["hash"]:
        raise DataMismatchError(
            f"{what} expects a wavelength grid of {expected_grid['n']} pixels from "
            f"{expected_grid['start']:.3f} to {expected_grid['stop']:.3f} A, but the data have "
            f"{got['n']} pixels from {got['start']:.3f} to {got['stop']:.3f} A"
            + (" (same size and range, different grid)" if got["n"] == expected_grid["n"] else "")
            + "; preprocess the spectra with the model's configuration"
        )
    if str(dataset.preprocess_hash) != str(expected_hash):
        raise DataMismatchError(
            f"{what} was trained on data preprocessed with configuration hash {expected_hash!r}, "
            f"but the data have preprocess_hash {dataset.preprocess_hash!r}; "
            "preprocess the spectra with the model's preprocessing configuration"
        )


@dataclass
class LoadedModel:
    """A trained network ready for prediction.

    Attributes
    ----------
    model : torch.nn.Module
        The network in eval mode on ``device``.
    run_dir : Path
        Folder it was loaded from.
    config : dict
        Content of ``config.json``.
    labels : list of str
        Predicted labels, in output order.
    scaler : LabelScaler
        Label standardisation used in training.
    model_config : ModelConfig
        Architecture.
    device : torch.device
        Where the network runs.
    """

    model: nn.Module
    run_dir: Path
    config: dict[str, Any]
    labels: list[str]
    scaler: LabelScaler
    model_config: ModelConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def grid(self) -> dict[str, Any]:
        return dict(self.config["wavelength"])

    @property
    def preprocess_hash(self) -> str:
        return str(self.config.get("preprocess_hash", ""))

    def check_compatible(self, dataset: Dataset) -> None:
        """Raise :class:`~specabund.errors.DataMismatchError` if ``dataset`` was not preprocessed like
        the training data (different wavelength grid or ``preprocess_hash``)."""
        _check_grid_and_hash(self.grid, self.preprocess_hash, dataset, f"model {self.run_dir}")

    @torch.inference_mode()
    def predict_standardised(
        self, X: np.ndarray, ivar: np.ndarray, batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and log-variance in standardised units, ``(N, L)`` float64 each."""
        X = np.asarray(X, dtype=np.float32)
        ivar = np.asarray(ivar, dtype=np.float32)
        if X.ndim != 2 or X.shape != ivar.shape:
            raise DataMismatchError(f"X {X.shape} and ivar {ivar.shape} must be equal 2-D shapes")
        if X.shape[1] != self.grid["n"]:
            raise DataMismatchError(f"model expects {self.grid['n']} pixels, the spectra have {X.shape[1]}")
        self.model.eval()
        means, logvars = [], []
        for start in range(0, len(X), max(int(batch_size), 1)):
            xb = torch.from_numpy(X[start : start + batch_size]).to(self.device)
            vb = torch.from_numpy(ivar[start : start + batch_size]).to(self.device)
            mu, lv = self.model(prepare_input(xb, vb, self.model_config.in_channels))
            means.append(mu.double().cpu().numpy())
            logvars.append(lv.double().cpu().numpy())
        n_lab = len(self.labels)
        if not means:
            return np.zeros((0, n_lab)), np.zeros((0, n_lab))
        return np.concatenate(means), np.concatenate(logvars)

    def predict(
        self, X: np.ndarray, ivar: np.ndarray, batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predict labels in physical units.

        Parameters
        ----------
        X, ivar : numpy.ndarray
            ``(N, P)`` normalised flux and inverse variance on the model's grid.
        batch_size : int
            Spectra per forward pass.

        Returns
        -------
        mean, sigma : numpy.ndarray
            ``(N, L)`` predicted labels and their predicted (aleatoric) uncertainty, columns in
            ``self.labels`` order.
        """
        mu, lv = self.predict_standardised(X, ivar, batch_size)
        mean = self.scaler.inverse(mu)
        sigma = np.exp(0.5 * lv) * self.scaler.std
        return mean, sigma


@dataclass
class LoadedEnsemble:
    """Several :class:`LoadedModel` members trained with different seeds.

    ``predict`` returns the mean of the member means and ``sigma = sqrt(mean(sigma_k**2) + var(mean_k))``
    (aleatoric plus epistemic spread).
    """

    members: list[LoadedModel]
    run_dir: Path

    def __post_init__(self) -> None:
        if not self.members:
            raise SpecabundError(f"{self.run_dir}: ensemble has no members")
        first = self.members[0]
        for m in self.members[1:]:
            if m.labels != first.labels or m.grid["hash"] != first.grid["hash"]:
                raise DataMismatchError(f"{self.run_dir}: ensemble members differ in labels or grid")

    @property
    def labels(self) -> list[str]:
        return self.members[0].labels

    @property
    def config(self) -> dict[str, Any]:
        return self.members[0].config

    @property
    def grid(self) -> dict[str, Any]:
        return self.members[0].grid

    @property
    def preprocess_hash(self) -> str:
        return self.members[0].preprocess_hash

    def check_compatible(self, dataset: Dataset) -> None:
        _check_grid_and_hash(self.grid, self.preprocess_hash, dataset, f"ensemble {self.run_dir}")

    def predict(
        self, X: np.ndarray, ivar: np.ndarray, batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        outs = [m.predict(X, ivar, batch_size) for m in self.members]
        means = np.stack([o[0] for o in outs])
        var = np.stack([o[1] ** 2 for o in outs])
        return means.mean(axis=0), np.sqrt(var.mean(axis=0) + means.var(axis=0))


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel | LoadedEnsemble:
    """Load a trained run folder (or an ensemble folder) for prediction on ``device``.

    Raises
    ------
    SpecabundError
        When the folder lacks ``config.json``/``model.safetensors`` or they are unreadable.
    """
    run_dir = Path(run_dir)
    device = torch.device(device)
    ens = run_dir / ENSEMBLE_FILE
    if ens.exists():
        info = _read_json(ens, "the ensemble description")
        names = info.get("members")
        if not isinstance(names, list) or not names:
            raise SpecabundError(f"{ens}: 'members' must be a non-empty list of member folders")
        members = []
        for name in names:
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise SpecabundError(f"{ens}: member {name!r} is not a folder name inside {run_dir}")
            m = load_model(run_dir / name, device)
            if not isinstance(m, LoadedModel):
                raise SpecabundError(f"{ens}: member {name!r} is itself an ensemble")
            members.append(m)
        return LoadedEnsemble(members=members, run_dir=run_dir)
    cfg = _read_config(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not weights.exists():
        raise SpecabundError(f"{run_dir}: {WEIGHTS_FILE} missing (training not finished?)")
    check_manifest(run_dir, cfg)
    try:
        mcfg = ModelConfig.from_dict(cfg["model"])
    except (ConfigError, TypeError, ValueError, KeyError) as exc:
        raise SpecabundError(f"{run_dir / CONFIG_FILE}: invalid 'model' entry ({exc})") from exc
    labels = [str(x) for x in cfg["labels"]]
    try:
        model = build_model(mcfg, int(cfg["wavelength"]["n"]), len(labels))
    except (ConfigError, TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise SpecabundError(f"{run_dir / CONFIG_FILE}: cannot build the network ({exc})") from exc
    try:
        state = safetensors.torch.load_file(str(weights), device="cpu")
        model.load_state_dict(state)
    except Exception as exc:
        raise SpecabundError(f"{weights}: cannot load weights ({exc})") from exc
    model.to(device).eval()
    scaler = LabelScaler(
        mean=np.asarray(cfg["label_mean"], dtype=np.float64),
        std=np.asarray(cfg["label_std"], dtype=np.float64),
    )
    return LoadedModel(
        model=model,
        run_dir=run_dir,
        config=cfg,
        labels=labels,
        scaler=scaler,
        model_config=mcfg,
        device=device,
    )


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write ``manifest.json`` (when the weights exist), then ``config.json``, atomically.

    ``config.json`` marks a finished run, so it comes last: a run killed in between has no
    ``config.json`` and is resumed from its checkpoint.
    """
    run_dir = Path(run_dir)
    if (run_dir / WEIGHTS_FILE).exists():
        write_manifest(run_dir, config)
    atomic_write_json(run_dir / CONFIG_FILE, config)
