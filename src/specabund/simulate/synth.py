"""Synthetic LAMOST low-resolution spectra from stellar labels.

This is a *parametric* model, not a radiative-transfer code, but every dependence it encodes has the sign
and roughly the size of the real one, and every output is a smooth function of the labels (so finite
differences give meaningful derivatives, e.g. for Cramer-Rao bounds):

Atomic metal lines
    Line-centre optical depth of a Milne-Eddington-like atmosphere at the line-forming temperature
    ``T = 0.9 Teff``::

        log tau0 = C + log gf + log lambda - log v_D + log eps_sun(X) + [X/H]
                   + log N_stage/N(X) - log U_stage - theta chi - log kappa_cont

    with the ionisation balance from the Saha equation (electron pressure rising with logg, Teff and
    [Fe/H]), the Boltzmann factor ``theta chi`` (theta = 5040/T), and H- continuous opacity (plus H I
    bound-free opacity in hot stars). Hence neutral lines of ionised-majority elements strengthen towards
    cool stars and are insensitive to gravity, while lines of the majority ionisation stage (Fe II, Ti II,
    Ca II, Ba II) strengthen towards low gravity. [X/H] = [Fe/H] + [X/Fe].
    The equivalent width follows a curve of growth with linear, flat (Doppler) and damped (square-root)
    parts; the damping parameter grows with gas pressure (logg), so strong lines (Mg b, Na D, the Ca II
    triplet and H&K) have gravity-sensitive wings.
Hydrogen
    Balmer (and a few Paschen) equivalent widths from a smooth function of Teff peaking near 9500 K with a
    logg dependence (Stark broadening: broader wings at higher gravity).
Molecular bands
    CH (G band), CN (3883, 4216), C2 Swan (4737, 5165, 5636), MgH (4780, 5211) and TiO: peak optical depth
    ``log tau = s0 + n [X/H] + [partner/H] + a (theta - theta_sun) + b (logg - 4.44)``, saturating, with an
    exponential band shape from the head, convolved with the instrumental profile.

Each line is drawn as a pseudo-Voigt (Thompson, Cox & Hastings 1987) of unit area times its equivalent width
``W`` as an optical depth ``A(lambda)``, and the normalised flux is ``exp(-sum A)``, so blends saturate.
The Gaussian part is the instrumental profile (FWHM = lambda / R, R = 1800 by default).

:func:`simulate_spectrum` puts this into an observed LAMOST-like spectrum: Doppler shift, Planck continuum,
instrument response (blue fall-off, dichroic region near 5800 A, random smooth wiggles), CCM89 reddening,
telluric bands, sky-line residuals, Poisson-like noise matching a requested g-band S/N, bad pixels and
LAMOST mask bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import erfc, erfcx

from specabund.spectrum import Spectrum

from ..lines import air_to_vacuum, load_linelist

__all__ = [
    "C_KMS",
    "LAMOST_COEFF0",
    "LAMOST_COEFF1",
    "LAMOST_NPIX",
    "MASK_BITS",
    "SNR_BANDS",
    "lamost_wavelength_grid",
    "normalized_model_flux",
    "simulate_spectrum",
    "spectral_subclass",
]

C_KMS = 299792.458
#: log10(lambda / A) of the first pixel of LAMOST LRS spectra.
LAMOST_COEFF0 = 3.5682
#: log10 dispersion per pixel.
LAMOST_COEFF1 = 1e-4
#: Full number of pixels (3699.99-9099.13 A).
LAMOST_NPIX = 3909

#: LAMOST pixel-mask bits (values as in the LAMOST LRS data-release documentation).
MASK_BITS: dict[str, int] = {
    "BADCCD": 1 << 0,
    "BADPROFILE": 1 << 1,
    "NOSKY": 1 << 2,
    "BRIGHTSKY": 1 << 3,
    "BADCENTER": 1 << 4,
    "NODATA": 1 << 5,
}

#: Wavelength ranges (A, vacuum, observed frame) over which the per-band S/N (SNRU..SNRZ) is measured.
SNR_BANDS: dict[str, tuple[float, float]] = {
    "u": (3700.0, 4000.0),
    "g": (4000.0, 5500.0),
    "r": (5500.0, 6900.0),
    "i": (6900.0, 8400.0),
    "z": (8400.0, 9100.0),
}

_THETA_SUN = 5040.0 / 5777.0
_LN2 = math.log(2.0)
_SQRT_PI = math.sqrt(math.pi)
_K_AMU = 2.0 * 1.380649e-23 / 1.66053907e-27 / 1e6  # 2 k / amu in (km/s)^2 / K

# symbol: (mass amu, first ionisation potential eV, solar log eps (Asplund et al. 2009), log U_I, log U_II)
_ELEMENTS: dict[str, tuple[float, float, float, float, float]] = {
    "H": (1.008, 13.598, 12.00, 0.301, 0.0),
    "C": (12.011, 11.260, 8.43, 0.96, 0.78),
    "N": (14.007, 14.534, 7.83, 0.60, 0.95),
    "O": (15.999, 13.618, 8.69, 0.95, 0.60),
    "NA": (22.990, 5.139, 6.24, 0.31, 0.0),
    "MG": (24.305, 7.646, 7.60, 0.0, 0.30),
    "AL": (26.982, 5.986, 6.45, 0.77, 0.0),
    "SI": (28.086, 8.152, 7.51, 0.98, 0.75),
    "K": (39.098, 4.341, 5.03, 0.34, 0.0),
    "CA": (40.078, 6.113, 6.34, 0.07, 0.34),
    "TI": (47.867, 6.828, 4.95, 1.50, 1.75),
    "CR": (51.996, 6.767, 5.64, 1.00, 0.78),
    "MN": (54.938, 7.434, 5.43, 0.80, 0.85),
    "FE": (55.845, 7.902, 7.50, 1.40, 1.60),
    "NI": (58.693, 7.640, 6.22, 1.50, 1.00),
    "SR": (87.62, 5.695, 2.87, 0.0, 0.30),
    "BA": (137.33, 5.212, 2.18, 0.40, 0.62),
}

_LOG_TAU_ZERO = 10.0  # C in the line-centre optical depth (calibrated on solar equivalent widths)
_DEFAULT_LOG_DAMPING = -1.9
_DEFAULT_WINDOW = 15.0  # A, half-width over which a line is evaluated
_H_WMAX = 15.0  # A, H-beta equivalent width at the peak of the Balmer sequence
_H_TPEAK = 9500.0


def _label(labels: Mapping[str, Any], key: str, default: float | None = None) -> float:
    for k in (key, key.lower(), key.upper()):
        if k in labels:
            return float(labels[k])
    if default is None:
        raise KeyError(f"labels need {key!r}")
    return default


@dataclass(frozen=True)
class _Model:
    """Line data as arrays, prepared once."""

    # metal lines
    lam: np.ndarray
    loggf: np.ndarray
    chi: np.ndarray
    ion: np.ndarray
    el_index: np.ndarray
    mass: np.ndarray
    ip: np.ndarray
    logeps: np.ndarray
    log_u: np.ndarray
    log_u_ratio: np.ndarray
    log_damp: np.ndarray
    window: np.ndarray
    # hydrogen
    h_lam: np.ndarray
    h_rel: np.ndarray
    h_window: np.ndarray
    # molecular bands
    m_lam: np.ndarray
    m_el: np.ndarray
    m_partner: np.ndarray
    m_natoms: np.ndarray
    m_logs: np.ndarray
    m_len: np.ndarray
    m_sign: np.ndarray
    m_theta: np.ndarray
    m_logg: np.ndarray
    elements: tuple[str, ...]


@functools.lru_cache(maxsize=1)
def _model() -> _Model:
    ll = load_linelist()
    els = tuple(_ELEMENTS)
    idx = {e: i for i, e in enumerate(els)}
    at = ll[(ll["kind"] == "atomic") & (ll["element"] != "H")]
    el = at["element"].to_numpy()
    ion = at["ion"].to_numpy(dtype=int)
    props = np.array([_ELEMENTS[e] for e in el])
    log_u = np.where(ion == 0, props[:, 3], props[:, 4])
    h = ll[(ll["kind"] == "atomic") & (ll["element"] == "H")]
    mol = ll[ll["kind"] == "molecular_band"]
    return _Model(
        lam=at["wavelength"].to_numpy(float),
        loggf=at["loggf"].to_numpy(float),
        chi=at["chi_ev"].to_numpy(float),
        ion=ion,
        el_index=np.array([idx[e] for e in el]),
        mass=props[:, 0],
        ip=props[:, 1],
        logeps=props[:, 2],
        log_u=log_u,
        log_u_ratio=np.log10(2.0) + props[:, 4] - props[:, 3],
        log_damp=at["log_damping"].fillna(_DEFAULT_LOG_DAMPING).to_numpy(float),
        window=at["window"].fillna(_DEFAULT_WINDOW).to_numpy(float),
        h_lam=h["wavelength"].to_numpy(float),
        h_rel=h["log_strength"].to_numpy(float),
        h_window=h["window"].fillna(60.0).to_numpy(float),
        m_lam=mol["wavelength"].to_numpy(float),
        m_el=np.array([idx[e] for e in mol["element"]]),
        m_partner=np.array([idx[p] if p else -1 for p in mol["partner"]]),
        m_natoms=mol["n_atoms"].to_numpy(float),
        m_logs=mol["log_strength"].to_numpy(float),
        m_len=mol["band_length"].to_numpy(float),
        m_sign=np.where(mol["band_direction"].to_numpy() == "blue", -1.0, 1.0),
        m_theta=mol["theta_coeff"].to_numpy(float),
        m_logg=mol["logg_coeff"].to_numpy(float),
        elements=els,
    )


# ---------------------------------------------------------------------------------------------------------
# window geometry (which pixels each line touches), cached per wavelength grid


@dataclass(frozen=True)
class _Windows:
    groups: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]  # (line idx, pix idx, dx, ok)


def _make_windows(wave: np.ndarray, centres: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> _Windows:
    """Group lines by window size; per group an (n_lines, K) matrix of pixel indices and offsets."""
    start = np.searchsorted(wave, centres - lo)
    stop = np.searchsorted(wave, centres + hi)
    width = stop - start
    groups = []
    keys = np.round(lo + hi, 3)
    for key in np.unique(keys):
        sel = np.flatnonzero((keys == key) & (width > 0))
        if sel.size == 0:
            continue
        k = int(width[sel].max())
        pix = start[sel, None] + np.arange(k)[None, :]
        ok = pix < stop[sel, None]
        pix = np.where(ok, pix, 0)
        dx = wave[pix] - centres[sel, None]
        groups.append((sel, pix, dx, ok))
    return _Windows(tuple(groups))


def _only_element(windows: _Windows, rows_of: np.ndarray) -> _Windows:
    """The rows of each group whose line is flagged in ``rows_of`` (a boolean per line)."""
    groups = []
    for sel, pix, dx, ok in windows.groups:
        keep = rows_of[sel]
        if keep.any():
            groups.append((sel[keep], pix[keep], dx[keep], ok[keep]))
    return _Windows(tuple(groups))


class _GridCache:
    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.store: dict[tuple[Any, ...], tuple[_Windows, _Windows, _Windows]] = {}
        #: per grid: element index -> (metal, molecular) windows of the lines that involve the element
        self.by_element: dict[tuple[Any, ...], dict[int, tuple[_Windows, _Windows]]] = {}

    @staticmethod
    def _key(wave: np.ndarray) -> tuple[Any, ...]:
        return (wave.size, float(wave[0]), float(wave[-1]), hash(wave.tobytes()))

    def get(self, wave: np.ndarray) -> tuple[_Windows, _Windows, _Windows]:
        return self._get(wave, self._key(wave))

    def element(self, wave: np.ndarray, element: int) -> tuple[_Windows, _Windows]:
        """Metal-line and molecular-band windows of the lines that involve element ``element`` (an index of
        ``_model().elements``: its own lines, and the bands it is part of)."""
        key = self._key(wave)
        per = self.by_element.setdefault(key, {})
        hit = per.get(element)
        if hit is None:
            m = _model()
            metal_w, _, mol_w = self._get(wave, key)
            hit = (
                _only_element(metal_w, m.el_index == element),
                _only_element(mol_w, (m.m_el == element) | (m.m_partner == element)),
            )
            per[element] = hit
        return hit

    def _get(self, wave: np.ndarray, key: tuple[Any, ...]) -> tuple[_Windows, _Windows, _Windows]:
        hit = self.store.get(key)
        if hit is not None:
            return hit
        m = _model()
        metal = _make_windows(wave, m.lam, m.window, m.window)
        hyd = _make_windows(wave, m.h_lam, m.h_window, m.h_window)
        # molecular bands: 5 sigma beyond the head, 6 e-folding lengths into the band
        tail = 6.0 * m.m_len
        edge = 5.0 * m.m_lam / 1800.0 + 10.0
        lo = np.where(m.m_sign < 0, tail, edge)
        hi = np.where(m.m_sign < 0, edge, tail)
        mol = _make_windows(wave, m.m_lam, lo, hi)
        if len(self.store) >= self.size:
            oldest = next(iter(self.store))
            del self.store[oldest]
            self.by_element.pop(oldest, None)
        self.store[key] = (metal, hyd, mol)
        return metal, hyd, mol


_GRIDS = _GridCache()


# ---------------------------------------------------------------------------------------------------------
# physics


def _abundances(labels: Mapping[str, Any], elements: tuple[str, ...]) -> np.ndarray:
    """[X/H] per element of :data:`_ELEMENTS` ([X/Fe] missing -> 0; H -> 0)."""
    feh = _label(labels, "fe_h")
    out = np.full(len(elements), feh)
    for i, e in enumerate(elements):
        if e == "H":
            out[i] = 0.0
        elif e != "FE":
            out[i] = feh + _label(labels, f"{e}_FE", 0.0)
    return out


def _log_pe(teff: float, logg: float, feh: float) -> float:
    """log10 electron pressure (dyn cm^-2) near optical depth 2/3: rough fit to model atmospheres."""
    return 1.2 + 0.45 * (logg - 4.44) + 0.25 * feh + 8.0 * math.log10(teff / 5777.0)


def _log_kappa(t_line: float, log_pe: float) -> float:
    """log10 continuous opacity per H atom (arbitrary zero point): H- plus H I bound-free."""
    theta = 5040.0 / t_line
    hminus = log_pe + 2.5 * math.log10(theta) + 0.754 * theta
    hbf = 9.77 - 10.2 * theta  # equals H- near Teff ~ 7500 K on the main sequence
    return float(np.logaddexp(hminus * math.log(10.0), hbf * math.log(10.0)) / math.log(10.0))


def _pseudo_voigt(dx: np.ndarray, fwhm_g: np.ndarray, fwhm_l: np.ndarray) -> np.ndarray:
    """Unit-area pseudo-Voigt profile (Thompson, Cox & Hastings 1987); widths broadcast against dx."""
    fg, fl = fwhm_g, fwhm_l
    f = (fg**5 + 2.69269 * fg**4 * fl + 2.42843 * fg**3 * fl**2 + 4.47163 * fg**2 * fl**3
         + 0.07842 * fg * fl**4 + fl**5) ** 0.2  # fmt: skip
    r = fl / f
    eta = 1.36603 * r - 0.47719 * r**2 + 0.11116 * r**3
    hw = 0.5 * f
    lor = hw / (math.pi * (dx * dx + hw * hw))
    gau = (2.0 * math.sqrt(_LN2 / math.pi) / f) * np.exp(-4.0 * _LN2 * dx * dx / (f * f))
    return eta * lor + (1.0 - eta) * gau


def _band_shape(x: np.ndarray, length: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Exponential band exp(-x/L), x > 0 measured from the head into the band, convolved with a Gaussian."""
    z = (sigma / length - x / sigma) / math.sqrt(2.0)
    out = np.empty_like(x)
    pos = z >= 0.0
    # z >= 0: stable form via the scaled complementary error function
    out[pos] = 0.5 * np.exp(-0.5 * (x[pos] / sigma[pos]) ** 2) * erfcx(z[pos])
    neg = ~pos
    out[neg] = 0.5 * np.exp(0.5 * (sigma[neg] / length[neg]) ** 2 - x[neg] / length[neg]) * erfc(z[neg])
    return out


