"""Write spectra as LAMOST low-resolution FITS files (DR9+ table layout or DR2-DR8 image layout)."""

from __future__ import annotations

import datetime as _dt
import gzip as _gzip
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from specabund.spectrum import Spectrum
from specabund.utils import atomic_write

from .synth import LAMOST_COEFF1, spectral_subclass

__all__ = ["LAYOUTS", "write_lamost_fits"]

#: Layouts :func:`write_lamost_fits` writes.
LAYOUTS: tuple[str, ...] = ("table", "image")


def _get(meta: dict[str, Any], key: str, default: Any) -> Any:
    v = meta.get(key)
    return default if v is None else v


def _common_cards(spec: Spectrum, layout: str) -> list[tuple[str, Any, str]]:
    m = spec.meta
    labels = m.get("labels") or {}
    teff = labels.get("teff", labels.get("TEFF"))
    release = str(_get(m, "data_release", "DR10" if layout == "table" else "DR8"))
    if not release.upper().startswith("LAMOST"):
        release = f"LAMOST {release}"
    mjd = int(_get(m, "mjd", 58000))
    coeff0 = float(_get(m, "coeff0", round(float(np.log10(spec.wavelength[0])), 4)))
    coeff1 = float(_get(m, "coeff1", LAMOST_COEFF1))
    subclass = _get(m, "subclass", spectral_subclass(float(teff)) if teff is not None else "")
    cards: list[tuple[str, Any, str]] = [
        ("COMMENT", "--------FILE INFORMATION", ""),
        ("FILENAME", str(_get(m, "filename", "")), ""),
        ("OBSID", int(_get(m, "obsid", 0)), "Unique number ID of this spectrum"),
        ("AUTHOR", "LAMOST Pipeline", "Who compiled the information"),
        ("DATA_V", str(release), "Data release version"),
    ]
    if layout == "image":
        cards += [
            ("EXTEN0", "Flux, Inverse, Wavelength, Andmask, Ormask", ""),
            ("N_EXTEN", 1, "The extension number"),
            ("EXTNAME", "Flux", "The extension name"),
        ]
    else:
        cards += [
            ("N_EXTEN", 2, "The amount of extension"),
            ("NORM", 1, "1 if there exists a normalizated spectrum"),
        ]
    date = _dt.datetime(2000, 1, 1) + _dt.timedelta(days=mjd - 51544)
    cards += [
        ("ORIGIN", "NAOC-LAMOST", "Organization responsible for creating this file"),
        ("COMMENT", "SIMULATED SPECTRUM written by specabund.simulate (not real LAMOST data)", ""),
        ("COMMENT", "--------TELESCOPE PARAMETERS", ""),
        ("TELESCOP", "LAMOST", "GuoShouJing Telescope"),
        ("LONGITUD", 117.58, "[deg] Longitude of site"),
        ("LATITUDE", 40.39, "[deg] Latitude of site"),
        ("COMMENT", "--------OBSERVATION PARAMETERS", ""),
        ("DATE-OBS", date.strftime("%Y-%m-%dT%H:%M:%S"), "The observation median UTC"),
        ("LMJD", mjd + 1, "Local Modified Julian Day"),
        ("MJD", mjd, "Modified Julian Day"),
        ("PLANID", str(_get(m, "planid", "SIM0001")), "Plan ID in use"),
        ("RA", round(float(_get(m, "ra", 0.0)), 6), "[deg] Right ascension of object"),
        ("DEC", round(float(_get(m, "dec", 0.0)), 6), "[deg] Declination of object"),
        ("DESIG", str(_get(m, "designation", "")), "Designation of LAMOST target"),
        ("FIBERID", int(_get(m, "fiberid", 1)), "Fiber ID of Object"),
        ("OBJTYPE", "Star", "Object type from input catalog"),
        ("TSOURCE", "SPECABUND", "Name of input catalog"),
        ("OBS_TYPE", "OBJ", "The type of target (OBJ, FLAT, ARC or BIAS)"),
        ("COMMENT", "--------SPECTROGRAPH PARAMETERS", ""),
        ("SPID", int(_get(m, "spid", 1)), "Spectrograph ID"),
        ("COMMENT", "--------DATA REDUCTION PARAMETERS", ""),
        ("HELIO", True, "Heliocentric correction"),
        ("VACUUM", True, "Wavelengths are in vacuum"),
        ("NWORDER", 2, "Number of linear-log10 coefficients"),
        ("WFITTYPE", "LOG-LINEAR", "Linear-log10 dispersion"),
        ("COEFF0", round(coeff0, 4), "Central wavelength (log10) of first pixel"),
        ("COEFF1", coeff1, "Log10 dispersion per pixel"),
        ("WAT0_001", "system=linear", ""),
        ("WAT1_001", "wtype=linear label=Wavelength units=Angstroms", ""),
        ("CRVAL1", round(coeff0, 4), "Central wavelength (log10) of first pixel"),
        ("CD1_1", coeff1, "Log10 dispersion per pixel"),
        ("CRPIX1", 1, "Starting pixel (1-indexed)"),
        ("CTYPE1", "LINEAR", ""),
        ("DC-FLAG", 1, "Log-linear flag"),
        ("COMMENT", "--------SPECTRA ANALYSIS RESULTS", ""),
        ("CLASS", str(_get(m, "class", "STAR")), "Class of object"),
        ("SUBCLASS", str(subclass), "Subclass of object"),
        ("Z", round(float(_get(m, "z", 0.0)), 8), "Redshift of object"),
        ("Z_ERR", round(float(_get(m, "z_err", 0.0)), 8), "Redshift error of object"),
        ("ZFLAG", "LASP", "Which method computes the redshift"),
    ]
    for band in "ugriz":
        cards.append(
            (f"SNR{band.upper()}", round(float(_get(m, f"snr_{band}", 0.0)), 2), f"SNR of {band} filter")
        )
    return cards


