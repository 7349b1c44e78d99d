"""Abundance-swap augmentation: teach the network to read each [X/Fe] from the element's own lines.

Real and simulated training sets carry the Galaxy's correlations ([Mg/Fe] and [Ca/Fe] follow [Fe/H], [C/Fe]
follows logg on the giant branch), so a network can score well by reading [X/Fe] off Teff, logg and [Fe/H]
and fail on the stars that break the correlations. This augmentation breaks them during training with
physics from the simulator, as DD-Payne uses theoretical spectra:

1. before training, for every training star with known Teff, logg and [Fe/H], the simulator's response of the
   continuum-normalised log flux to each trained abundance, its slope ``J_k = d ln f / d[X_k/Fe]`` and
   curvature ``H_k``, is computed on the data's wavelength grid by central differences at the star's own
   labels (:func:`specabund.simulate.synth.normalized_model_flux`);
2. in each training batch, with probability ``swap_prob`` per star and abundance, the abundance is replaced
   by the value of a randomly drawn training star (the same marginal distribution, no correlation with the
   star's parameters or its other abundances), and the spectrum is moved to it:
   ``flux' = flux * exp(sum_k g(J_k, H_k, d_k))`` with ``d_k = x'_k - x_k`` (inverse variance scaled alike;
   ``g`` in :func:`log_flux_change`), and the label becomes ``x'_k``.

Only the element's lines change, so the only way to predict the swapped label is to measure those lines.
Line absorption grows like ``10**x`` on the linear part of the curve of growth and flattens when lines
saturate; the step ``g`` follows both from the slope and curvature at the star's labels, and over the few
tenths of a dex that abundances span it reproduces the simulator's spectrum at the new abundance to a few per
cent of the change (``tests/test_swap.py``). Abundances the simulator does not model
and labels that are not abundances (Teff, logg, [Fe/H]) are never swapped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..elements import STELLAR_PARAMETERS

logger = logging.getLogger(__name__)

#: Finite-difference half step (dex) of the response.
RESPONSE_STEP = 0.1
#: Bounds of the log-flux change of one swap (a guard against extrapolating far beyond the linear regime).
LOG_FACTOR_RANGE = (-3.0, 1.0)


def simulated_elements() -> set[str]:
    """Element symbols (upper case) whose lines the simulator models."""
    from ..simulate.synth import _model

    return {str(e).upper() for e in _model().elements}


def swappable_labels(labels: list[str]) -> list[int]:
    """Positions in ``labels`` of the ``X_FE`` abundances the simulator can move."""
    known = simulated_elements()
    out = []
    for j, lab in enumerate(labels):
        u = lab.upper()
        if u in STELLAR_PARAMETERS or not u.endswith("_FE") or u == "FE_H":
            continue
        if u[:-3] in known:
            out.append(j)
    return out


def abundance_response(
    wavelength: np.ndarray,
    teff: np.ndarray,
    logg: np.ndarray,
    fe_h: np.ndarray,
    abund: np.ndarray,
    names: list[str],
    step: float = RESPONSE_STEP,
    out: Any = None,
) -> Any:
    """Slope and growth rate of ``ln f`` in ``[X/Fe]`` per star and abundance on ``wavelength``.

    Parameters
    ----------
    wavelength : ndarray, (P,)
        Rest-frame vacuum wavelengths of the data.
    teff, logg, fe_h : ndarray, (N,)
        Each star's parameters; a star with any of them non-finite gets a zero response.
    abund : ndarray, (N, K)
        The star's abundances ``names`` (non-finite: evaluated at 0, the response is then only used if the
        label is known).
    names : list of str
        ``X_FE`` names of the columns of ``abund``.
    step : float
        Half step of the central difference (dex).
    out : array-like, optional
        Where to write the rows (anything that takes ``out[i] = (K, 2, P) array``, e.g. a
        :class:`ResponseTable`); a new float16 array by default.

    Returns
    -------
    ndarray, (N, K, 2, P) float16, or ``out``
        ``[..., 0, :]`` the slope ``d ln f / dx``, ``[..., 1, :]`` the growth rate ``(d2 ln f / dx2) / (d ln f
        / dx)`` (:func:`growth_rate`).
    """
    from ..simulate.synth import abundance_log_flux_steps

    n, k = abund.shape
    if out is None:
        out = np.zeros((n, k, 2, len(wavelength)), dtype=np.float16)
    empty = np.zeros((k, 2, len(wavelength)), dtype=np.float16)
    empty[:, 1] = 1e-3  # no response, and a growth rate that keeps log_flux_change finite
    for i in range(n):
        if not (np.isfinite(teff[i]) and np.isfinite(logg[i]) and np.isfinite(fe_h[i])):
            out[i] = empty
            continue
        row = empty.copy()
        base = {"teff": float(teff[i]), "logg": float(logg[i]), "fe_h": float(fe_h[i])}
        for c, name in enumerate(names):
            v = float(abund[i, c]) if np.isfinite(abund[i, c]) else 0.0
            base[name.lower()] = v
        mid, his, los = abundance_log_flux_steps(base, wavelength, names, step)
        for c, (hi, lo) in enumerate(zip(his, los, strict=True)):
            slope = (hi - lo) / (2 * step)
            row[c, 0] = slope.astype(np.float16)
            row[c, 1] = growth_rate(slope, (hi - 2 * mid + lo) / step**2).astype(np.float16)
        out[i] = row
    return out


def growth_rate(slope: np.ndarray, curv: np.ndarray) -> np.ndarray:
    """``curv / slope`` bounded to ``[-3, 3]`` and away from 0 (``|b| >= 1e-3``): :func:`log_flux_change`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(np.abs(slope) > 1e-6, curv / np.where(slope == 0, 1.0, slope), 0.0)
    b = np.clip(np.nan_to_num(b), -3.0, 3.0)
    return np.where(np.abs(b) < 1e-3, np.where(b < 0, -1e-3, 1e-3), b)


