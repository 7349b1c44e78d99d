"""Throughput of :func:`specabund.io.read_lamost` (spectra read per second, one process, one core).

Measures, on the real LAMOST files in ../shared/data/lamost (the file set is repeated until at least
``--min-seconds`` have elapsed) and on ``--n-sim`` simulated files when :mod:`specabund.simulate` is
available:

* ``read_lamost``: the full reader (layout detection, validation, metadata, float64 conversion);
* ``floor``: ``fits.open(path, memmap=False, lazy_load_hdus=True)`` plus reading the data arrays alone,
  i.e. what astropy costs before any of the reader's own work;
* ``bytes``: reading (and for .gz, decompressing) the file bytes, the I/O floor.

Usage::

    python benchmarks/read_fits.py [--lamost-dir DIR] [--min-seconds 1.5] [--n-sim 1000]
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits

from specabund.errors import FitsFormatError
from specabund.io import iter_fits_files, read_lamost

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAMOST = Path(os.environ.get("SPECABUND_SHARED", ROOT.parent / "shared")) / "data" / "lamost"
TABLE_COLUMNS = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK")


def floor_read(path: Path) -> None:
    """astropy open + data arrays only: the cost below which the reader cannot go with astropy."""
    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        data = hdul[0].data
        if data is None:
            table = hdul[1].data
            for name in TABLE_COLUMNS:
                np.asarray(table[name][0])
        else:
            np.asarray(data)


def bytes_read(path: Path) -> None:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        gzip.decompress(raw)


def rate(files: list[Path], fn: Callable[[Path], object], min_seconds: float) -> tuple[float, int]:
    """Spectra per second of ``fn`` over ``files``, repeating the whole set until ``min_seconds``."""
    for path in files[: min(5, len(files))]:  # warm the page cache and imports
        fn(path)
    count = 0
    start = time.perf_counter()
    while True:
        for path in files:
            fn(path)
        count += len(files)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count / elapsed, count


def report(label: str, files: list[Path], min_seconds: float) -> None:
    print(f"\n{label}: {len(files)} files")
    for name, fn in (("read_lamost", read_lamost), ("floor", floor_read), ("bytes", bytes_read)):
        per_second, count = rate(files, fn, min_seconds)
        print(f"  {name:12s} {per_second:9.0f} spectra/s  ({count} reads)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lamost-dir", type=Path, default=DEFAULT_LAMOST)
    parser.add_argument("--min-seconds", type=float, default=1.5)
    parser.add_argument("--n-sim", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.lamost_dir.is_dir():
        readable = []
        layouts: dict[str, list[Path]] = {}
        for path in iter_fits_files(args.lamost_dir):
            try:
                spec = read_lamost(path)
            except FitsFormatError as exc:
                print(f"(excluded, refused as intended: {exc.reason[:60]}...: {path.name})")
                continue
            readable.append(path)
            layouts.setdefault(spec.meta["layout"], []).append(path)
        report("real LAMOST files, all layouts", readable, args.min_seconds)
        for layout, files in sorted(layouts.items()):
            report(f"real LAMOST files, layout {layout}", files, args.min_seconds)
    else:
        print(f"real LAMOST files skipped: {args.lamost_dir} not found")

    try:
        from specabund.simulate import simulate_dataset
    except ImportError as exc:
        print(f"\nsimulated spectra skipped: the simulator is not available ({exc})")
        return 0
    with tempfile.TemporaryDirectory(prefix="specabund-bench-") as tmp:
        t0 = time.perf_counter()
        simulate_dataset(args.n_sim, Path(tmp), seed=args.seed, layout="mixed", gzip=False)
        print(f"\nsimulated {args.n_sim} spectra in {time.perf_counter() - t0:.1f} s")
        files = iter_fits_files(Path(tmp) / "fits")
        failures = 0
        for path in files:
            try:
                read_lamost(path)
            except FitsFormatError as exc:
                failures += 1
                if failures <= 3:
                    print(f"  unreadable simulated file: {exc}")
        print(f"  {len(files) - failures}/{len(files)} simulated files read")
        report("simulated files (mixed layouts)", files, args.min_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
