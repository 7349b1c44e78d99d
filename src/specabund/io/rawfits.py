"""A fast, strict reader of standard FITS headers from bytes, for the LAMOST readers' common case.

astropy parses every header card it is asked for through a general (and lenient) machinery that costs
about 1.5 ms per LAMOST file, more than resampling or cleaning the spectrum. The files of a survey are
plain: fixed-format cards, one header block or two per HDU, unscaled arrays. :class:`RawHDUList` parses
exactly that from the file's bytes with one regular expression per card and exposes the few attributes
the readers of :mod:`specabund.io.lamost` use (``header`` look-ups, ``name``, ``shape``, ``section``,
the HDU kind). Anything it does not understand with certainty (a card that is not plain ``KEY = value``,
long-string ``CONTINUE`` cards, non-ASCII bytes, a header without ``END``, scaled data, ``hdu.data``)
raises :class:`NeedAstropy`, and the reader starts again with astropy: this module never decides that a
file is bad, so error messages and lenient fixes stay astropy's.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

__all__ = ["NeedAstropy", "RawHDU", "RawHDUList", "RawHeader", "data_nbytes", "find_end"]

BLOCK = 2880
CARD = 80
END_CARD = b"END" + b" " * 77
BITPIX_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
# a value card: keyword (columns 1-8), "= " (9-10), then the value and an optional comment
_STRING_RE = re.compile(r" *'((?:[^']|'')*)' *(/.*)?$")
_INT_RE = re.compile(r"[+-]?\d+$")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[EeDd][+-]?\d+)?$")
_KEYWORD_RE = re.compile(r"[A-Z0-9_-]*$")
_COMMENTARY = frozenset({"", "COMMENT", "HISTORY"})


class NeedAstropy(Exception):
    """The bytes are not plain enough for this reader: read the file with astropy instead."""


def _value(text: str) -> Any:
    """Python value of a card's value field (columns 11-80), as astropy would give it."""
    if text.lstrip().startswith("'"):
        m = _STRING_RE.match(text)
        if m is None:
            raise NeedAstropy(f"unparsed string value {text!r}")
        if "''/" in m.group(1) or "'" in (m.group(2) or ""):
            raise NeedAstropy("a quote before a slash (astropy reads these its own way)")
        # astropy: doubled quotes are one quote, trailing blanks are not significant
        return m.group(1).replace("''", "'").rstrip()
    value = text.split("/", 1)[0].strip()
    if not value:
        return None  # an undefined value
    if value == "T":
        return True
    if value == "F":
        return False
    if _INT_RE.match(value):
        return int(value)
    if _FLOAT_RE.match(value):
        return float(value.replace("D", "E").replace("d", "e"))
    raise NeedAstropy(f"unparsed value {value!r}")


class RawHeader:
    """Keyword -> value of one header's value cards (the first card wins for a repeated keyword)."""

    __slots__ = ("_cards",)

    def __init__(self, block: bytes) -> None:
        try:
            text = block.decode("ascii")
        except UnicodeDecodeError as exc:
            raise NeedAstropy("non-ASCII header") from exc
        cards: dict[str, Any] = {}
        last_string = False
        for pos in range(0, len(text), CARD):
            card = text[pos : pos + CARD]
            key = card[:8].rstrip()
            if key == "CONTINUE" and last_string:
                raise NeedAstropy("long-string CONTINUE card")
            if card[8:10] != "= " or key in _COMMENTARY or key == "HIERARCH":
                last_string = False
                continue
            if not _KEYWORD_RE.match(key):
                raise NeedAstropy(f"non-standard keyword {key!r}")
            value = _value(card[10:])
            last_string = isinstance(value, str) and value.endswith("&")
            cards.setdefault(key, value)
        self._cards = cards

    def __contains__(self, key: str) -> bool:
        return key.upper() in self._cards

    def __getitem__(self, key: str) -> Any:
        return self._cards[key.upper()]

    def get(self, key: str, default: Any = None) -> Any:
        return self._cards.get(key.upper(), default)


