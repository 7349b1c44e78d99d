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
from ..errors import DataMismatchError, SpecabundError
from ..models import ModelConfig, build_model
from ..utils import atomic_write, atomic_write_json, hash_bytes
from .data import LabelScaler, log_step, prepare_input

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.csv"
ENSEMBLE_FILE = "ensemble.json"
FORMAT_VERSION = 1


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
    """SHA-256 of the flux, inverse variance and label arrays (as float32)."""
    return hash_bytes(
        *(np.ascontiguousarray(a, dtype=np.float32).tobytes() for a in (X, ivar, y)),
        str(np.shape(X)).encode(),
    )


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


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise SpecabundError(f"{run_dir}: not a trained model folder ({CONFIG_FILE} missing)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SpecabundError(f"{path}: invalid JSON ({exc})") from exc


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
        info = json.loads(ens.read_text(encoding="utf-8"))
        members = []
        for name in info["members"]:
            m = load_model(run_dir / name, device)
            assert isinstance(m, LoadedModel)
            members.append(m)
        return LoadedEnsemble(members=members, run_dir=run_dir)
    cfg = _read_config(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not weights.exists():
        raise SpecabundError(f"{run_dir}: {WEIGHTS_FILE} missing (training not finished?)")
    mcfg = ModelConfig.from_dict(cfg["model"])
    labels = [str(x) for x in cfg["labels"]]
    model = build_model(mcfg, int(cfg["wavelength"]["n"]), len(labels))
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
    """Write ``config.json`` atomically."""
    atomic_write_json(run_dir / CONFIG_FILE, config)