def log_flux_change(slope: torch.Tensor, rate: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Change of ``ln f`` for an abundance step ``delta``: ``slope * expm1(rate * delta) / rate``.

    With ``rate = curvature / slope`` (:func:`growth_rate`) it has the slope and curvature of ``ln f`` at the
    start and is exact for a line on the linear part of the curve of growth, where the absorption grows like
    ``10**x`` (``rate = ln 10``); the rate is smaller for saturated lines, and the step tends to the linear
    one as the rate tends to 0.
    """
    return slope * (torch.expm1(rate * delta) / rate)


#: Response tables up to this size are held in memory (float32); larger ones go to a float16 file on disk
#: and are read one batch of rows at a time, so the training process's memory does not grow with N.
IN_MEMORY_BYTES = 512 * 2**20


class ResponseTable:
    """The (N, K, 2, P) responses of the training stars, in memory or in a float16 file read by rows.

    In memory when ``N K 2 P`` float32 values fit in ``in_memory_bytes``; otherwise a temporary file in
    ``directory`` (the system's temporary folder by default; removed when the table is garbage collected
    or the process exits) from which :meth:`rows` reads the batch's rows with ``os.pread``: 186 kB a star
    for 13 abundances on the LAMOST grid, so memory stays one batch whatever the training set's size.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        in_memory_bytes: int = IN_MEMORY_BYTES,
        directory: str | Path | None = None,
    ) -> None:
        self.shape = tuple(int(v) for v in shape)
        n, k, two, p = self.shape
        self._row_shape = (k, two, p)
        self._array: np.ndarray | None = None
        self._fd: int | None = None
        if n * k * two * p * 4 <= in_memory_bytes:
            self._array = np.zeros(self.shape, dtype=np.float32)
            return
        fh = tempfile.NamedTemporaryFile(
            prefix=".specabund-swap-", suffix=".f16", dir=directory, delete=False
        )
        self.path = Path(fh.name)
        fh.close()
        self._fd = os.open(self.path, os.O_RDWR)
        self._row_bytes = k * two * p * 2
        os.ftruncate(self._fd, n * self._row_bytes)
        self._finalizer = weakref.finalize(self, _remove_file, self._fd, self.path)

    @property
    def on_disk(self) -> bool:
        """Whether the table lives in a file."""
        return self._fd is not None

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, i: int, row: np.ndarray) -> None:
        if self._array is not None:
            self._array[i] = row
            return
        data = np.ascontiguousarray(row, dtype=np.float16).tobytes()
        assert self._fd is not None
        os.pwrite(self._fd, data, int(i) * self._row_bytes)

    def rows(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float32 tensor (len(idx), K, 2, P) of the rows ``idx`` (on the CPU)."""
        index = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64)
        if self._array is not None:
            return torch.from_numpy(self._array[index])
        assert self._fd is not None
        out = np.empty((len(index), *self._row_shape), dtype=np.float16)
        for j, i in enumerate(index.tolist()):
            out[j] = np.frombuffer(
                os.pread(self._fd, self._row_bytes, i * self._row_bytes), dtype=np.float16
            ).reshape(self._row_shape)
        return torch.from_numpy(out.astype(np.float32))

    def to_numpy(self) -> np.ndarray:
        """The whole table as float32 (tests and small tables)."""
        return self.rows(np.arange(len(self))).numpy()


def _remove_file(fd: int, path: Path) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    path.unlink(missing_ok=True)


_LAST: dict[str, ResponseTable] = {}


def _cached_response(
    wavelength: np.ndarray,
    teff: np.ndarray,
    logg: np.ndarray,
    fe_h: np.ndarray,
    abund: np.ndarray,
    names: list[str],
) -> ResponseTable:
    """:func:`abundance_response` into a :class:`ResponseTable`, remembering the last one: an ensemble, a
    tuning study or a rerun trains on the same stars again in one process."""
    h = hashlib.sha256()
    for a in (wavelength, teff, logg, fe_h, abund):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    h.update(",".join(names).encode())
    key = h.hexdigest()
    if key not in _LAST:
        _LAST.clear()
        table = ResponseTable((len(abund), len(names), 2, len(wavelength)))
        _LAST[key] = abundance_response(wavelength, teff, logg, fe_h, abund, names, out=table)
    return _LAST[key]


@dataclass
class AbundanceSwap:
    """The batch operation of the augmentation (see the module docstring).

    Attributes
    ----------
    prob : float
        Probability of swapping one abundance of one star.
    cols : list of int
        Label positions that may be swapped.
    response : ResponseTable, (N, K, 2, P)
        Slope and growth rate of ``ln f`` in ``[X/Fe]`` of every training star for the labels ``cols``.
    usable : torch.Tensor, (N, K) bool
        The star's label is known and its parameters are, so it may be swapped.
    std : torch.Tensor, (K,)
        Standard deviation of the label standardisation (dex per standardised unit) of ``cols``.
    """

    prob: float
    cols: list[int]
    response: ResponseTable
    usable: torch.Tensor
    std: torch.Tensor

    @classmethod
    def build(
        cls,
        prob: float,
        labels: list[str],
        y: np.ndarray,
        wavelength: np.ndarray,
        teff: np.ndarray,
        logg: np.ndarray,
        fe_h: np.ndarray,
        std: np.ndarray,
    ) -> AbundanceSwap | None:
        """Precompute the responses of the training stars; None when no label can be swapped.

        ``y`` are the training labels in physical units (N, L), ``std`` the label scaler's standard
        deviations (L,).
        """
        cols = swappable_labels(labels)
        if not cols:
            logger.info("abundance swap: none of %s is an abundance the simulator models; off", labels)
            return None
        abund = y[:, cols].astype(np.float64)
        names = [labels[c] for c in cols]
        resp = _cached_response(wavelength, teff, logg, fe_h, abund, names)
        params_ok = np.isfinite(teff) & np.isfinite(logg) & np.isfinite(fe_h)
        usable = np.isfinite(abund) & params_ok[:, None]
        logger.info(
            "abundance swap of %s: responses of %d of %d training stars", names, int(params_ok.sum()), len(y)
        )
        return cls(
            prob=float(prob),
            cols=cols,
            response=resp,
            usable=torch.from_numpy(usable),
            std=torch.as_tensor(np.asarray(std, dtype=np.float32)[cols]),
        )

    def to(self, device: torch.device) -> AbundanceSwap:
        """This operation with its tensors on ``device``."""
        return AbundanceSwap(self.prob, self.cols, self.response, self.usable.to(device), self.std.to(device))

    def __call__(
        self,
        flux: torch.Tensor,
        ivar: torch.Tensor,
        y_std: torch.Tensor,
        idx: torch.Tensor,
        all_y_std: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Swap abundances of the batch rows ``idx`` (indices into the training set).

        ``y_std`` are the batch's standardised labels, ``all_y_std`` those of the whole training set (the
        pool new values are drawn from). Random numbers are drawn on the CPU from ``generator``.
        """
        n, k = len(idx), len(self.cols)
        dev = flux.device
        use = (torch.rand(n, k, generator=generator) < self.prob).to(dev)
        donor = torch.randint(0, len(all_y_std), (n, k), generator=generator).to(dev)
        cols = torch.as_tensor(self.cols, device=dev)
        idx = idx.to(dev)
        new = all_y_std[donor, cols[None, :].expand(n, k)]
        cur = y_std[:, cols]
        use = use & self.usable[idx] & self.usable[donor, torch.arange(k, device=dev)[None, :].expand(n, k)]
        delta = torch.where(use, new - cur, torch.zeros_like(cur)) * self.std[None, :]
        if not bool(use.any()):
            return flux, ivar, y_std
        r = self.response.rows(idx).to(dev)
        logf = log_flux_change(r[:, :, 0], r[:, :, 1], delta[:, :, None]).sum(dim=1)
        logf = logf.clamp(*LOG_FACTOR_RANGE)
        fac = torch.exp(logf)
        y_new = y_std.clone()
        y_new[:, cols] = torch.where(use, new, cur)
        return flux * fac, ivar / (fac * fac), y_new