def _pad(raw: bytes, fill: bytes) -> bytes:
    return raw + fill * (-len(raw) % 2880)


def _header_bytes(cards: list[tuple[str, Any, str]]) -> bytes:
    """Serialise cards (in order) as a FITS header block, END card and padding included."""
    text = []
    for key, value, comment in cards:
        card = fits.Card("COMMENT", value) if key == "COMMENT" else fits.Card(key, value, comment)
        text.append(card.image)
    text.append("END".ljust(80))
    return _pad("".join(text).encode("ascii"), b" ")


def write_lamost_fits(
    spectrum: Spectrum, path: str | Path, layout: str = "table", gzip: bool = False
) -> Path:
    """Write a spectrum as a LAMOST low-resolution FITS file, atomically.

    Parameters
    ----------
    spectrum : Spectrum
        The spectrum; ``meta`` supplies the header values (``obsid``, ``filename``, ``designation``, ``ra``,
        ``dec``, ``class``, ``subclass``, ``z``, ``z_err``, ``snr_u`` .. ``snr_z``, ``data_release``,
        ``coeff0``, ``mjd``, ``planid``, ``spid``, ``fiberid``); missing ones get neutral defaults.
    path : path
        Output file. With ``gzip=True`` a ``.gz`` suffix is appended when missing.
    layout : {'table', 'image'}
        ``'table'``: DR9+ layout, a header-only primary HDU and HDU 1 ``COADD``, a one-row binary table
        with FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK and NORMALIZATION array columns (float32, as the
        real DR10 files store them, masks included). ``'image'``: DR2-DR8 layout, a 5 x N float32 primary
        image with rows flux, inverse variance, wavelength, andmask, ormask.
    gzip : bool
        Compress the file (``.fits.gz``, readable by astropy and by :func:`specabund.io.read_lamost`).

    Returns
    -------
    Path
        The path written.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    path = Path(path)
    if gzip and path.suffix.lower() != ".gz":
        path = path.with_name(path.name + ".gz")
    f32 = np.float32
    wave = np.asarray(spectrum.wavelength, dtype=f32)
    flux = np.asarray(spectrum.flux, dtype=f32)
    ivar = np.asarray(spectrum.ivar, dtype=f32)
    andm = np.asarray(spectrum.andmask, dtype=f32)
    orm = np.asarray(spectrum.ormask, dtype=f32)
    cards = _common_cards(spectrum, layout)
    if layout == "image":
        data = np.vstack([flux, ivar, wave, andm, orm]).astype(">f4")
        head = [
            ("SIMPLE", True, "conforms to FITS standard"),
            ("BITPIX", -32, ""),
            ("NAXIS", 2, "Number of array dimensions"),
            ("NAXIS1", wave.size, ""),
            ("NAXIS2", 5, ""),
            ("EXTEND", True, ""),
        ]
        raw = _header_bytes(head + cards) + _pad(data.tobytes(), b"\0")
    else:
        norm = spectrum.meta.get("normalization")
        if norm is None:
            norm = np.ones_like(flux)
        n = wave.size
        columns = (
            ("FLUX", flux),
            ("IVAR", ivar),
            ("WAVELENGTH", wave),
            ("ANDMASK", andm),
            ("ORMASK", orm),
            ("NORMALIZATION", np.asarray(norm, dtype=f32)),
        )
        head = [
            ("SIMPLE", True, "conforms to FITS standard"),
            ("BITPIX", 8, ""),
            ("NAXIS", 0, "Number of array dimensions"),
            ("EXTEND", True, ""),
        ]
        ext = [
            ("XTENSION", "BINTABLE", "binary table extension"),
            ("BITPIX", 8, "Required value"),
            ("NAXIS", 2, "Required value"),
            ("NAXIS1", 4 * n * len(columns), "Number of bytes per row"),
            ("NAXIS2", 1, "Number of rows"),
            ("PCOUNT", 0, "Normally 0 (no varying arrays)"),
            ("GCOUNT", 1, "Required value"),
            ("TFIELDS", len(columns), "Number of columns in table"),
            ("EXTNAME", "COADD", "The extension name"),
        ]
        for i, (name, _) in enumerate(columns, start=1):
            ext += [(f"TTYPE{i}", name, ""), (f"TFORM{i}", f"{n}E", "")]
        row = b"".join(np.asarray(arr, dtype=">f4").tobytes() for _, arr in columns)
        raw = _header_bytes(head + cards) + _header_bytes(ext) + _pad(row, b"\0")
    if gzip:
        raw = _gzip.compress(raw, compresslevel=6, mtime=0)
    with atomic_write(path, "wb") as fh:
        fh.write(raw)
    return path