def line_strengths(labels: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Equivalent widths and widths of every atomic metal line for the given labels.

    Parameters
    ----------
    labels : mapping
        ``teff``, ``logg``, ``fe_h`` and optional ``X_FE`` values.

    Returns
    -------
    dict
        ``wavelength`` (vacuum A), ``log_tau0``, ``ew`` (intrinsic equivalent width, A),
        ``doppler_width`` (A) and ``lorentz_fwhm`` (A), one value per atomic metal line in line-list order
        (``load_linelist(kind='atomic')`` without the H rows).
    """
    m = _model()
    teff = _label(labels, "teff")
    logg = _label(labels, "logg")
    feh = _label(labels, "fe_h")
    xh = _abundances(labels, m.elements)
    t_line = 0.9 * teff
    theta = 5040.0 / t_line
    log_pe = _log_pe(teff, logg, feh)
    log_kappa = _log_kappa(t_line, log_pe)
    # Saha: log N_II/N_I
    saha = m.log_u_ratio + 2.5 * math.log10(t_line) - theta * m.ip - log_pe - 0.1762
    log_f0 = -np.logaddexp(0.0, saha * math.log(10.0)) / math.log(10.0)
    log_frac = np.where(m.ion == 0, log_f0, saha + log_f0)
    xi = math.sqrt(0.9**2 + (0.35 * (4.6 - logg)) ** 2)  # microturbulence, km/s
    v_d = np.sqrt(_K_AMU * t_line / m.mass + xi * xi)
    log_tau0 = (
        _LOG_TAU_ZERO + m.loggf + np.log10(m.lam / 5000.0) - np.log10(v_d) + (m.logeps - 7.5) + xh[m.el_index]
        + log_frac - m.log_u - theta * m.chi - log_kappa
    )  # fmt: skip
    tau0 = 10.0**log_tau0
    damp = 10.0 ** (m.log_damp + 0.5 * (logg - 4.44) - 0.5 * math.log10(teff / 5777.0))
    # curve of growth in units of the Doppler width: linear -> flat -> damped
    f_lin = _SQRT_PI * tau0
    f_flat = 2.0 * np.sqrt(np.log1p(tau0))
    f_dop = f_lin / np.sqrt(1.0 + (f_lin / f_flat) ** 2)
    f_damp2 = 4.0 * _SQRT_PI * damp * tau0 * tau0 / (tau0 + 10.0)
    dl_d = m.lam * v_d / C_KMS
    ew = dl_d * np.sqrt(f_dop**2 + f_damp2)
    lorentz = 2.0 * dl_d * np.sqrt(f_damp2) / (2.0 * math.sqrt(math.pi * _LN2)) + 2e-3
    return {
        "wavelength": m.lam,
        "log_tau0": log_tau0,
        "ew": ew,
        "doppler_width": dl_d,
        "lorentz_fwhm": lorentz,
    }


def _balmer_ew(teff: float, logg: float) -> float:
    """H-beta equivalent width (A): peaks near 9500 K, grows with logg in hot stars (Stark broadening)."""
    x = math.log(teff / _H_TPEAK) / 0.30
    hot = 1.0 / (1.0 + math.exp(-(teff - 7500.0) / 700.0))
    return _H_WMAX / (1.0 + x * x) * 10.0 ** ((0.04 + 0.12 * hot) * (logg - 4.44))


def _absorption(
    labels: Mapping[str, Any], wave: np.ndarray, resolution: float, element: int | None = None
) -> np.ndarray:
    """Absorption ``-ln f``; with ``element`` (an index of ``_model().elements``) only that of the metal lines
    of the element and the molecular bands it is part of: the part of the absorption its [X/Fe] moves."""
    m = _model()
    if element is None:
        metal_w, hyd_w, mol_w = _GRIDS.get(wave)
    else:
        (metal_w, mol_w), hyd_w = _GRIDS.element(wave, element), _Windows(())
    teff = _label(labels, "teff")
    logg = _label(labels, "logg")
    a = np.zeros(wave.size)

    ls = line_strengths(labels)
    fwhm_inst = m.lam / resolution
    fg = np.sqrt(fwhm_inst**2 + (1.665 * ls["doppler_width"]) ** 2)
    fl = ls["lorentz_fwhm"]
    ew = ls["ew"]
    for sel, pix, dx, ok in metal_w.groups:
        prof = ew[sel, None] * _pseudo_voigt(dx, fg[sel, None], fl[sel, None])
        a += np.bincount(pix[ok], weights=prof[ok], minlength=wave.size)

    w_hb = _balmer_ew(teff, logg)
    h_ew = w_hb * 10.0**m.h_rel
    h_fg = np.sqrt((m.h_lam / resolution) ** 2 + (0.25 * h_ew) ** 2)
    h_fl = 0.5 * h_ew * 10.0 ** (0.15 * (logg - 4.44))
    for sel, pix, dx, ok in hyd_w.groups:
        prof = h_ew[sel, None] * _pseudo_voigt(dx, h_fg[sel, None], h_fl[sel, None])
        a += np.bincount(pix[ok], weights=prof[ok], minlength=wave.size)

    xh = _abundances(labels, m.elements)
    theta = 5040.0 / teff
    partner = np.where(m.m_partner >= 0, xh[np.maximum(m.m_partner, 0)], 0.0)
    log_tau = (
        m.m_logs + m.m_natoms * xh[m.m_el] + partner + m.m_theta * (theta - _THETA_SUN)
        + m.m_logg * (logg - 4.44)
    )  # fmt: skip
    tau = 10.0**log_tau
    tau_eff = 2.0 * -np.expm1(-tau / 2.0)  # saturates at 2: bands never go black at low resolution
    sigma = m.m_lam / resolution / 2.3548
    for sel, pix, dx, ok in mol_w.groups:
        x = dx * m.m_sign[sel, None]
        shape = _band_shape(
            x, np.broadcast_to(m.m_len[sel, None], x.shape), np.broadcast_to(sigma[sel, None], x.shape)
        )
        prof = tau_eff[sel, None] * shape
        a += np.bincount(pix[ok], weights=prof[ok], minlength=wave.size)
    return a


def normalized_model_flux(
    labels: Mapping[str, float], wavelength: np.ndarray, *, resolution: float = 1800.0
) -> np.ndarray:
    """Noiseless, rest-frame, continuum-normalised flux at LAMOST resolution.

    Parameters
    ----------
    labels : mapping
        ``teff`` (K), ``logg``, ``fe_h`` and any ``X_FE`` (missing abundances default to 0). Keys are
        case-insensitive (``TEFF`` works too).
    wavelength : ndarray
        Increasing vacuum wavelengths (A) at which to evaluate the model, e.g. the LAMOST grid.
    resolution : float
        Resolving power lambda / FWHM of the instrumental profile.

    Returns
    -------
    ndarray
        Normalised flux (1 = continuum) on ``wavelength``; smooth in every label.
    """
    wave = np.ascontiguousarray(wavelength, dtype=float)
    if wave.ndim != 1 or wave.size < 2 or np.any(np.diff(wave) <= 0):
        raise ValueError("wavelength must be a 1-D strictly increasing array")
    return np.exp(-_absorption(labels, wave, float(resolution)))


def abundance_log_flux_steps(
    labels: Mapping[str, float],
    wavelength: np.ndarray,
    names: list[str],
    step: float,
    *,
    resolution: float = 1800.0,
    floor: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ln max(f, floor)`` of :func:`normalized_model_flux` at ``labels`` and with each ``X_FE`` of ``names``
    moved by ``+step`` and ``-step`` (the central differences of the abundance swap).

    An [X/Fe] moves only the metal lines of X and the molecular bands X is part of (the electron pressure
    and the continuous opacity follow [Fe/H] alone), so the moved spectra are the spectrum at ``labels``
    with just those lines recomputed: the same values as evaluating the whole model each time (to rounding),
    about ``2 K + 1`` times faster for K names.

    Returns
    -------
    mid : ndarray (P,)
    plus, minus : ndarray (K, P)
    """
    wave = np.ascontiguousarray(wavelength, dtype=float)
    if wave.ndim != 1 or wave.size < 2 or np.any(np.diff(wave) <= 0):
        raise ValueError("wavelength must be a 1-D strictly increasing array")
    res = float(resolution)
    m = _model()
    index = {e: i for i, e in enumerate(m.elements)}
    base = {str(k).lower(): v for k, v in labels.items()}
    total = _absorption(base, wave, res)
    cap = -math.log(floor)
    plus = np.empty((len(names), wave.size))
    minus = np.empty((len(names), wave.size))
    for k, name in enumerate(names):
        key = name.lower()
        el = name.upper().removesuffix("_FE")
        if el not in index or not key.endswith("_fe"):
            raise ValueError(f"{name}: not an [X/Fe] of an element the simulator models")
        e = index[el]
        v = float(base.get(key, 0.0))
        own = _absorption(base, wave, res, element=e)
        rest = total - own
        plus[k] = -np.minimum(rest + _absorption({**base, key: v + step}, wave, res, element=e), cap)
        minus[k] = -np.minimum(rest + _absorption({**base, key: v - step}, wave, res, element=e), cap)
    return -np.minimum(total, cap), plus, minus


def lamost_wavelength_grid(start: int = 0, npix: int = LAMOST_NPIX) -> np.ndarray:
    """LAMOST log-linear grid: ``log10 lambda_i = 3.5682 + 1e-4 (start + i)``, ``i = 0 .. npix-1``."""
    return 10.0 ** (LAMOST_COEFF0 + LAMOST_COEFF1 * (start + np.arange(npix)))


# ---------------------------------------------------------------------------------------------------------
# observational effects

_TELLURIC_BANDS = (  # (start, end) vacuum A, peak optical depth at airmass 1, edge width, water?
    (6869.0, 6886.0, 0.35, 1.5, False),  # O2 B band
    (7596.0, 7623.0, 1.1, 1.5, False),  # O2 A band
    (7162.0, 7342.0, 0.12, 15.0, True),  # H2O
    (8132.0, 8352.0, 0.12, 15.0, True),  # H2O
    (8952.0, 9300.0, 0.30, 20.0, True),  # H2O
    (6275.0, 6330.0, 0.05, 5.0, False),  # O2 gamma band
)

# night-sky emission lines (vacuum A) and relative strengths: [O I] 5577, Na D, [O I] 6300/6364, OH bands
_SKY_LINES_AIR = (
    5577.34, 5889.95, 5895.92, 6300.30, 6363.78, 6863.96, 7276.41, 7316.28, 7340.89, 7750.64, 7794.11,
    7821.50, 7913.71, 7993.33, 8344.60, 8399.17, 8430.17, 8465.36, 8505.06, 8761.31, 8885.85, 8919.62,
    8943.40, 8988.58, 9001.38,
)  # fmt: skip
_SKY_LINES = air_to_vacuum(np.array(_SKY_LINES_AIR))
_SKY_STRENGTH = np.array([1.0, 0.3, 0.25, 0.6, 0.2, 0.15, 0.2, 0.25, 0.3, 0.3, 0.3, 0.35, 0.35, 0.4, 0.5, 0.5,
                          0.45, 0.5, 0.5, 0.45, 0.6, 0.6, 0.6, 0.6, 0.55])  # fmt: skip


def _planck(wave: np.ndarray, teff: float) -> np.ndarray:
    x = 1.4387769e8 / (wave * teff)  # hc / (lambda k T), lambda in A
    return wave**-5 / np.expm1(x)


def _ccm89(wave: np.ndarray, r_v: float = 3.1) -> np.ndarray:
    """A_lambda / A_V of Cardelli, Clayton & Mathis (1989), optical and near-IR branches."""
    x = 1e4 / wave
    out = np.empty_like(x)
    ir = x < 1.1
    xi = x[ir]
    out[ir] = 0.574 * xi**1.61 - 0.527 * xi**1.61 / r_v
    y = x[~ir] - 1.82
    a = np.polynomial.polynomial.polyval(
        y, [1.0, 0.17699, -0.50447, -0.02427, 0.72085, 0.01979, -0.77530, 0.32999]
    )
    b = np.polynomial.polynomial.polyval(
        y, [0.0, 1.41338, 2.28305, 1.07233, -5.38434, -0.62251, 5.30260, -2.09002]
    )
    out[~ir] = a + b / r_v
    return out


def _response(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Instrument throughput: blue fall-off, red CCD fall-off, dichroic dip near 5800 A, random wiggles."""
    blue = 1.0 / (1.0 + np.exp(-(wave - 4150.0) / 220.0))
    red = np.exp(-(((wave - 6200.0) / 3600.0) ** 4))
    dichroic = 1.0 - rng.uniform(0.03, 0.2) * np.exp(-0.5 * ((wave - rng.normal(5800.0, 20.0)) / 40.0) ** 2)
    x = (wave - 6400.0) / 2700.0
    coef = rng.normal(0.0, 0.06, 5)
    wig = np.polynomial.legendre.legval(x, np.concatenate([[0.0], coef]))
    return blue * red * dichroic * np.exp(wig)


def _telluric(wave: np.ndarray, airmass: float, water: float) -> np.ndarray:
    tau = np.zeros_like(wave)
    for lo, hi, depth, edge, is_water in _TELLURIC_BANDS:
        amp = depth * airmass * (water if is_water else 1.0)
        inside = 0.5 * (np.tanh((wave - lo) / edge) - np.tanh((wave - hi) / edge))
        if not is_water:  # O2 bands: sharp head on the blue side, fading to the red
            inside = inside * np.exp(-np.clip(wave - lo, 0.0, None) / (0.6 * (hi - lo)))
        tau += amp * inside
    return np.exp(-tau)


def spectral_subclass(teff: float) -> str:
    """A MK-like subclass (e.g. ``'G2'``) for an effective temperature, as LAMOST's SUBCLASS header."""
    table = (
        (9500.0, "A0"), (8200.0, "A5"), (7300.0, "F0"), (6650.0, "F5"), (6000.0, "G0"), (5780.0, "G2"),
        (5560.0, "G5"), (5250.0, "K0"), (4850.0, "K3"), (4450.0, "K5"), (4050.0, "K7"), (3850.0, "M0"),
    )  # fmt: skip
    for t, name in table:
        if teff >= t:
            return name
    return "M1"


def _band_snr(wave: np.ndarray, flux: np.ndarray, sigma: np.ndarray, good: np.ndarray) -> dict[str, float]:
    out = {}
    for band, (lo, hi) in SNR_BANDS.items():
        sel = good & (wave >= lo) & (wave < hi)
        out[band] = float(np.median(flux[sel] / sigma[sel])) if sel.sum() > 10 else 0.0
    return out


def simulate_spectrum(
    labels: Mapping[str, float],
    rng: np.random.Generator,
    *,
    snr_g: float | None = None,
    rv_kms: float | None = None,
    noiseless: bool = False,
    ebv: float | None = None,
    resolution: float = 1800.0,
) -> Spectrum:
    """Simulate one observed LAMOST low-resolution spectrum.

    Parameters
    ----------
    labels : mapping
        ``teff``, ``logg``, ``fe_h`` and optional ``X_FE`` (see :func:`normalized_model_flux`).
    rng : numpy.random.Generator
        The only source of randomness (grid length, response, reddening, tellurics, sky, noise, bad pixels,
        identifiers).
    snr_g : float, optional
        Median S/N per pixel in the g band (4000-5500 A); default drawn log-uniformly in 10-200.
    rv_kms : float, optional
        Heliocentric radial velocity (km/s); default drawn from N(0, 45).
    noiseless : bool
        Skip the noise (ivar is still the inverse variance a noisy spectrum would have).
    ebv : float, optional
        Colour excess E(B-V); default drawn from an exponential of mean 0.08 (capped at 0.6).
    resolution : float
        Resolving power.

    Returns
    -------
    Spectrum
        Observed-frame spectrum on a LAMOST log-linear grid (first pixel 3.5682 + 1e-4 * start in log10 A,
        ~3900 pixels). ``meta`` holds the header values (``obsid``, ``filename``, ``designation``, ``ra``,
        ``dec``, ``class``, ``subclass``, ``z`` (the pipeline-like measured v/c), ``z_err``, ``snr_u`` ..
        ``snr_z``, ``coeff0``, ``coeff1``, ``mjd``, ``planid``, ``spid``, ``fiberid``) and the truth
        (``rv_kms``, ``ebv``, ``airmass``, ``snr_g_target``, ``labels``).
    """
    teff = _label(labels, "teff")
    start = int(rng.choice([0, 0, 0, 1, 2]))
    npix = LAMOST_NPIX - start - int(rng.integers(0, 20))
    wave = lamost_wavelength_grid(start, npix)
    if rv_kms is None:
        rv_kms = float(rng.normal(0.0, 45.0))
    if snr_g is None:
        snr_g = float(np.exp(rng.uniform(np.log(10.0), np.log(200.0))))
    if snr_g <= 0:
        raise ValueError(f"snr_g must be > 0, got {snr_g}")
    if ebv is None:
        ebv = float(min(rng.exponential(0.08), 0.6))
    z_true = rv_kms / C_KMS
    norm = normalized_model_flux(labels, wave / (1.0 + z_true), resolution=resolution)

    airmass = float(rng.uniform(1.0, 1.6))
    water = float(np.exp(rng.normal(0.0, 0.4)))
    continuum = _planck(wave, teff) * _response(wave, rng) * 10.0 ** (-0.4 * 3.1 * ebv * _ccm89(wave))
    scale = float(np.exp(rng.uniform(np.log(200.0), np.log(3000.0))))
    continuum *= scale / np.median(continuum)
    star = norm * continuum * _telluric(wave, airmass, water)

    # sky: smooth continuum (bluer with moonlight) + emission lines, both subtracted imperfectly
    sky_level = scale * float(rng.uniform(0.02, 0.3))
    sky_cont = sky_level * (1.0 + float(rng.uniform(0.0, 1.5)) * np.exp(-(wave - 3700.0) / 1500.0))
    sig_inst = wave / resolution / 2.3548
    sky_lines = np.zeros_like(wave)
    for lam0, s in zip(_SKY_LINES, _SKY_STRENGTH, strict=True):
        near = np.abs(wave - lam0) < 15.0
        g = np.exp(-0.5 * ((wave[near] - lam0) / sig_inst[near]) ** 2)
        sky_lines[near] += 12.0 * sky_level * s * g
    residual_frac = rng.normal(0.0, 0.04, _SKY_LINES.size)
    residual = np.zeros_like(wave)
    for lam0, s, r in zip(_SKY_LINES, _SKY_STRENGTH, residual_frac, strict=True):
        near = np.abs(wave - lam0) < 15.0
        residual[near] += (
            r * 12.0 * sky_level * s * np.exp(-0.5 * ((wave[near] - lam0) / sig_inst[near]) ** 2)
        )

    # noise: variance proportional to object + sky counts, scaled to the requested g-band S/N
    counts = np.clip(star, 0.0, None) + sky_cont + sky_lines
    gband = (wave >= SNR_BANDS["g"][0]) & (wave < SNR_BANDS["g"][1])
    alpha = (float(np.median(star[gband] / np.sqrt(counts[gband]))) / snr_g) ** 2
    sigma = np.sqrt(alpha * counts)
    flux = star + residual
    noise = rng.normal(0.0, 1.0, wave.size) * sigma  # drawn even when noiseless: same stream either way
    if not noiseless:
        flux = flux + noise
    ivar = 1.0 / sigma**2

    # masks and bad pixels
    andmask = np.zeros(wave.size, dtype=np.int32)
    ormask = np.zeros(wave.size, dtype=np.int32)
    bright = sky_lines > 3.0 * np.clip(star, 1e-30, None)
    ormask[sky_lines > 0.5 * star] |= MASK_BITS["BRIGHTSKY"]
    andmask[bright] |= MASK_BITS["BRIGHTSKY"]
    n_bad = int(rng.poisson(3.0))
    for _ in range(n_bad):
        i0 = int(rng.integers(0, wave.size))
        sl = slice(i0, min(wave.size, i0 + int(rng.integers(1, 4))))
        ivar[sl] = 0.0
        andmask[sl] |= MASK_BITS["BADCCD"]
        ormask[sl] |= MASK_BITS["BADCCD"]
        spike = np.abs(rng.normal(0.0, 20.0)) * sigma[sl]  # cosmic-ray / hot-pixel residual
        if not noiseless:
            flux[sl] += spike
    n_partial = int(rng.poisson(4.0))
    idx = rng.integers(0, wave.size, n_partial)
    ormask[idx] |= MASK_BITS["BADPROFILE"]
    if rng.uniform() < 0.1:  # occasionally the reddest pixels lack sky information
        k = int(rng.integers(5, 40))
        ivar[-k:] = 0.0
        andmask[-k:] |= MASK_BITS["NOSKY"]
        ormask[-k:] |= MASK_BITS["NOSKY"]

    good = ivar > 0
    snr = _band_snr(wave, star, sigma, good)
    sig_v = math.hypot(3.0, 60.0 / snr_g)
    z_err = sig_v / C_KMS
    z_meas = z_true + float(rng.normal(0.0, sig_v)) / C_KMS
    mjd = int(rng.integers(55800, 59800))
    spid = int(rng.integers(1, 17))
    fiber = int(rng.integers(1, 251))
    planid = _plan_id(rng)
    ra = float(rng.uniform(0.0, 360.0))
    dec = float(np.degrees(np.arcsin(rng.uniform(-0.2, 0.95))))
    obsid = int(rng.integers(100_000, 999_999_999))
    meta: dict[str, Any] = {
        "obsid": obsid,
        "filename": f"spec-{mjd}-{planid}_sp{spid:02d}-{fiber:03d}.fits",
        "designation": _designation(ra, dec),
        "ra": ra,
        "dec": dec,
        "class": "STAR",
        "subclass": spectral_subclass(teff),
        "z": z_meas,
        "z_err": z_err,
        **{f"snr_{b}": v for b, v in snr.items()},
        "data_release": None,
        "layout": None,
        "path": None,
        "coeff0": LAMOST_COEFF0 + LAMOST_COEFF1 * start,
        "coeff1": LAMOST_COEFF1,
        "mjd": mjd,
        "planid": planid,
        "spid": spid,
        "fiberid": fiber,
        "rv_kms": float(rv_kms),
        "ebv": ebv,
        "airmass": airmass,
        "snr_g_target": float(snr_g),
        "labels": {str(k): float(v) for k, v in labels.items() if _is_number(v)},
        "simulated": True,
        "normalization": flux / continuum,
    }
    return Spectrum(wavelength=wave, flux=flux, ivar=ivar, andmask=andmask, ormask=ormask, meta=meta)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _plan_id(rng: np.random.Generator) -> str:
    if rng.uniform() < 0.5:
        return f"{'BFMV'[int(rng.integers(0, 4))]}{int(rng.integers(1000, 9999))}"
    ra_h, ra_m, ra_s = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    dec_d, dec_m, dec_s = int(rng.integers(0, 60)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    sign = "N" if rng.uniform() < 0.8 else "S"
    tail = f"{'BMFV'[int(rng.integers(0, 4))]}{int(rng.integers(1, 4)):02d}"
    prefix = "HD" if rng.uniform() < 0.5 else "KP"
    return f"{prefix}{ra_h:02d}{ra_m:02d}{ra_s:02d}{sign}{dec_d:02d}{dec_m:02d}{dec_s:02d}{tail}"


def _designation(ra: float, dec: float) -> str:
    h = ra / 15.0
    hh, mm = int(h), int((h % 1) * 60)
    ss = ((h * 60) % 1) * 60
    sign = "+" if dec >= 0 else "-"
    d = abs(dec)
    dd, dm = int(d), int((d % 1) * 60)
    ds = ((d * 60) % 1) * 60
    return f"LAMOST J{hh:02d}{mm:02d}{ss:05.2f}{sign}{dd:02d}{dm:02d}{ds:04.1f}"