class RawHDU:
    """One HDU: its header and where its data lie in the file's bytes."""

    def __init__(self, raw: bytes, header: RawHeader, data_start: int, nbytes: int, primary: bool) -> None:
        self.header = header
        self._raw = raw
        self.data_start = data_start
        self.nbytes = nbytes
        xtension = None if primary else str(header.get("XTENSION", "")).strip().upper()
        #: 'primary', 'image', 'bintable' or another XTENSION value (lower case)
        self.kind = "primary" if primary else (xtension or "").lower()
        self.name = str(header.get("EXTNAME", "PRIMARY" if primary else ""))

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy shape of the data (last FITS axis first), like astropy's ``hdu.shape``."""
        naxis = self.header.get("NAXIS", 0)
        return tuple(int(self.header.get(f"NAXIS{k}", 0)) for k in range(naxis, 0, -1))

    @property
    def section(self) -> np.ndarray:
        """The data array of an unscaled image (astropy's ``section`` indexes the same way)."""
        h = self.header
        if self.kind not in ("primary", "image"):
            raise NeedAstropy("section of a non-image HDU")
        if h.get("BSCALE", 1) != 1 or h.get("BZERO", 0) != 0 or "BLANK" in h:
            raise NeedAstropy("scaled image")
        dtype = np.dtype(BITPIX_DTYPES[h["BITPIX"]])
        shape = self.shape
        count = int(np.prod(shape)) if shape else 0
        if self.data_start + count * dtype.itemsize > len(self._raw):
            raise NeedAstropy("data beyond the end of the file")
        return np.frombuffer(self._raw, dtype=dtype, count=count, offset=self.data_start).reshape(shape)

    @property
    def data(self) -> Any:
        raise NeedAstropy("hdu.data is astropy's")


class RawHDUList:
    """The HDUs of a FITS file held in ``raw``, parsed lazily in order, like astropy's ``lazy_load_hdus``.

    Indexing past the last HDU raises ``IndexError`` (as astropy does); anything irregular raises
    :class:`NeedAstropy`.
    """

    def __init__(self, raw: bytes) -> None:
        if len(raw) % BLOCK:
            raise NeedAstropy("size is not a multiple of 2880 bytes")
        self._raw = raw
        self._hdus: list[RawHDU] = []
        self._next = 0

    def _parse_next(self) -> bool:
        raw, start = self._raw, self._next
        if start >= len(raw):
            return False
        end = find_end(raw, start)
        if end is None:
            raise NeedAstropy("header without END card")
        header = RawHeader(raw[start : end - CARD])
        primary = not self._hdus
        first = raw[start : start + 8].decode("ascii", "replace").rstrip()
        if first != ("SIMPLE" if primary else "XTENSION"):
            raise NeedAstropy(f"HDU {len(self._hdus)} starts with {first!r}")
        if primary and header.get("SIMPLE") is not True:
            raise NeedAstropy("SIMPLE is not T")
        data_start = end + (-end % BLOCK)
        nbytes = data_nbytes(header)
        if nbytes is None:
            raise NeedAstropy("irregular BITPIX/NAXIS/GROUPS/PCOUNT/GCOUNT")
        self._hdus.append(RawHDU(raw, header, data_start, nbytes, primary))
        self._next = data_start + nbytes + (-nbytes % BLOCK)
        if self._next > len(raw):
            raise NeedAstropy("data beyond the end of the file")
        return True

    def __getitem__(self, index: int) -> RawHDU:
        if index < 0:
            raise NeedAstropy("negative HDU index")
        while len(self._hdus) <= index:
            if not self._parse_next():
                raise IndexError(f"no HDU {index}")
        return self._hdus[index]

    def close(self) -> None:
        """Nothing to release (kept for the interface of ``fits.HDUList``)."""


def find_end(raw: bytes, start: int) -> int | None:
    """Position just after the END card of the header starting at ``start`` (80-byte aligned), or None."""
    pos = start
    n = len(raw)
    while pos + CARD <= n:
        if raw[pos : pos + 3] == b"END" and raw[pos : pos + CARD] == END_CARD:
            return pos + CARD
        pos += CARD
    return None


def data_nbytes(header: Any) -> int | None:
    """Size of the data block described by a header (astropy's or a :class:`RawHeader`; no random groups),
    or None when BITPIX/NAXIS/PCOUNT/GCOUNT are irregular."""
    if header.get("GROUPS", False):
        return None
    bitpix = header.get("BITPIX")
    naxis = header.get("NAXIS", 0)
    if not isinstance(bitpix, int) or not isinstance(naxis, int) or bitpix not in BITPIX_DTYPES:
        return None
    if naxis == 0:
        return 0
    size = 1
    for k in range(1, naxis + 1):
        value = header.get(f"NAXIS{k}")
        if not isinstance(value, int) or value < 0:
            return None
        size *= value
    pcount = header.get("PCOUNT", 0)
    gcount = header.get("GCOUNT", 1)
    if not isinstance(pcount, int) or not isinstance(gcount, int):
        return None
    return abs(bitpix) // 8 * gcount * (pcount + size)
