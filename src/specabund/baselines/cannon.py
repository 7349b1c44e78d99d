"""A Cannon-style data-driven model: per-pixel polynomial in the labels.

For every pixel ``p`` the normalised flux is modelled as ``f_p = theta_p . x(l) + noise`` where ``l`` are the
standardised labels (``(label - mean) / scale``) and ``x(l)`` holds every monomial of the labels up to
``order`` (``order=2``, the classic Cannon: ``x(l) = [1, l_i, l_i l_j (i <= j)]``). The noise
variance is ``1/ivar + s_p^2`` with a per-pixel intrinsic scatter ``s_p^2``.

Training is a weighted least-squares fit per pixel, with weights ``w = ivar / (1 + ivar s^2)``. The scatter
is chosen per pixel by a 1-D search over a fixed grid of ``s^2`` values that maximises the Gaussian
likelihood (``sum w (f - theta.x)^2 - sum ln w`` at the weighted least-squares solution). For every grid
value the normal equations ``A = sum w x x^T`` (as its distinct moments ``sum w m`` over the monomials
``m`` up to ``2 order``), ``b = sum w f x`` and the two likelihood sums are accumulated spectrum by
spectrum, so the model can be trained batch by batch (:meth:`CannonModel.partial_fit`) and the result is
exactly that of one fit over all spectra (given fixed label standardisation). All work is
vectorised across pixels with matrix products.

Inference (the test step) minimises ``chi2 = sum_p w_p (f_p - theta_p . x(l))^2`` over ``l`` for every
spectrum with a Levenberg-Marquardt iteration vectorised over spectra, started from the training mean
(``l = 0``) and from a linearised estimate; the lower chi2 wins. Labels are bounded to the training
range widened by 10 % on each side. Two options extend the classic inference:

* ``prior=True`` adds ``(l - mu)^T P (l - mu)`` to the chi2: a Gaussian prior with the mean and inverse
  covariance of the training labels (accumulated with the normal equations, so still exact in batches);
* ``continuum_terms=C`` multiplies the model by ``1 + B c`` with ``C`` cubic B-splines ``B`` over the
  pixels (:func:`continuum_basis`) and fits ``c`` with the labels, so that the smooth continuum errors
  of each spectrum's normalisation are not read as labels.

Censoring (Casey et al. 2016, "The Cannon 2"; Ho et al. 2017): with ``censor={label: mask}`` the
coefficients of every term that involves ``label`` (its linear term, its square and its cross terms) are
fitted only at the pixels where ``mask`` is True and fixed to zero elsewhere, so that an abundance label
can only explain flux near its own lines instead of absorbing whatever the other labels leave over.
Censoring only removes columns from each pixel's normal equations at solve time; the accumulated sums are
the same, so batched training still equals a single fit. :func:`censoring_masks` builds such masks for
``X_FE`` labels from the simulator's line list (atomic lines and molecular bands, including bands where the
element is the partner, e.g. CN for carbon).

The model saves as one ``.npz`` (no pickle), optionally with the accumulated normal equations so that
batch training can resume.
"""

from __future__ import annotations

import logging
from itertools import combinations_with_replacement
from pathlib import Path

import numpy as np
import pandas as pd

from ..elements import element_of_label, label_kind
from ..errors import DataMismatchError, SpecabundError
from ..utils import atomic_savez

logger = logging.getLogger(__name__)

#: Default grid of intrinsic scatter values ``s`` (squared in use); normalised-flux units.
DEFAULT_SCATTER_GRID: tuple[float, ...] = (0.0, *np.logspace(-3.5, -0.5, 13).tolist())

#: Default half-width (Angstrom) of the censoring window around each line of an element.
DEFAULT_CENSOR_HALF_WIDTH: float = 4.0

#: Default extent of a molecular band into its band direction, in e-folding lengths of the band.
DEFAULT_BAND_EXTENT: float = 3.0


def censored_element(name: str) -> str | None:
    """Element whose lines censor the label ``name`` in a Cannon: ``'MG'`` for ``MG_FE``.

    Only ``X_FE`` labels are censored; ``TEFF``, ``LOGG``, ``FE_H`` and other labels stay free (None),
    although ``FE_H`` is measured on iron lines (:func:`specabund.elements.element_of_label`).
    """
    return element_of_label(name) if label_kind(name) == "abundance" else None


