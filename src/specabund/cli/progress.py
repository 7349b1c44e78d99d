"""Progress of long commands on the terminal (a tqdm bar) and in the log file (a line every few seconds)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("specabund.cli")


def _duration(seconds: float) -> str:
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class SpectraProgress:
    """``update(n)``: ``n`` more spectra done. Drives a tqdm bar (spectra, spectra/s, ETA) and logs the same
    at most every ``every`` seconds (at DEBUG: the log file always, the terminal with ``-v``), and once at
    the end."""

    def __init__(self, total: int, desc: str, every: float = 10.0, bar: bool = True) -> None:
        from tqdm.auto import tqdm

        self.total, self.desc, self.every = int(total), desc, float(every)
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        self.bar = tqdm(total=self.total, unit="spec", desc=desc, disable=not bar, smoothing=0.1)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = _duration(eta) if eta == eta else "?"
        return (
            f"{self.desc}: {self.done}/{self.total} spectra, {rate:.1f} spectra/s, "
            f"elapsed {_duration(elapsed)}, ETA {eta_text}"
        )

    def update(self, n: int) -> None:
        self.done += int(n)
        self.bar.update(int(n))
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            log.debug("%s", self.line())

    def close(self) -> None:
        self.bar.close()
        if self.done:
            log.info("%s", self.line())


@contextmanager
def spectra_progress(total: int, desc: str, every: float = 10.0) -> Iterator[Callable[[int], None]]:
    """A progress callback for library functions taking ``progress=`` (see :class:`SpectraProgress`)."""
    p = SpectraProgress(total, desc, every)
    try:
        yield p.update
    finally:
        p.close()
