"""Step 3: the rest frame: Doppler shift, cross-correlation refinement and the velocity check."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...catalog import DEFAULT_MAX_ABS_RV_KMS
from ..options import PreprocessOptions

#: Speed of light in km/s.
C_KMS: float = 299792.458


# ------------------------------------------------------------------------------------------ 3. rest frame


def to_rest_frame(wave: np.ndarray, z: float) -> np.ndarray:
    """Rest-frame wavelength ``wave / (1 + z)``."""
    if not math.isfinite(z) or z <= -1.0:
        raise ValueError(f"redshift must be finite and > -1, got {z}")
    return np.asarray(wave, dtype=np.float64) / (1.0 + z)


def refine_rv(
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    template_wave: np.ndarray,
    template_flux: np.ndarray,
    *,
    v_max_kms: float = 500.0,
    v_step_kms: float = 10.0,
) -> tuple[float, float]:
    """Residual radial velocity of a spectrum against a rest-frame template, by chi-square cross-correlation.

    For each trial velocity ``v`` on a grid of step ``v_step_kms`` within ``+-v_max_kms``, the template
    is shifted to ``template(wave / (1 + v/c))``, scaled by its best-fitting factor and compared with
    ``flux`` using weights ``ivar``. The minimum of chi^2(v) is refined by a parabola through its three
    lowest points; the 1-sigma error comes from the curvature (delta chi^2 = 1). Both spectra should be
    continuum-normalised and at the same resolution.

    Returns
    -------
    dv_kms, err_kms : float
        Velocity to add to the one used to build ``wave`` (so that ``wave / (1 + dv/c)`` is rest frame) and
        its error; both NaN when the minimum lies on the edge of the search range or no pixel overlaps.
    """
    wave = np.asarray(wave, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    w = np.where(np.asarray(ivar) > 0, np.asarray(ivar, dtype=np.float64), 0.0)
    tw = np.asarray(template_wave, dtype=np.float64)
    tf = np.asarray(template_flux, dtype=np.float64)
    nv = round(v_max_kms / v_step_kms)
    v = np.arange(-nv, nv + 1) * v_step_kms
    q = wave[None, :] / (1.0 + v[:, None] / C_KMS)
    inside = (q >= tw[0]) & (q <= tw[-1])
    model = np.interp(q, tw, tf)
    ww = w[None, :] * inside
    fw = np.where(w > 0, flux, 0.0)
    smm = np.einsum("vn,vn->v", ww, model * model)
    sfm = np.einsum("vn,vn->v", ww, model * fw[None, :])
    sff = ww @ (fw * fw)
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = sff - sfm * sfm / smm
    if not np.isfinite(chi2).any():
        return float("nan"), float("nan")
    chi2 = np.where(np.isfinite(chi2), chi2, np.inf)
    i = int(np.argmin(chi2))
    if i == 0 or i == len(v) - 1:
        return float("nan"), float("nan")
    c_m, c_0, c_p = chi2[i - 1], chi2[i], chi2[i + 1]
    curv = c_m - 2.0 * c_0 + c_p
    if not curv > 0:
        return float("nan"), float("nan")
    offset = 0.5 * (c_m - c_p) / curv
    dv = v[i] + offset * v_step_kms
    err = v_step_kms * math.sqrt(2.0 / curv)
    return float(dv), float(err)


def velocity_problem(
    rv_kms: float | None, z: Any, opts: PreprocessOptions, max_abs_rv_kms: float = DEFAULT_MAX_ABS_RV_KMS
) -> tuple[float | None, str | None]:
    """Check the velocities of one spectrum before its rest-frame shift.

    Parameters
    ----------
    rv_kms : float or None
        Catalogue radial velocity (km/s); a non-finite one or one with ``|rv| > max_abs_rv_kms`` is
        dropped, so the header redshift is used instead.
    z : float or None
        Header redshift ``Z``.
    opts : PreprocessOptions
        ``opts.rv_source == 'none'`` (rest-frame input) needs no velocity.
    max_abs_rv_kms : float
        Plausibility limit of ``|rv|`` and ``|Z| c``.

    Returns
    -------
    rv_kms : float or None
        The catalogue velocity to use (None: use the header).
    problem : str or None
        Why no velocity is usable (the spectrum is rejected as ``no_valid_rv: <problem>``), else None.
    """
    if rv_kms is not None and not (math.isfinite(float(rv_kms)) and abs(float(rv_kms)) <= max_abs_rv_kms):
        rv_kms = None
    if rv_kms is not None or opts.rv_source != "header":
        return rv_kms, None
    try:
        zf = float(z) if z is not None and not isinstance(z, bool) else math.nan
    except (TypeError, ValueError):
        zf = math.nan
    if not math.isfinite(zf):
        return None, f"no catalogue rv and header Z is missing or not a number ({z!r})"
    if abs(zf) * C_KMS > max_abs_rv_kms:
        return None, (
            f"no catalogue rv and header Z = {zf:g} is implausible "
            f"(|Z| c = {abs(zf) * C_KMS:.0f} km/s > {max_abs_rv_kms:g})"
        )
    return None, None
