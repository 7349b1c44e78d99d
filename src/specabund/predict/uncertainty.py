"""Predictions with an uncertainty split into a model (epistemic) and a data (aleatoric) term.

Model term
    MC-Dropout: ``n_samples`` stochastic forward passes with the dropout layers active and every other
    layer (batch norm in particular) in eval mode; the model term is the standard deviation of the
    sampled means (``ddof=1``). For an ensemble (``--ensemble-mode``) every member is sampled like this and
    the model variance is the mean of the members' MC variances plus the variance of the member means.
Data term
    The network's predicted log-variance: ``err_data = sqrt(mean_k exp(logvar_k)) * label_std``, averaged
    over the MC samples (and over the members).
Total
    ``err_total**2 = err_model**2 + err_data**2``.

All terms are in physical label units. MC passes are batched: each batch of spectra is repeated ``r``
times along the batch dimension (``r * batch <= max_rows``), so one forward pass computes ``r`` samples.
With dropout only in the head the samples share one pass through the trunk and through the head's layers
before its dropout (:func:`deterministic_head_layers`); only the rest of the head runs per sample. On a
CPU the trunk runs :data:`CPU_TRUNK_ROWS` spectra at a time (also for a single deterministic pass).
The random dropout masks come from torch's global generator seeded with ``seed`` inside
``torch.random.fork_rng``: the caller's global RNG state is restored afterwards, and the same seed, data
and batch size give identical results.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ..elements import resolve_labels
from ..errors import DataMismatchError
from ..training.data import prepare_input
from ..training.saved import LoadedEnsemble, LoadedModel

logger = logging.getLogger(__name__)

Predictor = LoadedModel | LoadedEnsemble


@dataclass
class UncertainPrediction:
    """Predicted labels with their uncertainty terms, ``(N, L)`` arrays in physical units.

    Attributes
    ----------
    labels : list of str
        Column names, in order.
    mean : numpy.ndarray
        Predicted labels.
    err_model : numpy.ndarray
        Model (epistemic) term: MC-Dropout spread, plus the member spread for an ensemble.
    err_data : numpy.ndarray
        Data (aleatoric) term from the predicted log-variance.
    n_samples : int
        MC-Dropout samples per member (1 = deterministic pass, no model term from dropout).
    n_members : int
        Ensemble members combined.
    scale : numpy.ndarray
        Calibration scale applied to both terms (ones when uncalibrated).
    """

    labels: list[str]
    mean: np.ndarray
    err_model: np.ndarray
    err_data: np.ndarray
    n_samples: int = 1
    n_members: int = 1
    scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.scale is None:
            self.scale = np.ones(len(self.labels))
        shape = (len(self.mean), len(self.labels))
        for name in ("mean", "err_model", "err_data"):
            if getattr(self, name).shape != shape:
                raise DataMismatchError(f"{name} has shape {getattr(self, name).shape}, expected {shape}")

    def __len__(self) -> int:
        return len(self.mean)

    @property
    def err_total(self) -> np.ndarray:
        """``sqrt(err_model**2 + err_data**2)``."""
        return np.sqrt(self.err_model**2 + self.err_data**2)

    def select(self, labels: Sequence[str]) -> UncertainPrediction:
        """The columns ``labels`` (in that order)."""
        idx = [self.labels.index(lab) for lab in labels]
        assert self.scale is not None
        return replace(
            self,
            labels=list(labels),
            mean=self.mean[:, idx],
            err_model=self.err_model[:, idx],
            err_data=self.err_data[:, idx],
            scale=self.scale[idx],
        )

    def scaled(self, scale: np.ndarray) -> UncertainPrediction:
        """A copy with both uncertainty terms multiplied by the per-label ``scale`` (calibration).

        The total keeps ``err_total**2 = err_model**2 + err_data**2``.
        """
        s = np.asarray(scale, dtype=np.float64).reshape(-1)
        if s.shape != (len(self.labels),):
            raise DataMismatchError(f"scale has {s.size} values for {len(self.labels)} labels")
        assert self.scale is not None
        return replace(self, err_model=self.err_model * s, err_data=self.err_data * s, scale=self.scale * s)

    def subset(self, index: np.ndarray) -> UncertainPrediction:
        """Rows ``index``."""
        return replace(
            self, mean=self.mean[index], err_model=self.err_model[index], err_data=self.err_data[index]
        )


def dropout_modules(module: nn.Module) -> list[nn.Module]:
    """The dropout layers of ``module`` with a drop probability above zero."""
    return [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and float(m.p) > 0.0]


@contextlib.contextmanager
def mc_dropout_mode(module: nn.Module) -> Iterator[int]:
    """Put ``module`` in eval mode except its dropout layers (train mode); restore on exit.

    Yields the number of active dropout layers (0: MC-Dropout gives no spread).
    """
    previous = {m: m.training for m in module.modules()}
    try:
        module.eval()
        active = dropout_modules(module)
        for m in active:
            m.train()
        yield len(active)
    finally:
        for m, mode in previous.items():
            m.training = mode


@contextlib.contextmanager
def seeded_torch(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generator (and the device's CUDA generator) inside ``fork_rng``."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(int(seed))
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(int(seed))
        yield


def members_of(predictor: Predictor, ensemble_mode: bool) -> list[LoadedModel]:
    """Members to combine: all of an ensemble with ``ensemble_mode``, else the single (first) model.

    Raises
    ------
    DataMismatchError
        ``ensemble_mode`` for a model that is not an ensemble.
    """
    if isinstance(predictor, LoadedEnsemble):
        if ensemble_mode:
            return list(predictor.members)
        logger.info(
            "%s is an ensemble of %d members; without ensemble mode only member 0 is used",
            predictor.run_dir,
            len(predictor.members),
        )
        return [predictor.members[0]]
    if ensemble_mode:
        raise DataMismatchError(
            f"ensemble mode needs a model trained with --ensemble N; {predictor.run_dir} is a single model"
        )
    return [predictor]


def validate_labels(predictor: Predictor, requested: Sequence[str] | None) -> list[str]:
    """Requested labels (default: all the model predicts); an unknown one raises listing the valid ones."""
    return resolve_labels(list(requested) if requested else None, predictor.labels, what="model's labels")


def head_only_dropout(net: nn.Module) -> bool:
    """Whether every active dropout layer of ``net`` sits in its head after a ``trunk`` it exposes
    (``trunk(x)`` and ``head_forward(h)``): then MC samples can share one pass through the trunk."""
    head = getattr(net, "head", None)
    if not (hasattr(net, "trunk") and hasattr(net, "head_forward") and isinstance(head, nn.Module)):
        return False
    in_head = {id(m) for m in dropout_modules(head)}
    return all(id(m) in in_head for m in dropout_modules(net))


#: Spectra per pass through the trunk on a CPU when MC samples share it. The trunk's activations are
#: large (``rescnn`` on the 3584-pixel grid: about 230 kB per spectrum after the stem), and passes of a
#: few spectra keep them in a core's L2 cache: a trunk pass over 512 spectra took 0.8-0.9 s of CPU in
#: passes of 8, 1.3-1.4 s in passes of 64 (one thread). Each spectrum's features do not depend on the
#: others in its pass (eval mode), so only the speed changes.
CPU_TRUNK_ROWS = 8


def _trunk_features(net: nn.Module, inp: torch.Tensor, rows: int) -> torch.Tensor:
    """``net.trunk(inp)``, computed ``rows`` spectra at a time."""
    if len(inp) <= rows:
        return net.trunk(inp)  # type: ignore[operator]
    return torch.cat([net.trunk(inp[i : i + rows]) for i in range(0, len(inp), rows)])  # type: ignore[operator]


def deterministic_head_layers(net: nn.Module) -> int:
    """How many leading layers of ``net.head`` come before its first active dropout layer.

    With head-only dropout (:func:`head_only_dropout`), a sequential head and a ``head_forward(h, start)``
    that runs the head from layer ``start``, these layers give the same output for every MC sample: they
    run once per batch of spectra instead of once per sample (for ``rescnn``: the flattening, the large
    linear layer and its activation; the samples then cost the dropout and the last linear layer). 0 when
    this does not apply.
    """
    head = getattr(net, "head", None)
    if not isinstance(head, nn.Sequential) or not head_only_dropout(net):
        return 0
    try:
        if "start" not in inspect.signature(net.head_forward).parameters:  # type: ignore[operator, arg-type]
            return 0
    except (TypeError, ValueError):
        return 0
    active = {id(m) for m in dropout_modules(head)}
    for i, layer in enumerate(head):
        if id(layer) in active:
            return i
    return 0


@torch.inference_mode()
def _sample_member(
    member: LoadedModel,
    X: np.ndarray,
    ivar: np.ndarray,
    n_samples: int,
    batch_size: int,
    max_rows: int,
    seed: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Standardised sample mean, sample variance of the means and mean predicted variance, ``(N, L)``.

    ``on_batch(b)`` is called after each batch of ``b`` spectra has all its samples."""
    net = member.model
    dev = member.device
    in_ch = member.model_config.in_channels
    n, n_lab = len(X), len(member.labels)
    mean = np.zeros((n, n_lab))
    var = np.zeros((n, n_lab))
    dvar = np.zeros((n, n_lab))
    with contextlib.ExitStack() as stack:
        n_active = stack.enter_context(mc_dropout_mode(net)) if n_samples > 1 else 0
        if n_samples > 1 and n_active == 0:
            logger.info(
                "%s has no active dropout layer: MC-Dropout gives no model spread, one pass suffices",
                member.run_dir,
            )
        if n_samples <= 1:
            net.eval()
        k_total = n_samples if n_active > 0 else 1
        # one pass (trunk then head) when no sample differs from another; else the samples share the trunk
        # when all the dropout is in the head
        split = hasattr(net, "trunk") and hasattr(net, "head_forward")
        shared_trunk = split and (k_total == 1 or head_only_dropout(net))
        fixed = deterministic_head_layers(net) if shared_trunk and k_total > 1 else 0
        trunk_rows = CPU_TRUNK_ROWS if dev.type == "cpu" else max(batch_size, 1)
        stack.enter_context(seeded_torch(seed, dev))
        for start in range(0, n, batch_size):
            xb = torch.from_numpy(X[start : start + batch_size]).to(dev)
            vb = torch.from_numpy(ivar[start : start + batch_size]).to(dev)
            inp = prepare_input(xb, vb, in_ch)
            b = len(inp)
            r = max(1, min(k_total, max_rows // b))
            mus, lvs = [], []
            done = 0
            feats = _trunk_features(net, inp, trunk_rows) if shared_trunk else None
            # the head's layers before its dropout, on the same (repeated) input as a full head pass would
            # see: computed once per repeat count rr, not once per sample, with the same result
            fixed_out: dict[int, torch.Tensor] = {}
            while done < k_total:
                rr = min(r, k_total - done)
                if feats is not None:
                    if rr not in fixed_out:
                        h = feats.repeat(rr, 1, 1) if rr > 1 else feats
                        for layer in list(net.head)[:fixed]:  # type: ignore[arg-type]
                            h = layer(h)
                        fixed_out[rr] = h
                    if fixed:
                        mu, lv = net.head_forward(fixed_out[rr], start=fixed)  # type: ignore[operator]
                    else:
                        mu, lv = net.head_forward(fixed_out[rr])  # type: ignore[operator]
                else:
                    x_in = inp.repeat(rr, 1, 1) if rr > 1 else inp
                    mu, lv = net(x_in)
                mus.append(mu.double().reshape(rr, b, n_lab))
                lvs.append(lv.double().reshape(rr, b, n_lab))
                done += rr
            mu_all = torch.cat(mus)  # (K, b, L)
            lv_all = torch.cat(lvs)
            sl = slice(start, start + b)
            mean[sl] = mu_all.mean(0).cpu().numpy()
            var[sl] = mu_all.var(0, correction=1).cpu().numpy() if k_total > 1 else 0.0
            dvar[sl] = lv_all.exp().mean(0).cpu().numpy()
            if on_batch is not None:
                on_batch(b)
    return mean, var, dvar, k_total


def _spectra_counter(progress: Callable[[int], None], n_members: int) -> Callable[[int], None]:
    """Turns batches of member passes into whole spectra for ``progress`` (M member passes = 1 spectrum)."""
    passes = {"done": 0, "reported": 0}

    def on_batch(b: int) -> None:
        passes["done"] += b
        whole = passes["done"] // n_members
        if whole > passes["reported"]:
            progress(whole - passes["reported"])
            passes["reported"] = whole

    return on_batch


def predict_with_uncertainty(
    predictor: Predictor,
    X: np.ndarray,
    ivar: np.ndarray,
    *,
    labels: Sequence[str] | None = None,
    n_samples: int = 50,
    batch_size: int = 256,
    max_rows: int | None = None,
    seed: int = 0,
    ensemble_mode: bool = False,
    progress: Callable[[int], None] | None = None,
) -> UncertainPrediction:
    """Predict labels with MC-Dropout (and ensemble) model uncertainty and the predicted data uncertainty.

    Parameters
    ----------
    predictor : LoadedModel or LoadedEnsemble
        From :func:`specabund.training.load_model`, already on its device.
    X, ivar : numpy.ndarray
        ``(N, P)`` normalised flux and inverse variance on the model's grid.
    labels : sequence of str, optional
        Labels to return (default: all the model predicts).
    n_samples : int
        MC-Dropout passes per member; 1 disables MC-Dropout (the model term is then 0 for a single
        model and the member spread for an ensemble).
    batch_size : int
        Spectra per device batch.
    max_rows : int, optional
        Rows of one forward pass when MC passes are stacked along the batch dimension
        (default ``batch_size``).
    seed : int
        Seed of the dropout masks (member ``k`` uses ``seed + k``).
    ensemble_mode : bool
        Combine the members of an ensemble (see :func:`members_of`).
    progress : callable, optional
        ``progress(n)`` is called as the work advances, ``n`` being the number of spectra completed since the
        previous call (with M members a spectrum counts as done in proportions of 1/M; the calls add up to
        ``len(X)``). For progress bars and logs: this function prints nothing itself.

    Returns
    -------
    UncertainPrediction
        Uncalibrated prediction.
    """
    if n_samples < 1 or batch_size < 1:
        raise ValueError("n_samples and batch_size must be >= 1")
    want = validate_labels(predictor, labels)
    X = np.ascontiguousarray(X, dtype=np.float32)
    ivar = np.ascontiguousarray(ivar, dtype=np.float32)
    if X.ndim != 2 or X.shape != ivar.shape:
        raise DataMismatchError(f"X {X.shape} and ivar {ivar.shape} must be equal 2-D shapes")
    if X.shape[1] != predictor.grid["n"]:
        raise DataMismatchError(f"model expects {predictor.grid['n']} pixels, the spectra have {X.shape[1]}")
    members = members_of(predictor, ensemble_mode)
    rows = max(int(max_rows or batch_size), 1)
    means, mvars, dvars = [], [], []
    k_used = 1
    on_batch = _spectra_counter(progress, len(members)) if progress is not None else None
    for k, m in enumerate(members):
        mu, var, dvar, k_used = _sample_member(m, X, ivar, n_samples, batch_size, rows, seed + k, on_batch)
        std = m.scaler.std
        means.append(m.scaler.inverse(mu))
        mvars.append(var * std**2)
        dvars.append(dvar * std**2)
    mean_k = np.stack(means)
    model_var = np.stack(mvars).mean(0) + (mean_k.var(0) if len(members) > 1 else 0.0)
    data_var = np.stack(dvars).mean(0)
    full = UncertainPrediction(
        labels=list(members[0].labels),
        mean=mean_k.mean(0),
        err_model=np.sqrt(model_var),
        err_data=np.sqrt(data_var),
        n_samples=k_used,
        n_members=len(members),
    )
    return full.select(want)