def censoring_masks(
    wavelength: np.ndarray,
    label_names: list[str],
    half_width_A: float = DEFAULT_CENSOR_HALF_WIDTH,
    band_extent: float = DEFAULT_BAND_EXTENT,
    linelist: pd.DataFrame | None = None,
) -> dict[str, np.ndarray]:
    """Pixel masks that censor the ``X_FE`` labels of a Cannon to the neighbourhood of their lines.

    Parameters
    ----------
    wavelength : ndarray
        Vacuum wavelengths (Angstrom) of the model pixels, shape (P,).
    label_names : list of str
        The Cannon's labels. Every ``X_FE`` label whose element ``X`` has a feature on the grid gets a
        mask; TEFF, LOGG, FE_H and other labels stay free (no entry).
    half_width_A : float
        Half-width of the window around each atomic line, and the margin around each band.
    band_extent : float
        A molecular band covers its head plus ``band_extent * band_length`` Angstrom in its
        ``band_direction`` (bands fall off as ``exp(-x / band_length)`` from the head). Bands count for
        their ``element`` and for their ``partner`` (CN constrains carbon as well as nitrogen).
    linelist : DataFrame, optional
        Line list with the columns of :func:`specabund.lines.load_linelist` (default: that list).

    Returns
    -------
    dict
        ``{label: bool ndarray (P,)}``, True where the label's coefficients may be fitted. Labels whose
        element has no feature within the grid are left out (free) and logged.
    """
    wave = np.asarray(wavelength, dtype=np.float64)
    if wave.ndim != 1 or wave.size == 0:
        raise DataMismatchError("wavelength must be a non-empty 1-D array")
    if half_width_A < 0 or band_extent < 0:
        raise SpecabundError("half_width_A and band_extent must be >= 0")
    if linelist is None:
        from ..lines import load_linelist

        linelist = load_linelist()
    el = linelist["element"].astype(str).str.upper().to_numpy()
    partner = linelist["partner"].fillna("").astype(str).str.upper().to_numpy()
    centre = linelist["wavelength"].to_numpy(dtype=np.float64)
    band = (linelist["kind"] == "molecular_band").to_numpy()
    length = np.nan_to_num(linelist["band_length"].to_numpy(dtype=np.float64)) * band_extent
    blue = linelist["band_direction"].fillna("").astype(str).str.lower().to_numpy() == "blue"
    lo = centre - half_width_A - np.where(band & blue, length, 0.0)
    hi = centre + half_width_A + np.where(band & ~blue, length, 0.0)
    out: dict[str, np.ndarray] = {}
    for name in label_names:
        x = censored_element(name)
        if x is None:
            continue
        rows = np.flatnonzero((el == x) | (band & (partner == x)))
        mask = np.zeros(wave.size, dtype=bool)
        for r in rows:
            mask |= (wave >= lo[r]) & (wave <= hi[r])
        if mask.any():
            out[name] = mask
        else:
            logger.warning("censoring: no %s feature on the grid; label %s left free", x, name)
    return out


def _monomials(n_labels: int, order: int) -> list[tuple[int, ...]]:
    """Label-index tuples of the non-constant monomials of degree 1..order, in design-column order."""
    return [t for k in range(1, order + 1) for t in combinations_with_replacement(range(n_labels), k)]


def design_matrix(labels: np.ndarray, order: int = 2) -> np.ndarray:
    """Polynomial design vectors of standardised labels, shape (N, D).

    Columns are the constant, then every monomial of degree 1..``order`` (``order=2``:
    ``[1, l_i, l_i l_j (i <= j)]``, the classic quadratic Cannon).
    """
    lab = np.atleast_2d(np.asarray(labels, dtype=np.float64))
    n, L = lab.shape
    cols = [np.ones(n)]
    for t in _monomials(L, order):
        c = lab[:, t[0]].copy()
        for i in t[1:]:
            c *= lab[:, i]
        cols.append(c)
    return np.stack(cols, axis=1)


def term_labels(n_labels: int, order: int = 2) -> list[tuple[int, ...]]:
    """Label indices each column of :func:`design_matrix` involves (``()`` for the constant)."""
    return [(), *_monomials(n_labels, order)]


def design_jacobian(labels: np.ndarray, order: int = 2) -> np.ndarray:
    """Derivative of :func:`design_matrix` with respect to the labels, shape (N, D, L)."""
    lab = np.atleast_2d(np.asarray(labels, dtype=np.float64))
    n, L = lab.shape
    terms = _monomials(L, order)
    J = np.zeros((n, 1 + len(terms), L))
    for d, t in enumerate(terms, start=1):
        for pos, i in enumerate(t):
            if i in t[:pos]:
                continue  # one derivative per distinct label: count * l_i^(count-1) * rest
            rest = t[:pos] + t[pos + 1 :]
            c = np.full(n, float(t.count(i)))
            for j in rest:
                c = c * lab[:, j]
            J[:, d, i] = c
    return J


