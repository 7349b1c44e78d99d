"""Validated, immutable options of the per-spectrum preprocessing chain.

The same :class:`PreprocessOptions` must be used for the training set and at prediction time: the continuum,
the grid and the masking define what the network sees. ``to_dict``/``from_dict`` round-trip exactly, so the
options can be stored next to a model and hashed (``specabund.utils.hash_json``) into cache keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from specabund.errors import ConfigError
from specabund.utils import reject_unknown_keys

#: LAMOST low-resolution pixel mask bits (bit index, value ``1 << index``), from the LAMOST data release
#: documentation of the ANDMASK/ORMASK arrays. The real files in ``shared/data/lamost`` agree: the only bit
#: set there is bit 0 (value 1), and the pipeline already gave those pixels zero inverse variance.
LAMOST_MASK_BITS: dict[str, int] = {
    "BADCCD": 0,  # bad pixel on the CCD (hot/dead column, trap): the pixel value is not a measurement
    "BADPROFILE": 1,  # the fibre profile fit failed in extraction: flux is biased
    "NOSKY": 2,  # no sky model at this wavelength: flux is not sky-subtracted
    "BRIGHTSKY": 3,  # sky level too high (strong sky line): large, non-Gaussian subtraction residuals
    "BADCENTER": 4,  # fibre trace off the CCD: no real extraction
    "NODATA": 5,  # no good data at all
}

_CONTINUUM_METHODS = ("pspline",)
_DENOISE_METHODS = ("lowpass",)
_RV_SOURCES = ("header", "none")
_MASK_SOURCES = ("andmask", "ormask")
_SNR_ESTIMATORS = ("ivar", "der_snr")


def _check_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(
            f"{name} must be a finite number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}"
        )
    if (value <= lo if lo_open else value < lo) or value > hi:
        raise ConfigError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, lo: int, hi: int, *, odd: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{name} must be an integer in [{lo}, {hi}]{' and odd' if odd else ''}, got {value!r}"
        )
    if value < lo or value > hi or (odd and value % 2 == 0):
        raise ConfigError(
            f"{name} must be an integer in [{lo}, {hi}]{' and odd' if odd else ''}, got {value!r}"
        )
    return value


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return str(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class PreprocessOptions:
    """Options of :func:`specabund.preprocess.steps.preprocess_spectrum` (all validated on creation).

    Wavelengths are vacuum Angstrom in the stellar rest frame unless stated otherwise.

    Attributes
    ----------
    wave_min, wave_max : float
        Range of the common output grid [3900, 8900]: LAMOST covers 3700-9100 A observed, and the throughput
        below 3900 A and the dichroic-free red end above 8900 A are noisy; a margin of 200 A also keeps
        every rest-frame pixel covered for |RV| up to ~6000 km/s.
    log_step : float
        Step of the grid in log10(lambda) [1e-4], LAMOST's native sampling (~69 km/s per pixel).
    bad_mask_bits : tuple of str
        Names of :data:`LAMOST_MASK_BITS` whose pixels get ``ivar = 0`` [all six]. All six bits describe a
        pixel value that is not a valid measurement (see the comments on :data:`LAMOST_MASK_BITS`).
    mask_source : {'andmask', 'ormask'}
        Which mask to test ['andmask']. The LAMOST coadd combines several exposures; ORMASK flags a pixel bad
        in *any* exposure, even when the others gave a good value and the pipeline already down-weighted it
        in ``ivar``. ANDMASK flags pixels bad in *all* exposures, where the coadd has no valid value, so it
        removes what is truly bad without discarding usable data (SDSS makes the same recommendation for
        its identical AND/OR masks). Use 'ormask' for a conservative, stricter masking.
    clip_sigma : float
        Positive outliers beyond this many sigma above the running median are cosmic rays or sky residuals
        and get ``ivar = 0`` [5.0]; sigma is the larger of the pixel's noise and the local robust scatter.
    clip_window : int
        Odd width in pixels of the running median used for spike clipping [9]: ~3.7 LSF FWHM, wide enough
        that a single-pixel or 3-pixel spike does not move the median, narrow enough to follow lines.
    clip_scatter_window : int
        Odd width in pixels of the running median of |residual| giving the local scatter [15]: short
        enough to see the peak-to-trough structure of a crowded line forest at high SNR (with 21 or more
        pixels, peaks between lines at SNR 300 were taken for spikes in the tests).
    clip_grow : int
        Pixels on each side of a clipped spike also masked (cosmic-ray wings) [1].
    denoise : bool
        Apply :func:`~specabund.preprocess.steps.denoise` [False].
    denoise_method : {'lowpass'}
        Hamming-windowed sinc low-pass filter ['lowpass']; see ``steps.denoise`` for why and what it does.
    denoise_taps : int
        Odd length of the filter in pixels [15].
    denoise_cutoff : float
        Cutoff in units of the Nyquist frequency [0.75]: lines at R ~ 1800 keep their width within 2 %.
    rv_source : {'header', 'none'}
        Where the radial velocity comes from when ``rv_kms`` is not given to ``preprocess_spectrum``
        ['header': the header redshift Z; 'none': no shift, e.g. for simulated rest-frame spectra].
    refine_rv : bool
        Refine the velocity by cross-correlation against a template [False]; needs a template.
    rv_max_kms, rv_step_kms : float
        Velocity search range (+-) and step of the cross-correlation [500, 10].
    min_coverage : float
        Fraction of a new pixel that must be covered by good input pixels in :func:`resample` [0.5].
    continuum_method : {'pspline'}
        Penalised least-squares cubic B-spline with asymmetric iterative sigma clipping ['pspline'].
    continuum_split_wave : float
        Knot spacing switches from blue to red at this wavelength [5000].
    continuum_knot_spacing_blue, continuum_knot_spacing_red : float
        Knot spacing in A below/above ``continuum_split_wave`` [150, 300]. The blue is crowded with lines
        and has a steep throughput drop, both resolved by ~150 A; the red has few lines and a smooth shape.
    continuum_penalty : float
        Weight of the second-difference penalty on the spline coefficients relative to the mean data
        weight per coefficient [1e-3]: regularises gaps and edges (no oscillation) and, being relative, the
        same at every SNR.
    continuum_niter : int
        Maximum clipping iterations [50]; the loop stops as soon as the clipped set no longer changes
        (3-5 iterations for warm stars; crowded, high-SNR cool stars creep up to their pseudo-continuum
        in 10-40: with 30, 2 in 1000 simulated giants below 4150 K did not converge).
    continuum_sigma_lo, continuum_sigma_hi : float
        Pixels more than ``sigma_lo`` sigma below (absorption) or ``sigma_hi`` above (spikes) the current fit
        are excluded from the next fit [2.0, 3.0]. The mean offset that this asymmetric truncation gives
        to pure Gaussian noise is subtracted exactly, so the continuum is not biased up at low SNR.
    continuum_mask_lines : bool
        Exclude a fixed list of strong lines/bands and telluric bands from the fit [True].
    continuum_tol : float
        The fit has failed to converge when the last iteration still changes the continuum by more than
        this fraction anywhere with data [0.02].
    continuum_min_pixels : int
        Fewer usable pixels than this make the continuum fail [100]. Metal-rich giants below ~4150 K keep
        only 180-200 pixels after clipping (line blanketing); 100 still gives several pixels per spline
        knot, and a higher limit would drop the coolest metal-rich stars from the training set.
    second_pass : bool
        Refit the normalised spectrum with stricter clipping and stiffer knots to remove residual tilt [True].
    second_pass_knot_factor : float
        Knot spacing multiplier of the second pass [2.0].
    second_pass_sigma_lo, second_pass_sigma_hi : float
        Clipping of the second pass [1.5, 2.5].
    second_pass_niter : int
        Clipping iterations of the second pass [3] (a refinement: not required to converge).
    min_snr : float
        Spectra with a measured SNR below this get status 'low_snr' [3.0].
    snr_estimator : {'ivar', 'der_snr'}
        Which measured SNR ``min_snr`` tests ['ivar': median flux*sqrt(ivar)].
    min_good_fraction : float
        Spectra with a smaller fraction of grid pixels with ``ivar > 0`` get 'too_few_pixels' [0.8].
    fill_masked : bool
        Set the normalised flux of pixels with ``ivar = 0`` to 1 (the continuum) [True], so the network sees
        no arbitrary values there.
    """

    wave_min: float = 3900.0
    wave_max: float = 8900.0
    log_step: float = 1e-4
    bad_mask_bits: tuple[str, ...] = ("BADCCD", "BADPROFILE", "NOSKY", "BRIGHTSKY", "BADCENTER", "NODATA")
    mask_source: str = "andmask"
    clip_sigma: float = 5.0
    clip_window: int = 9
    clip_scatter_window: int = 15
    clip_grow: int = 1
    denoise: bool = False
    denoise_method: str = "lowpass"
    denoise_taps: int = 15
    denoise_cutoff: float = 0.75
    rv_source: str = "header"
    refine_rv: bool = False
    rv_max_kms: float = 500.0
    rv_step_kms: float = 10.0
    min_coverage: float = 0.5
    continuum_method: str = "pspline"
    continuum_split_wave: float = 5000.0
    continuum_knot_spacing_blue: float = 150.0
    continuum_knot_spacing_red: float = 300.0
    continuum_penalty: float = 1e-3
    continuum_niter: int = 50
    continuum_sigma_lo: float = 2.0
    continuum_sigma_hi: float = 3.0
    continuum_mask_lines: bool = True
    continuum_tol: float = 0.02
    continuum_min_pixels: int = 100
    second_pass: bool = True
    second_pass_knot_factor: float = 2.0
    second_pass_sigma_lo: float = 1.5
    second_pass_sigma_hi: float = 2.5
    second_pass_niter: int = 3
    min_snr: float = 3.0
    snr_estimator: str = "ivar"
    min_good_fraction: float = 0.8
    fill_masked: bool = True

    _FLOAT_RANGES: ClassVar[dict[str, tuple[float, float, bool]]] = {
        "wave_min": (1000.0, 20000.0, False),
        "wave_max": (1000.0, 20000.0, False),
        "log_step": (1e-6, 1e-2, False),
        "clip_sigma": (1.0, 100.0, False),
        "rv_max_kms": (0.0, 5000.0, True),
        "rv_step_kms": (0.1, 500.0, False),
        "min_coverage": (0.0, 1.0, True),
        "denoise_cutoff": (0.0, 1.0, True),
        "continuum_split_wave": (1000.0, 20000.0, False),
        "continuum_knot_spacing_blue": (10.0, 5000.0, False),
        "continuum_knot_spacing_red": (10.0, 5000.0, False),
        "continuum_penalty": (0.0, 1e6, True),
        "continuum_sigma_lo": (0.5, 100.0, False),
        "continuum_sigma_hi": (0.5, 100.0, False),
        "continuum_tol": (0.0, 1.0, True),
        "second_pass_knot_factor": (0.5, 100.0, False),
        "second_pass_sigma_lo": (0.5, 100.0, False),
        "second_pass_sigma_hi": (0.5, 100.0, False),
        "min_snr": (0.0, 1e4, False),
        "min_good_fraction": (0.0, 1.0, False),
    }
    _INT_RANGES: ClassVar[dict[str, tuple[int, int, bool]]] = {
        "clip_window": (3, 101, True),
        "clip_scatter_window": (3, 1001, True),
        "clip_grow": (0, 10, False),
        "denoise_taps": (3, 101, True),
        "continuum_niter": (1, 200, False),
        "second_pass_niter": (1, 200, False),
        "continuum_min_pixels": (10, 100000, False),
    }
    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "mask_source": _MASK_SOURCES,
        "denoise_method": _DENOISE_METHODS,
        "rv_source": _RV_SOURCES,
        "continuum_method": _CONTINUUM_METHODS,
        "snr_estimator": _SNR_ESTIMATORS,
    }
    _BOOLS: ClassVar[tuple[str, ...]] = (
        "denoise",
        "refine_rv",
        "continuum_mask_lines",
        "second_pass",
        "fill_masked",
    )

    def __post_init__(self) -> None:
        for name, (lo, hi, lo_open) in self._FLOAT_RANGES.items():
            object.__setattr__(self, name, _check_range(name, getattr(self, name), lo, hi, lo_open=lo_open))
        for name, (ilo, ihi, odd) in self._INT_RANGES.items():
            _check_int(name, getattr(self, name), ilo, ihi, odd=odd)
        for name, allowed in self._CHOICES.items():
            _check_choice(name, getattr(self, name), allowed)
        for name in self._BOOLS:
            _check_bool(name, getattr(self, name))
        if self.wave_max <= self.wave_min:
            raise ConfigError(f"wave_max ({self.wave_max}) must be greater than wave_min ({self.wave_min})")
        bits = self.bad_mask_bits
        if isinstance(bits, str) or not isinstance(bits, list | tuple):
            raise ConfigError(
                f"bad_mask_bits must be a list of names from {sorted(LAMOST_MASK_BITS)}, got {bits!r}"
            )
        unknown = [b for b in bits if b not in LAMOST_MASK_BITS]
        if unknown:
            raise ConfigError(
                f"bad_mask_bits has unknown names {unknown}; allowed: {', '.join(sorted(LAMOST_MASK_BITS))}"
            )
        object.__setattr__(self, "bad_mask_bits", tuple(dict.fromkeys(bits)))

    @property
    def bad_mask_value(self) -> int:
        """The OR of the values of :attr:`bad_mask_bits`."""
        value = 0
        for name in self.bad_mask_bits:
            value |= 1 << LAMOST_MASK_BITS[name]
        return value

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessOptions:
        """Build options from a mapping (e.g. a TOML table); unknown keys raise :class:`ConfigError`."""
        if not isinstance(d, dict):
            raise ConfigError(f"preprocess options must be a mapping, got {type(d).__name__}")
        reject_unknown_keys(cls, d, "preprocess option(s)")
        kwargs = dict(d)
        if "bad_mask_bits" in kwargs and isinstance(kwargs["bad_mask_bits"], list):
            kwargs["bad_mask_bits"] = tuple(kwargs["bad_mask_bits"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-safe dict (tuples become lists); ``from_dict(to_dict())`` gives equal options."""
        out = asdict(self)
        out["bad_mask_bits"] = list(self.bad_mask_bits)
        return out
