"""Speed of the LAMOST simulator: spectra per second (simulation + FITS writing) per layout and worker count.

Usage::

    python benchmarks/simulate.py [--n 200] [--seed 0]

Also prints the cost of one call of ``normalized_model_flux`` (used many times for finite differences).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from specabund.simulate import lamost_wavelength_grid, normalized_model_flux, simulate_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="spectra per configuration")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    grid = lamost_wavelength_grid()
    labels = {"teff": 5000.0, "logg": 3.0, "fe_h": -0.3, "MG_FE": 0.1}
    normalized_model_flux(labels, grid)
    reps = 300
    t0 = time.perf_counter()
    for i in range(reps):
        normalized_model_flux({**labels, "teff": 5000.0 + i}, grid)
    dt = (time.perf_counter() - t0) / reps
    print(f"normalized_model_flux: {dt * 1e3:.2f} ms per call ({1 / dt:.0f} calls/s)")

    print(f"cpu cores: {os.cpu_count()}")
    head = ("layout", "gzip", "workers", "n", "seconds", "spectra/s", "per core")
    print("{:8s} {:5s} {:>7s} {:>5s} {:>8s} {:>10s} {:>9s}".format(*head))
    for layout in ("table", "image"):
        for gz in (False, True):
            for workers in (1, 2):
                with tempfile.TemporaryDirectory() as tmp:
                    s = simulate_dataset(
                        args.n, Path(tmp), seed=args.seed, layout=layout, gzip=gz, n_workers=workers
                    )
                rate = s["spectra_per_s"]
                print(
                    f"{layout:8s} {gz!s:5s} {workers:7d} {args.n:5d} {s['elapsed_s']:8.2f} {rate:10.1f} "
                    f"{rate / workers:9.1f}"
                )


if __name__ == "__main__":
    main()