class CannonModel:
    """Quadratic Cannon-style model fitting all its labels jointly.

    Parameters
    ----------
    label_names : list of str
        Names of the labels (e.g. ``['TEFF', 'LOGG', 'FE_H', 'C_FE']``).
    label_mean, label_scale : ndarray, optional
        Standardisation of the labels. When omitted they are taken from the first call to
        :meth:`fit`/:meth:`partial_fit`; pass them (e.g. from the whole training split) when training
        in batches so that the batched result equals a single fit.
    scatter_grid : sequence of float
        Candidate intrinsic scatters ``s`` (the square is used); the best per pixel is kept.
    ridge : float
        Relative ridge term added to the normal equations for numerical stability.
    bound_margin : float
        Inferred labels are kept inside the training label range widened by this fraction of it on
        each side (a quadratic model extrapolates badly; without this, poorly fitted spectra run off to
        extreme labels).
    censor : dict, optional
        ``{label: bool ndarray (P,)}``: the coefficients of the terms involving ``label`` (linear, square
        and cross terms) are fitted only where the mask is True and are zero elsewhere; a cross term of
        two censored labels needs both masks. Labels not in the dict are free at every pixel. See
        :func:`censoring_masks`.
    """

    def __init__(
        self,
        label_names: list[str],
        label_mean: np.ndarray | None = None,
        label_scale: np.ndarray | None = None,
        scatter_grid: tuple[float, ...] | list[float] = DEFAULT_SCATTER_GRID,
        ridge: float = 1e-8,
        bound_margin: float = 0.1,
        censor: dict[str, np.ndarray] | None = None,
        order: int = 2,
        prior: bool = False,
        continuum_terms: int = 0,
    ) -> None:
        if not label_names:
            raise SpecabundError("the Cannon needs at least one label")
        self.label_names = list(label_names)
        L = len(self.label_names)
        if int(order) != order or not 1 <= order <= 4:
            raise SpecabundError(f"Cannon polynomial order must be 1, 2, 3 or 4, got {order!r}")
        self.order = int(order)
        self.label_mean = None if label_mean is None else np.asarray(label_mean, dtype=np.float64).reshape(L)
        self.label_scale = (
            None if label_scale is None else np.asarray(label_scale, dtype=np.float64).reshape(L)
        )
        self.s2_grid = np.asarray(scatter_grid, dtype=np.float64) ** 2
        self.ridge = float(ridge)
        self.bound_margin = float(bound_margin)
        self.n_pixels: int | None = None
        self.n_train = 0
        self._acc: dict[str, np.ndarray] | None = None
        self.prior = bool(prior)
        if continuum_terms and continuum_terms < 4:
            raise SpecabundError(f"continuum_terms must be 0 (off) or >= 4, got {continuum_terms!r}")
        self.continuum_terms = int(continuum_terms)
        self._basis_cache: np.ndarray | None = None
        self.prior_mean: np.ndarray | None = None
        self.prior_precision: np.ndarray | None = None
        self.theta: np.ndarray | None = None
        self.s2: np.ndarray | None = None
        self.pixel_ok: np.ndarray | None = None
        self.label_min: np.ndarray | None = None
        self.label_max: np.ndarray | None = None
        self.censor: dict[str, np.ndarray] = {}
        for name, mask in (censor or {}).items():
            if name not in self.label_names:
                raise DataMismatchError(f"censored label {name!r} not among {self.label_names}")
            m = np.asarray(mask)
            if m.ndim != 1 or m.dtype != bool:
                raise DataMismatchError(f"censoring mask of {name!r} must be a 1-D bool array")
            self.censor[name] = m.copy()
        if len({m.size for m in self.censor.values()}) > 1:
            raise DataMismatchError("censoring masks of different lengths")

    # ------------------------------------------------------------------ geometry
    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_terms(self) -> int:
        return 1 + len(_monomials(self.n_labels, self.order))

    def term_mask(self, n_pixels: int) -> np.ndarray:
        """Which design columns are fitted at each pixel under the censoring, bool (P, D)."""
        allowed = np.ones((n_pixels, self.n_labels), dtype=bool)
        for name, m in self.censor.items():
            if m.size != n_pixels:
                raise DataMismatchError(f"censoring mask of {name!r} has {m.size} pixels, not {n_pixels}")
            allowed[:, self.label_names.index(name)] = m
        keep = np.ones((n_pixels, self.n_terms), dtype=bool)
        for d, labs in enumerate(term_labels(self.n_labels, self.order)):
            for i in labs:
                keep[:, d] &= allowed[:, i]
        return keep

    def _moment_index(self) -> np.ndarray:
        """(D, D) index of each normal-equation entry ``x_i x_j`` among the monomials of degree <= 2 order.

        The entries of ``A = sum w x x^T`` repeat (``l1 * l1l2 == l1l2 * l1``), so training accumulates only
        the distinct weighted moments ``sum w m_u`` (for 4 labels: 210 instead of 630 sums per pixel for
        a cubic model, 70 instead of 120 for a quadratic one) and :meth:`solve` scatters them into ``A``.
        """
        terms = term_labels(self.n_labels, self.order)
        where = {t: u for u, t in enumerate(term_labels(self.n_labels, 2 * self.order))}
        return np.array([[where[tuple(sorted(a + b))] for b in terms] for a in terms])

    def standardise(self, labels: np.ndarray) -> np.ndarray:
        if self.label_mean is None or self.label_scale is None:
            raise SpecabundError("label standardisation not set")
        return (np.asarray(labels, dtype=np.float64) - self.label_mean) / self.label_scale

    def unstandardise(self, z: np.ndarray) -> np.ndarray:
        if self.label_mean is None or self.label_scale is None:
            raise SpecabundError("label standardisation not set")
        return np.asarray(z, dtype=np.float64) * self.label_scale + self.label_mean

    # ------------------------------------------------------------------ training
    def _check_training(self, X: np.ndarray, ivar: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
        X = np.asarray(X)
        ivar = np.asarray(ivar)
        labels = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        if X.ndim != 2 or ivar.shape != X.shape:
            raise DataMismatchError(f"X {X.shape} and ivar {ivar.shape} must be equal 2-D shapes")
        if labels.shape != (X.shape[0], self.n_labels):
            raise DataMismatchError(f"labels shape {labels.shape} != ({X.shape[0]}, {self.n_labels})")
        if self.n_pixels is not None and X.shape[1] != self.n_pixels:
            raise DataMismatchError(f"spectra have {X.shape[1]} pixels, the model has {self.n_pixels}")
        for name, m in self.censor.items():
            if m.size != X.shape[1]:
                raise DataMismatchError(
                    f"censoring mask of {name!r} has {m.size} pixels, spectra {X.shape[1]}"
                )
        ok = np.all(np.isfinite(labels), axis=1)
        return X[ok], ivar[ok], labels[ok]

    def partial_fit(
        self, X: np.ndarray, ivar: np.ndarray, labels: np.ndarray, chunk: int = 512
    ) -> CannonModel:
        """Add spectra to the accumulated normal equations (rows with any non-finite label are skipped).

        Call :meth:`solve` afterwards (or use :meth:`fit`) to update the coefficients.
        """
        X, ivar, labels = self._check_training(X, ivar, labels)
        if len(X) == 0:
            return self
        if self.label_mean is None or self.label_scale is None:
            self.label_mean = labels.mean(axis=0)
            sc = labels.std(axis=0)
            self.label_scale = np.where(sc > 0, sc, 1.0)
        P = X.shape[1]
        G = len(self.s2_grid)
        D = self.n_terms
        U = len(term_labels(self.n_labels, 2 * self.order))
        if self._acc is None:
            self.n_pixels = P
            self._acc = {
                "M": np.zeros((G, P, U)),
                "b": np.zeros((G, P, D)),
                "c": np.zeros((G, P)),
                "lw": np.zeros((G, P)),
                "zn": np.zeros(1),
                "zs": np.zeros(self.n_labels),
                "zz": np.zeros((self.n_labels, self.n_labels)),
            }
        acc = self._acc
        for s in range(0, len(X), chunk):
            f = np.asarray(X[s : s + chunk], dtype=np.float64)
            iv = np.asarray(ivar[s : s + chunk], dtype=np.float64)
            good = np.isfinite(f) & np.isfinite(iv) & (iv > 0)
            iv = np.where(good, iv, 0.0)
            f = np.where(good, f, 0.0)
            moments = design_matrix(self.standardise(labels[s : s + chunk]), 2 * self.order)
            x = moments[:, :D]
            for g, s2 in enumerate(self.s2_grid):
                w = iv / (1.0 + iv * s2)
                acc["M"][g] += w.T @ moments
                acc["b"][g] += (w * f).T @ x
                acc["c"][g] += np.sum(w * f * f, axis=0)
                acc["lw"][g] += np.sum(np.log(np.where(good, w, 1.0)), axis=0)
        lo, hi = labels.min(axis=0), labels.max(axis=0)
        self.label_min = lo if self.label_min is None else np.minimum(self.label_min, lo)
        self.label_max = hi if self.label_max is None else np.maximum(self.label_max, hi)
        if "zn" in acc:  # sums of the standardised labels, for the prior
            z = self.standardise(labels)
            acc["zn"] += len(z)
            acc["zs"] += z.sum(axis=0)
            acc["zz"] += z.T @ z
        self.n_train += len(X)
        return self

    def solve(self) -> CannonModel:
        """Solve the accumulated normal equations and pick the per-pixel scatter."""
        if self._acc is None:
            raise SpecabundError("no training spectra accumulated")
        acc = self._acc
        G, P, _ = acc["M"].shape
        D = self.n_terms
        iu = np.triu_indices(D)
        to_moment = self._moment_index()[iu]
        best_obj = np.full(P, np.inf)
        theta = np.zeros((P, D))
        theta[:, 0] = 1.0
        s2 = np.full(P, np.nan)
        keep = self.term_mask(P)
        censored = not keep.all()
        for g in range(G):
            A = np.zeros((P, D, D))
            A[:, iu[0], iu[1]] = acc["M"][g][:, to_moment]
            A[:, iu[1], iu[0]] = A[:, iu[0], iu[1]]
            b = acc["b"][g]
            if censored:  # censored columns leave the pixel's system (identity rows, zero coefficients)
                A *= keep[:, :, None] & keep[:, None, :]
                b = b * keep
            ok = A[:, 0, 0] > 0
            diag = np.einsum("pii->pi", A)
            ridge = self.ridge * diag.sum(axis=1, keepdims=True) / keep.sum(axis=1, keepdims=True)
            A[:, np.arange(D), np.arange(D)] += np.where(keep, ridge + 1e-300, 1.0)
            th = np.zeros((P, D))
            try:
                th[ok] = np.linalg.solve(A[ok], b[ok][..., None])[..., 0]
            except np.linalg.LinAlgError:
                th[ok] = np.stack(
                    [np.linalg.lstsq(a, v, rcond=None)[0] for a, v in zip(A[ok], b[ok], strict=True)]
                )
            obj = acc["c"][g] - np.einsum("pd,pd->p", th, b) - acc["lw"][g]
            better = ok & np.isfinite(obj) & (obj < best_obj)
            best_obj[better] = obj[better]
            theta[better] = th[better]
            s2[better] = self.s2_grid[g]
        self.pixel_ok = np.isfinite(s2)
        if "zn" in acc and acc["zn"][0] > 1:  # Gaussian prior of the training labels (standardised)
            mu = acc["zs"] / acc["zn"][0]
            cov = acc["zz"] / acc["zn"][0] - np.outer(mu, mu)
            cov += 1e-6 * np.eye(self.n_labels)
            self.prior_mean, self.prior_precision = mu, np.linalg.inv(cov)
        self.theta = theta
        self.s2 = np.where(self.pixel_ok, s2, 0.0)
        if self.n_train <= self.n_terms:
            logger.warning("Cannon trained on %d spectra for %d coefficients per pixel", self.n_train, D)
        return self

    def fit(self, X: np.ndarray, ivar: np.ndarray, labels: np.ndarray) -> CannonModel:
        """Train from scratch on ``X``, ``ivar`` and ``labels`` (N, L)."""
        self._acc = None
        self.n_train = 0
        self.n_pixels = None
        self.label_min = self.label_max = None
        return self.partial_fit(X, ivar, labels).solve()

    # ------------------------------------------------------------------ inference
    def _weights(self, X: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.s2 is not None and self.pixel_ok is not None
        f = np.asarray(X, dtype=np.float64)
        iv = np.asarray(ivar, dtype=np.float64)
        good = np.isfinite(f) & np.isfinite(iv) & (iv > 0) & self.pixel_ok[None, :]
        iv = np.where(good, iv, 0.0)
        w = iv / (1.0 + iv * self.s2[None, :])
        return np.where(good, f, 0.0), w

    def _use_prior(self) -> bool:
        return self.prior and self.prior_mean is not None and self.prior_precision is not None

    def _basis(self) -> np.ndarray | None:
        """The continuum-correction basis (P, C), or None without continuum terms."""
        if not self.continuum_terms or self.n_pixels is None:
            return None
        if self._basis_cache is None or self._basis_cache.shape[0] != self.n_pixels:
            self._basis_cache = continuum_basis(self.n_pixels, self.continuum_terms)
        return self._basis_cache

    def _model(self, q: np.ndarray) -> np.ndarray:
        """Model flux for parameters ``q = [z, c]``: ``theta . x(z) * (1 + B c)``, shape (N, P)."""
        assert self.theta is not None
        L = self.n_labels
        m = design_matrix(q[:, :L], self.order) @ self.theta.T
        B = self._basis()
        if B is not None:
            m = m * (1.0 + q[:, L:] @ B.T)
        return m

    def _chi2(self, q: np.ndarray, f: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The objective: chi2 of the spectrum, plus the prior's ``(z - mu)^T P (z - mu)`` when used."""
        r = f - self._model(q)
        chi = np.sum(w * r * r, axis=1)
        if self._use_prior():
            dz = q[:, : self.n_labels] - self.prior_mean
            chi = chi + np.einsum("ni,ij,nj->n", dz, self.prior_precision, dz)
        return chi

    def _linear_start(self, f: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Labels from a weighted linear fit of all design coefficients (quadratic terms free)."""
        th = self.theta
        assert th is not None
        M = np.einsum("pd,np,pe->nde", th[:, 1:], w, th[:, 1:])
        v = np.einsum("pd,np->nd", th[:, 1:], w * (f - th[:, 0]))
        M[:, np.arange(M.shape[1]), np.arange(M.shape[1])] += 1e-9 * np.einsum("nii->n", M)[:, None] + 1e-12
        sol = np.linalg.solve(M, v[..., None])[..., 0]
        return np.clip(sol[:, : self.n_labels], -4.0, 4.0)

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Standardised label bounds of the inference: the training range widened by ``bound_margin``."""
        if self.label_min is None or self.label_max is None:
            return np.full(self.n_labels, -10.0), np.full(self.n_labels, 10.0)
        lo, hi = self.standardise(self.label_min), self.standardise(self.label_max)
        pad = self.bound_margin * (hi - lo)
        return lo - pad, hi + pad

    def _levenberg_marquardt(
        self, z: np.ndarray, f: np.ndarray, w: np.ndarray, max_iter: int, tol: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Minimise :meth:`_chi2` from ``z``; returns the parameters ``[z, c]`` (N, L + C) and objective.

        ``z`` holds standardised labels (N, L), whose continuum coefficients then start at 0, or full
        parameters (N, L + C). The continuum coefficients are free; the labels stay inside :meth:`_bounds`.
        """
        th = self.theta
        assert th is not None
        L = self.n_labels
        B = self._basis()
        nb = 0 if B is None else B.shape[1]
        zlo, zhi = self._bounds()
        qlo = np.concatenate([zlo, np.full(nb, -np.inf)])
        qhi = np.concatenate([zhi, np.full(nb, np.inf)])
        if z.shape[1] == L:  # labels only: the continuum coefficients start at 0
            z = np.concatenate([z, np.zeros((len(z), nb))], axis=1)
        q = np.clip(z, qlo, qhi)
        n_par = L + nb
        chi = self._chi2(q, f, w)
        lam = np.full(len(q), 1e-3)
        active = np.ones(len(q), dtype=bool)
        eye = np.eye(n_par)
        for _ in range(max_iter):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            qa = q[idx]
            za = qa[:, :L]
            m0 = design_matrix(za, self.order) @ th.T
            J = np.matmul(th[None], design_jacobian(za, self.order))  # (n, P, L): d model / d z
            wa = w[idx]
            if B is None:
                r = f[idx] - m0
                Jw = J * wa[..., None]
                H = np.matmul(Jw.transpose(0, 2, 1), J)
                g = np.einsum("npl,np->nl", Jw, r)
            else:  # d model / d c = m0 * B: blocks built without an (n, P, C) array
                scale = 1.0 + qa[:, L:] @ B.T
                J = J * scale[..., None]
                r = f[idx] - m0 * scale
                Jw = J * wa[..., None]
                H = np.zeros((len(idx), n_par, n_par))
                H[:, :L, :L] = np.matmul(Jw.transpose(0, 2, 1), J)
                H[:, :L, L:] = np.matmul(Jw.transpose(0, 2, 1) * m0[:, None, :], B)
                H[:, L:, :L] = H[:, :L, L:].transpose(0, 2, 1)
                H[:, L:, L:] = banded_gram(B, wa * m0 * m0)
                g = np.concatenate([np.einsum("npl,np->nl", Jw, r), (wa * m0 * r) @ B], axis=1)
            if self._use_prior():
                H[:, :L, :L] += self.prior_precision
                g[:, :L] -= (za - self.prior_mean) @ self.prior_precision
            Hd = H + lam[idx, None, None] * (np.einsum("nii->ni", H)[:, :, None] * eye + 1e-12 * eye)
            step = np.linalg.solve(Hd, g[..., None])[..., 0]
            qt = np.clip(qa + step, qlo, qhi)
            ct = self._chi2(qt, f[idx], w[idx])
            accept = ct < chi[idx]
            q[idx[accept]] = qt[accept]
            small = np.max(np.abs(step), axis=1) < tol
            chi[idx[accept]] = ct[accept]
            lam[idx] = np.where(accept, lam[idx] / 10.0, lam[idx] * 10.0)
            lam = np.clip(lam, 1e-9, 1e9)
            active[idx[(accept & small) | (lam[idx] >= 1e9)]] = False
        return q, chi

    @property
    def n_parameters(self) -> int:
        """Parameters fitted per spectrum: the labels plus the continuum coefficients."""
        return self.n_labels + self.continuum_terms

    def fit_parameters(
        self,
        X: np.ndarray,
        ivar: np.ndarray,
        start: np.ndarray | None = None,
        chunk: int = 256,
        max_iter: int = 60,
        tol: float = 1e-6,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best parameters ``[z, c]`` (standardised labels, continuum coefficients) and objective per row.

        Without ``start`` the fit runs from the training mean and from a linearised estimate and keeps
        the better; with ``start`` (N, :attr:`n_parameters`, e.g. another model's solution on the same
        standardisation) it runs once from there. Spectra without any usable pixel get NaN rows.
        """
        if self.theta is None:
            raise SpecabundError("Cannon model is not trained (call fit or solve)")
        X = np.atleast_2d(X)
        ivar = np.atleast_2d(ivar)
        if X.shape[1] != self.n_pixels or ivar.shape != X.shape:
            raise DataMismatchError(f"spectra shape {X.shape}/{ivar.shape}, model has {self.n_pixels} pixels")
        if start is not None and np.shape(start) != (len(X), self.n_parameters):
            raise DataMismatchError(f"start shape {np.shape(start)} != ({len(X)}, {self.n_parameters})")
        out = np.full((len(X), self.n_parameters), np.nan)
        obj = np.full(len(X), np.nan)
        for s in range(0, len(X), chunk):
            f, w = self._weights(X[s : s + chunk], ivar[s : s + chunk])
            has = (w.sum(axis=1) > 0) & (
                True if start is None else np.all(np.isfinite(start[s : s + chunk]), axis=1)
            )
            if not has.any():
                continue
            f, w = f[has], w[has]
            n = len(f)
            if start is not None:
                q, chi = self._levenberg_marquardt(start[s : s + chunk][has], f, w, max_iter, tol)
            else:
                starts = np.concatenate([np.zeros((n, self.n_labels)), self._linear_start(f, w)])
                q2, chi2 = self._levenberg_marquardt(
                    starts, np.concatenate([f, f]), np.concatenate([w, w]), max_iter, tol
                )
                pick = chi2[n:] < chi2[:n]
                q = np.where(pick[:, None], q2[n:], q2[:n])
                chi = np.where(pick, chi2[n:], chi2[:n])
            rows = np.flatnonzero(has) + s
            out[rows], obj[rows] = q, chi
        return out, obj

    def predict(
        self, X: np.ndarray, ivar: np.ndarray, chunk: int = 256, max_iter: int = 60, tol: float = 1e-6
    ) -> np.ndarray:
        """Infer all labels for spectra ``X`` (N, P) with inverse variance ``ivar``; returns (N, L).

        Spectra without any usable pixel get NaN labels.
        """
        q, _ = self.fit_parameters(X, ivar, chunk=chunk, max_iter=max_iter, tol=tol)
        return self.unstandardise(q[:, : self.n_labels])

    def predict_label(self, X: np.ndarray, ivar: np.ndarray, name: str) -> np.ndarray:
        """Infer all labels and return the column ``name``, shape (N,)."""
        if name not in self.label_names:
            raise DataMismatchError(f"label {name!r} not among the Cannon labels {self.label_names}")
        return self.predict(X, ivar)[:, self.label_names.index(name)]

    def model_flux(self, labels: np.ndarray) -> np.ndarray:
        """Model spectra for physical labels (N, L), shape (N, P)."""
        if self.theta is None:
            raise SpecabundError("Cannon model is not trained")
        return design_matrix(self.standardise(labels), self.order) @ self.theta.T

    # ------------------------------------------------------------------ persistence
    def to_arrays(self, include_accumulators: bool = False) -> dict[str, np.ndarray]:
        """The model as plain arrays (what :meth:`save` writes; :meth:`from_arrays` reads them back)."""
        if self.theta is None or self.label_mean is None or self.label_scale is None:
            raise SpecabundError("Cannon model is not trained")
        arrays: dict[str, np.ndarray] = {
            "kind": np.asarray("cannon"),
            "label_names": np.asarray(self.label_names, dtype=str),
            "label_mean": self.label_mean,
            "label_scale": self.label_scale,
            "s2_grid": self.s2_grid,
            "ridge": np.asarray(self.ridge),
            "order": np.asarray(self.order),
            "prior": np.asarray(self.prior),
            "continuum_terms": np.asarray(self.continuum_terms),
            "prior_mean": self.prior_mean if self.prior_mean is not None else np.zeros(0),
            "prior_precision": self.prior_precision if self.prior_precision is not None else np.zeros(0),
            "bound_margin": np.asarray(self.bound_margin),
            "label_min": self.label_min if self.label_min is not None else np.zeros(0),
            "label_max": self.label_max if self.label_max is not None else np.zeros(0),
            "n_train": np.asarray(self.n_train),
            "theta": self.theta,
            "s2": self.s2 if self.s2 is not None else np.zeros(0),
            "pixel_ok": self.pixel_ok if self.pixel_ok is not None else np.zeros(0, dtype=bool),
            "censor_names": np.asarray(list(self.censor), dtype=str),
            "censor_masks": (
                np.stack(list(self.censor.values()))
                if self.censor
                else np.zeros((0, self.theta.shape[0]), dtype=bool)
            ),
        }
        if include_accumulators and self._acc is not None:
            arrays.update({f"acc_{k}": v for k, v in self._acc.items()})
        return arrays

    def save(self, path: str | Path, include_accumulators: bool = False) -> None:
        """Write the model to one npz atomically (with the normal equations when asked, for resuming)."""
        atomic_savez(path, **self.to_arrays(include_accumulators))

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray]) -> CannonModel:
        """Rebuild a model from :meth:`to_arrays` output."""
        model = cls(
            [str(s) for s in d["label_names"].tolist()],
            d["label_mean"],
            d["label_scale"],
            scatter_grid=np.sqrt(d["s2_grid"]).tolist(),
            ridge=float(d["ridge"]),
            bound_margin=float(d["bound_margin"]),
            censor=dict(
                zip(
                    [str(s) for s in d.get("censor_names", np.zeros(0, dtype=str)).tolist()],
                    d.get("censor_masks", np.zeros((0, 0), dtype=bool)),
                    strict=True,
                )
            ),
            order=int(d["order"]) if "order" in d else 2,
            prior=bool(d["prior"]) if "prior" in d else False,
            continuum_terms=int(d["continuum_terms"]) if "continuum_terms" in d else 0,
        )
        if "prior_mean" in d and d["prior_mean"].size:
            model.prior_mean, model.prior_precision = d["prior_mean"], d["prior_precision"]
        if d["label_min"].size:
            model.label_min, model.label_max = d["label_min"], d["label_max"]
        model.s2_grid = d["s2_grid"]
        model.n_train = int(d["n_train"])
        model.theta = d["theta"]
        model.s2 = d["s2"]
        model.pixel_ok = d["pixel_ok"]
        model.n_pixels = int(d["theta"].shape[0])
        model._acc = accumulators_from_arrays(model, d)
        return model

    @classmethod
    def load(cls, path: str | Path) -> CannonModel:
        """Read a model written by :meth:`save` (``allow_pickle=False``)."""
        d = read_npz(path)
        kind = str(d["kind"]) if "kind" in d else "cannon"
        if kind != "cannon":
            raise SpecabundError(f"{path}: holds a {kind!r} Cannon, not a single one; use load_cannon")
        return cls.from_arrays(d)


def accumulators_from_arrays(model: CannonModel, d: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The saved normal-equation sums of ``model`` (None when the file has none).

    Files from specabund <= 0.1 hold the full upper triangle ``acc_A`` instead of the distinct moments
    ``acc_M``; every moment is one of its entries, so they are converted.
    """
    prior = {k: d[f"acc_{k}"] for k in ("zn", "zs", "zz") if f"acc_{k}" in d}  # absent before 0.2
    if "acc_M" in d:
        return {**{k: d[f"acc_{k}"] for k in ("M", "b", "c", "lw")}, **prior}
    if "acc_A" not in d:
        return None
    idx = model._moment_index()[np.triu_indices(model.n_terms)]
    U = len(term_labels(model.n_labels, 2 * model.order))
    first = np.array([int(np.flatnonzero(idx == u)[0]) for u in range(U)])
    return {"M": d["acc_A"][..., first], **{k: d[f"acc_{k}"] for k in ("b", "c", "lw")}, **prior}


def continuum_basis(n_pixels: int, n_terms: int) -> np.ndarray:
    """Cubic B-splines with equally spaced knots over the pixel index, shape (n_pixels, n_terms).

    The basis of the smooth multiplicative continuum correction ``1 + B c`` that the inference fits
    with the labels when ``continuum_terms`` is set; the splines sum to one at every pixel.
    """
    from scipy.interpolate import BSpline

    if n_terms < 4:
        raise SpecabundError(f"a cubic B-spline basis needs >= 4 terms, got {n_terms}")
    inner = np.linspace(0.0, 1.0, n_terms - 2)[1:-1]
    t = np.concatenate([np.zeros(4), inner, np.ones(4)])
    x = np.linspace(0.0, 1.0, n_pixels)
    return BSpline.design_matrix(x, t, 3).toarray()


def banded_gram(B: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``B^T diag(v_n) B`` for every row ``v_n`` of ``v`` (N, P), shape (N, C, C), for a B-spline basis.

    Each pixel has at most 4 non-zero cubic B-splines with consecutive indices, so the products are
    summed per run of pixels sharing their first spline (``np.add.reduceat``) instead of a dense
    (N, P, C) x (P, C) product.
    """
    P, C = B.shape
    j0 = np.minimum(np.argmax(B > 0, axis=1), C - 4)
    vals = np.stack([B[np.arange(P), j0 + a] for a in range(4)], axis=1)
    starts = np.flatnonzero(np.diff(j0, prepend=-1))
    seg = j0[starts]
    out = np.zeros((v.shape[0], C, C))
    for a in range(4):
        for b in range(a, 4):
            part = np.add.reduceat(v * (vals[:, a] * vals[:, b])[None, :], starts, axis=1)
            out[:, seg + a, seg + b] += part
            if a != b:
                out[:, seg + b, seg + a] += part
    return out


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of a Cannon ``.npz`` (``allow_pickle=False``), with a clear error for a missing file."""
    path = Path(path)
    if not path.exists():
        raise SpecabundError(f"{path}: Cannon model file not found")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
