"""The dataset pipeline behind ``specabund preprocess``.

Raw LAMOST FITS files plus a reference and/or prediction label catalogue in, training-ready datasets out:

1. read and clean the catalogues (sentinels, flags, plausible ranges:
   :class:`~specabund.catalog.CatalogRules`), list the FITS files and match them to the catalogue rows
   (:mod:`specabund.catalog`); a catalogue with no rows, or none matching a file, is an error before
   any work;
2. process the matched files in chunks (default 1000): read, clean, rest frame, resample, normalise
   (:func:`specabund.preprocess.steps.preprocess_spectrum`), optionally in parallel;
3. after each chunk, write its result to the cache (``<output>/cache/preprocessing/``) under a key made of
   the chunk's files (name, size, modification time), their catalogue RV, the RV plausibility limit and
   the preprocessing options, so a killed run resumes at the first unfinished chunk and a changed
   configuration never reuses stale work;
4. split the reference spectra 7:1:2 by star (seeded), stream the chunks into the output ``.npz`` files
   (memory bounded by the chunk size), and write ``rejected.csv`` (every spectrum not kept, with the
   reason), ``manifest.json``, the validation report and the preprocessing plots.

Identical inputs give byte-identical outputs, whatever the number of workers or interruptions.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..catalog import (
    DEFAULT_MAX_ABS_RV_KMS,
    Catalog,
    CatalogRules,
    MatchResult,
    match_catalog,
    read_catalog,
    spec_key,
    unreadable_reason,
)
from ..dataset import SPLIT_CODES
from ..errors import CatalogError, FitsFormatError, SpecabundError
from ..io import iter_fits_files, read_lamost
from ..store import choose_format, suffix, write_store
from ..utils import (
    MapFn,
    NpzWriter,
    atomic_write,
    atomic_write_json,
    finite_float32,
    hash_bytes,
    hash_json,
    process_map,
)
from .options import PreprocessOptions
from .steps import preprocess_spectrum, velocity_problem

log = logging.getLogger(__name__)

#: Bump when the pipeline's per-file output changes for the same options (invalidates caches).
PIPELINE_VERSION = 2  # 2: cool-star continuum (floored clipping, masked blue arm)


@dataclass
class PipelineSettings:
    """Settings of :func:`run_preprocess` besides the per-spectrum options."""

    chunk_size: int = 1000
    n_workers: int = 1
    batch_size: int = 32  # files handed to a worker process at once (n_workers > 1)
    normalize: bool = True
    use_cache: bool = True
    clear_cache: bool = False
    seed: int = 42
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    elements: list[str] | None = None
    include_stellar_parameters: bool = True
    catalog_rules: CatalogRules = field(default_factory=CatalogRules)
    n_plot_examples: int = 4
    progress: bool = False
    max_chunks: int | None = None  # stop after processing this many new chunks (testing interruptions)
    #: dataset format: 'npz', 'zarr' (chunked, compressed, read lazily) or 'auto' (zarr for large sets)
    format: str = "auto"


@dataclass
class _Task:
    path: Path
    rv_kms: float | None
    which: str  # 'reference' | 'prediction'
    row: int


@dataclass
class _SetPlan:
    name: str
    catalog: Catalog
    match: MatchResult
    tasks: list[_Task] = field(default_factory=list)


def preprocess_hash(opts: PreprocessOptions, normalize: bool = True) -> str:
    """Hash identifying the preprocessing: models refuse data whose hash differs from theirs."""
    return hash_json({"options": opts.to_dict(), "normalize": normalize, "pipeline": PIPELINE_VERSION})[:16]


# --------------------------------------------------------------------------------------------------
# per-file work (runs in worker processes: keep it a module-level function of plain arguments)


def process_file(
    path: Path,
    rv_kms: float | None,
    opts: PreprocessOptions,
    normalize: bool = True,
    max_abs_rv_kms: float = DEFAULT_MAX_ABS_RV_KMS,
) -> dict[str, Any]:
    """Read and preprocess one file; never raises for bad data (the status says what went wrong).

    A catalogue ``rv_kms`` beyond ``max_abs_rv_kms`` is ignored (the header Z is used); a spectrum with
    neither a plausible catalogue rv nor a plausible header Z (``|Z| c <= max_abs_rv_kms``, finite) gets
    the status ``no_valid_rv: <why>`` (unless ``opts.rv_source == 'none'``).
    """
    out: dict[str, Any] = {
        "status": "ok",
        "obsid": "",
        "filename": path.name,
        "designation": "",
        "class": "",
        "snr_header": np.nan,
        "snr_measured": np.nan,
        "good_fraction": np.nan,
        "rv_source": "",
        "rv_used_kms": np.nan,
        "n_raw": 0,
        "flux": None,
        "ivar": None,
    }
    try:
        spec = read_lamost(path)
    except FitsFormatError as exc:
        out["status"] = f"unreadable: {exc.reason}"
        return out
    except Exception as exc:  # anything else from a broken file must not stop a 100k-file run
        out["status"] = f"unreadable: {type(exc).__name__}: {exc}"
        return out
    meta = spec.meta
    out["obsid"] = "" if meta.get("obsid") is None else str(meta["obsid"])
    out["designation"] = meta.get("designation") or ""
    out["class"] = (meta.get("class") or "").strip()
    out["n_raw"] = len(spec)
    if out["class"] and out["class"].upper() != "STAR":
        out["status"] = f"non_star_class: {out['class']}"
        return out
    rv_kms, problem = velocity_problem(rv_kms, meta.get("z"), opts, max_abs_rv_kms)
    if problem is not None:
        log.debug("%s: %s", path, problem)
        out["status"] = f"no_valid_rv: {problem}"
        return out
    try:
        res = preprocess_spectrum(spec, opts, rv_kms=rv_kms, keep_stages=False)
    except Exception as exc:  # defensive: preprocess_spectrum reports bad spectra by status
        out["status"] = f"error: {type(exc).__name__}: {exc}"
        return out
    out.update(
        status=res.status,
        snr_header=np.nan if res.snr_header is None else float(res.snr_header),
        snr_measured=float(res.snr_measured),
        good_fraction=float(res.good_fraction),
        rv_source=res.rv_source,
        rv_used_kms=float(res.rv_used_kms) if res.rv_used_kms is not None else np.nan,
    )
    if res.status == "ok":
        flux = np.asarray(res.flux, dtype=np.float32)
        ivar = np.asarray(res.ivar, dtype=np.float32)
        if not normalize:
            # rest-frame resampled flux scaled by its ivar-weighted mean (a shape, no continuum fit)
            flux = flux * np.asarray(res.continuum, dtype=np.float32)
            ivar = ivar / np.asarray(res.continuum, dtype=np.float32) ** 2
            good = ivar > 0
            scale = float(np.average(flux[good], weights=ivar[good])) if good.any() else 1.0
            flux = (flux / scale).astype(np.float32)
            ivar = (ivar * scale**2).astype(np.float32)
        out["flux"], out["ivar"] = flux, ivar
    return out


def _process_task(args: tuple[Path, float | None, PreprocessOptions, bool, float]) -> dict[str, Any]:
    return process_file(*args)


def process_chunk(
    args: list[tuple[Path, float | None, PreprocessOptions, bool, float]], path: str, n_pixels: int
) -> str:
    """One Dask task: preprocess the files of a chunk and write the chunk's cache file ``path``.

    A chunk whose file exists (a task rerun after its worker died once the file was written) is kept.
    """
    if not Path(path).exists():
        _write_chunk(Path(path), [process_file(*a) for a in args], n_pixels)
    return path


# --------------------------------------------------------------------------------------------------
# chunk cache


_SCALAR_FIELDS = ("snr_header", "snr_measured", "good_fraction", "rv_used_kms")
_STR_FIELDS = ("status", "obsid", "filename", "designation", "class", "rv_source")


def _file_signature(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime); an unreadable path (symlink loop, dangling link) gives (path, -1, -1)."""
    try:
        st = path.stat()
        return (str(path.resolve()), int(st.st_size), int(st.st_mtime_ns))
    except (OSError, RuntimeError):
        return (str(path.absolute()), -1, -1)


def _chunk_key(tasks: Sequence[_Task], opts_hash: str, max_abs_rv_kms: float = DEFAULT_MAX_ABS_RV_KMS) -> str:
    sig = [(*_file_signature(t.path), None if t.rv_kms is None else float(t.rv_kms)) for t in tasks]
    return hash_json({"files": sig, "preprocess": opts_hash, "max_abs_rv_kms": float(max_abs_rv_kms)})[:24]


def _write_chunk(path: Path, results: list[dict[str, Any]], n_pix: int) -> None:
    n = len(results)
    flux = np.ones((n, n_pix), dtype=np.float32)
    ivar = np.zeros((n, n_pix), dtype=np.float32)
    for i, r in enumerate(results):
        if r["flux"] is not None:
            flux[i], ivar[i] = r["flux"], r["ivar"]
    arrays: dict[str, Any] = {"flux": flux, "ivar": ivar, "n_raw": np.array([r["n_raw"] for r in results])}
    for k in _SCALAR_FIELDS:
        arrays[k] = np.array([r[k] for r in results], dtype=np.float64)
    for k in _STR_FIELDS:
        arrays[k] = np.array([str(r[k]) for r in results], dtype=str)
    with atomic_write(path, "wb") as fh:
        w = NpzWriter(fh)
        for k, v in arrays.items():
            w.add_array(k, v)
        w.close()


def _read_chunk_meta(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k not in ("flux", "ivar")}


# --------------------------------------------------------------------------------------------------
# splitting


def split_groups(groups: Sequence[str], fractions: Sequence[float], seed: int) -> np.ndarray:
    """Assign each row a split code (0 train, 1 val, 2 test), keeping rows of one group together.

    Groups are shuffled with ``seed`` and assigned in turn to the split furthest below its target count,
    so the realised fractions match ``fractions`` as closely as the group sizes allow. Deterministic.
    """
    groups = np.asarray(groups, dtype=str)
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    target = np.asarray(fractions, dtype=float) * len(groups)
    filled = np.zeros(3)
    code_of_group = np.empty(len(uniq), dtype=np.int8)
    for g in order:
        deficit = (target - filled) / np.maximum(target, 1e-9)
        k = int(np.argmax(deficit))
        code_of_group[g] = k
        filled[k] += counts[g]
    return code_of_group[inverse]


# --------------------------------------------------------------------------------------------------
# the run


def _plan(
    reference_csv: Path | None,
    prediction_csv: Path | None,
    fits_dir: Path,
    settings: PipelineSettings,
) -> tuple[list[_SetPlan], list[Path]]:
    files = iter_fits_files(fits_dir)
    if not files:
        raise SpecabundError(f"{fits_dir}: no FITS files found (*.fits, *.fits.gz, *.fit)")
    plans: list[_SetPlan] = []
    ref_elements = settings.elements
    rules = settings.catalog_rules
    if reference_csv is not None:
        cat = read_catalog(reference_csv, settings.elements, require_labels=True, rules=rules)
        plans.append(_SetPlan("reference", cat, match_catalog(cat, files, fits_dir)))
        ref_elements = cat.elements
    if prediction_csv is not None:
        cat = read_catalog(prediction_csv, ref_elements or None, require_labels=False, rules=rules)
        plans.append(_SetPlan("prediction", cat, match_catalog(cat, files, fits_dir)))
    if not plans:
        raise SpecabundError("give --reference-csv, --prediction-csv or both")
    for p in plans:
        _check_matched(p, fits_dir, len(files))
    for p in plans:
        rv = p.catalog.table["rv"].to_numpy(dtype=float) if "rv" in p.catalog.table else None
        for f, row in zip(p.match.files, p.match.rows.tolist(), strict=True):
            v = None if rv is None or not np.isfinite(rv[row]) else float(rv[row])
            p.tasks.append(_Task(f, v, p.name, row))
        log.info(
            "%s catalogue %s: %d rows, %d matched to FITS files, %d without a file",
            p.name,
            p.catalog.path,
            len(p.catalog.table),
            len(p.match.files),
            len(p.match.unmatched_rows),
        )
    return plans, files


def _check_matched(plan: _SetPlan, fits_dir: Path, n_files: int) -> None:
    """Refuse a catalogue with no rows, or none matching a file, before any work is done."""
    path = plan.catalog.path
    n_rows = len(plan.catalog.table)
    if n_rows == 0:
        raise CatalogError(f"{path}: the {plan.name} catalogue has no rows (no spectrum to preprocess)")
    if not plan.match.files:
        examples = ", ".join(f"{s!r} ({r})" for s, r in plan.match.unmatched_rows[:3])
        raise CatalogError(
            f"{path}: none of the {n_rows} rows of the {plan.name} catalogue matches one of the {n_files} "
            f"FITS files in {fits_dir} (e.g. {examples}); 'spec' must be a file name (with or without "
            ".fits/.fits.gz), a path relative to the FITS folder, or an obsid of a file named <obsid>.fits"
        )


def _chunks(tasks: list[_Task], size: int) -> Iterator[list[_Task]]:
    for i in range(0, len(tasks), size):
        yield tasks[i : i + size]


def run_preprocess(
    *,
    fits_dir: str | Path,
    output_dir: str | Path,
    reference_csv: str | Path | None = None,
    prediction_csv: str | Path | None = None,
    options: PreprocessOptions | None = None,
    settings: PipelineSettings | None = None,
    plots_dir: str | Path | None = None,
    map_fn: MapFn | None = None,
    client: Any = None,
    chunk_task: Callable[..., str] = process_chunk,
) -> dict[str, Any]:
    """Preprocess FITS files into ``*_dataset.npz`` files; return the manifest.

    Parameters
    ----------
    fits_dir : path
        Folder searched recursively for FITS files.
    output_dir : path
        Where datasets, ``rejected.csv``, ``manifest.json``, ``cache/``, ``progress/`` and ``validation/`` go.
    reference_csv, prediction_csv : path, optional
        Label catalogues; at least one. Reference data are split 7:1:2, prediction data only preprocessed.
    options : PreprocessOptions
        Per-spectrum options (default: the defaults).
    settings : PipelineSettings
        Chunking, workers, cache, split and label settings.
    plots_dir : path, optional
        Folder for the preprocessing plots (stages of a few spectra, distributions); none when omitted.
    map_fn : callable, optional
        ``map``-like function used to process the files of a chunk (e.g. a pool's ``map``); by default
        the built-in ``map`` for one worker and joblib for several.
    client : distributed.Client, optional
        Run each unfinished chunk as one Dask task (:func:`process_chunk`) that writes its cache file
        itself; the datasets are then assembled here from the cache as usual (same bytes as without).
    chunk_task : callable
        The task function (tests wrap it to kill a worker).
    """
    opts = options or PreprocessOptions()
    st = settings or PipelineSettings()
    fits_dir, output_dir = Path(fits_dir), Path(output_dir)
    if not fits_dir.is_dir():
        raise SpecabundError(f"{fits_dir}: FITS directory not found")
    plans, all_files = _plan(
        Path(reference_csv) if reference_csv else None,
        Path(prediction_csv) if prediction_csv else None,
        fits_dir,
        st,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    p_hash = preprocess_hash(opts, st.normalize)
    grid = _grid(opts)

    cache_root = output_dir / "cache" / "preprocessing"
    if st.clear_cache and cache_root.exists():
        shutil.rmtree(cache_root)
        log.info("cleared cache %s", cache_root)
    tmp_cache: str | None = None
    if not st.use_cache:
        tmp_cache = tempfile.mkdtemp(prefix=".nocache-", dir=output_dir)
        cache_root = Path(tmp_cache)
    cache_root.mkdir(parents=True, exist_ok=True)

    pool = contextlib.ExitStack()
    if map_fn is None:
        map_fn = pool.enter_context(process_map(st.n_workers, st.batch_size))

    progress_path = output_dir / "progress" / "preprocess.json"
    # each chunk's cache file, keyed by its files (stat + resolve: computed once, ~50 us a file)
    lim = st.catalog_rules.max_abs_rv_kms
    chunk_paths = {
        (plan.name, ci): cache_root / f"{plan.name}_{ci:05d}_{_chunk_key(chunk, p_hash, lim)}.npz"
        for plan in plans
        for ci, chunk in enumerate(_chunks(plan.tasks, st.chunk_size))
    }

    def plots(data: dict[str, dict[str, np.ndarray]] | None) -> None:
        if plots_dir is None:
            return
        try:
            from .report import write_preprocessing_plots

            write_preprocessing_plots(
                output_dir,
                Path(plots_dir),
                opts,
                _files_with_rv(plans),
                st.n_plot_examples,
                st.catalog_rules.max_abs_rv_kms,
                data,
            )
        except Exception:  # plots must never lose a finished run
            log.exception("preprocessing plots failed")

    try:
        if client is not None:
            _cluster_chunks(client, chunk_task, plans, opts, st, chunk_paths, len(grid))
        chunk_files: dict[str, list[Path]] = {}
        new_chunks = 0
        total = sum(len(p.tasks) for p in plans)
        done = 0
        bar = _progress_bar(total, st.progress)
        for plan in plans:
            chunk_files[plan.name] = []
            for ci, chunk in enumerate(_chunks(plan.tasks, st.chunk_size)):
                path = chunk_paths[(plan.name, ci)]
                if path.exists():
                    log.debug("chunk %s %d: cached (%s)", plan.name, ci, path.name)
                else:
                    if client is not None:
                        raise _Interrupted(f"chunk {plan.name} {ci} was not written by the cluster")
                    if st.max_chunks is not None and new_chunks >= st.max_chunks:
                        raise _Interrupted(f"stopped after {new_chunks} new chunks (max_chunks)")
                    args = [(t.path, t.rv_kms, opts, st.normalize, lim) for t in chunk]
                    results = list(map_fn(_process_task, args))
                    _write_chunk(path, results, len(grid))
                    new_chunks += 1
                    log.info("chunk %s %d: %d spectra processed", plan.name, ci, len(chunk))
                chunk_files[plan.name].append(path)
                done += len(chunk)
                bar.update(len(chunk))
                atomic_write_json(
                    progress_path,
                    {"done": done, "total": total, "set": plan.name, "chunk": ci, "preprocess_hash": p_hash},
                )
        bar.close()
        manifest = _assemble(plans, chunk_files, all_files, grid, opts, st, p_hash, output_dir, client, plots)
    finally:
        pool.close()
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    if client is None:
        plots(None)
    return manifest


def _cluster_chunks(
    client: Any,
    chunk_task: Callable[..., str],
    plans: list[_SetPlan],
    opts: PreprocessOptions,
    st: PipelineSettings,
    chunk_paths: dict[tuple[str, int], Path],
    n_pixels: int,
) -> None:
    """Write every missing chunk file of ``plans`` (``chunk_paths[(set, chunk)]``), one Dask task each."""
    lim = st.catalog_rules.max_abs_rv_kms
    todo: list[tuple[list[Any], str, int]] = []
    cached = 0
    for plan in plans:
        for ci, chunk in enumerate(_chunks(plan.tasks, st.chunk_size)):
            path = chunk_paths[(plan.name, ci)]
            if path.exists():
                cached += 1
                continue
            todo.append(([(t.path, t.rv_kms, opts, st.normalize, lim) for t in chunk], str(path), n_pixels))
    if st.max_chunks is not None:
        todo = todo[: st.max_chunks]
    log.info("cluster: %d chunks to process, %d cached", len(todo), cached)
    bar = _progress_bar(sum(len(a[0]) for a in todo), st.progress)

    def done(i: int, path: str) -> None:
        bar.update(len(todo[i][0]))
        log.info("chunk %s: %d spectra processed on the cluster", Path(path).stem, len(todo[i][0]))

    from ..distributed import run_tasks

    run_tasks(client, chunk_task, todo, [f"preprocess-{Path(a[1]).stem}" for a in todo], done)
    bar.close()


def _files_with_rv(plans: list[_SetPlan]) -> Iterator[tuple[Path, float | None]]:
    """Each file of the plans with its catalogue radial velocity (None where absent or not finite)."""
    for plan in plans:
        rv = plan.catalog.table["rv"].to_numpy(dtype=float) if "rv" in plan.catalog.table else None
        for task in plan.tasks:
            yield task.path, None if rv is None or not np.isfinite(rv[task.row]) else float(rv[task.row])


class _Interrupted(SpecabundError):
    """Raised by ``max_chunks`` to simulate an interrupted run (tests)."""


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="spec", desc="preprocess", disable=not enabled)


def _grid(opts: PreprocessOptions) -> np.ndarray:
    from .steps import log_linear_grid

    return log_linear_grid(opts.wave_min, opts.wave_max, opts.log_step)


def _input_hash(plans: list[_SetPlan]) -> str:
    parts = []
    for p in plans:
        parts.append(p.catalog.path.read_bytes())
        parts.append(repr([(f.name, _file_signature(f)[1]) for f in p.match.files]).encode())
    return hash_bytes(*parts)[:16]


def _assemble(
    plans: list[_SetPlan],
    chunk_files: dict[str, list[Path]],
    all_files: list[Path],
    grid: np.ndarray,
    opts: PreprocessOptions,
    st: PipelineSettings,
    p_hash: str,
    output_dir: Path,
    client: Any = None,
    plots: Callable[[dict[str, dict[str, np.ndarray]]], None] | None = None,
) -> dict[str, Any]:
    """Write the datasets, ``rejected.csv``, ``manifest.json`` and the validation report; return the manifest.

    With a Dask ``client`` the datasets and the validation report are written by the workers, one task
    each, while this process draws the preprocessing plots (``plots(data)``, given the per-spectrum arrays
    of each set that the plots would read from its dataset); the files are the same bytes as when all is
    written here, one after the other.
    """
    rejected: list[dict[str, str]] = []
    #: arguments of each _write_dataset call, in order
    writes: list[
        tuple[Path, list[Path], np.ndarray, np.ndarray, dict[str, np.ndarray], list[str], np.ndarray, int]
    ]
    writes = []
    report_data: dict[str, dict[str, np.ndarray]] = {}  # what the report would read back from each dataset
    counts: dict[str, Any] = {}
    masking: dict[str, Any] = {}
    label_columns: dict[str, Any] = {}
    label_names: list[str] | None = None
    formats: dict[str, str] = {}
    ref_plan = next((p for p in plans if p.name == "reference"), None)
    if ref_plan is not None:
        label_names = _label_names(ref_plan.catalog, st)
    for plan in plans:
        masking[plan.name] = plan.catalog.masked
        label_columns[plan.name] = plan.catalog.columns
        names = label_names if label_names is not None else _label_names(plan.catalog, st)
        metas = [_read_chunk_meta(f) for f in chunk_files[plan.name]]
        meta = {k: np.concatenate([m[k] for m in metas]) for k in metas[0]} if metas else {}
        n = len(plan.tasks)
        status = meta.get("status", np.array([], dtype=str))
        table = plan.catalog.table
        rows = plan.match.rows
        y = plan.catalog.labels(names)[rows]
        y_err = plan.catalog.label_errors(names)[rows]
        keep = status == "ok"
        if plan.name == "reference":
            primary = [i for i, nm in enumerate(names) if nm in plan.catalog.elements]
            no_labels = keep & ~np.isfinite(y[:, primary]).any(axis=1) if primary else np.zeros(n, bool)
            status = np.where(no_labels, "no_labels", status)
            keep = status == "ok"
        for t, s in zip(plan.tasks, status.tolist(), strict=True):
            if s != "ok":
                rejected.append(
                    {"set": plan.name, "file": str(t.path), "spec": table["spec"][t.row], "reason": s}
                )
        for spec, reason in plan.match.unmatched_rows:
            rejected.append({"set": plan.name, "file": "", "spec": spec, "reason": reason})
        idx = np.flatnonzero(keep)
        groups = _groups(plan, meta, rows)
        split = (
            split_groups(groups[idx], st.split_fractions, st.seed)
            if plan.name == "reference"
            else np.full(len(idx), SPLIT_CODES["none"], dtype=np.int8)
        )
        cols = _columns(plan, meta, rows, y, y_err, groups, p_hash)
        ext = suffix(choose_format(st.format, len(idx), len(grid)))
        formats[plan.name] = ext[1:]
        files = chunk_files[plan.name]
        if plan.name == "reference":
            writes.append(
                (output_dir / f"reference_dataset{ext}", files, idx, split, cols, names, grid, st.chunk_size)
            )
            for name, code in (("train", 0), ("val", 1), ("test", 2)):
                sel = split == code
                writes.append(
                    (
                        output_dir / f"{name}_dataset{ext}",
                        files,
                        idx[sel],
                        split[sel],
                        cols,
                        names,
                        grid,
                        st.chunk_size,
                    )
                )
                counts[f"n_{name}"] = int(sel.sum())
        else:
            writes.append(
                (output_dir / f"prediction_dataset{ext}", files, idx, split, cols, names, grid, st.chunk_size)
            )
        report_data[plan.name] = {
            "y": cols["y"][idx],
            "y_err": cols["y_err"][idx],
            "elements": np.asarray(names, dtype=str),
            "snr": cols["snr"][idx],
            "extra_n_raw_pixels": cols["extra_n_raw_pixels"][idx],
        }
        counts[plan.name] = {
            "catalogue_rows": len(table),
            "matched_files": n,
            "kept": len(idx),
            "rejected": int(n - len(idx)),
            "rows_without_file": len(plan.match.unmatched_rows),
        }
    matched = {f for p in plans for f in p.match.files}
    for f in all_files:
        if f not in matched:
            why = unreadable_reason(f)
            reason = "no label match" if why is None else f"unreadable: {why}"
            rejected.append({"set": "", "file": str(f), "spec": spec_key(f.name), "reason": reason})
    rej = pd.DataFrame(rejected, columns=["set", "file", "spec", "reason"])
    by_reason = Counter(r.split(":")[0] for r in rej["reason"].tolist())
    manifest = {
        "package_version": __version__,
        "pipeline_version": PIPELINE_VERSION,
        "preprocess_hash": p_hash,
        "input_hash": _input_hash(plans),
        "labels": label_names or [],
        "grid": {"wave_min": float(grid[0]), "wave_max": float(grid[-1]), "n_pixels": len(grid)},
        "counts": counts,
        "rejected_total": len(rej),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "label_masking": masking,
        "label_columns": label_columns,
        "dataset_format": formats,
        "options": opts.to_dict(),
        "settings": {
            "chunk_size": st.chunk_size,
            "normalize": st.normalize,
            "seed": st.seed,
            "split_fractions": list(st.split_fractions),
            "elements": st.elements or [],
            "catalog_rules": st.catalog_rules.to_dict(),
        },
    }
    if client is None:
        for w in writes:
            _write_dataset(*w)
        _write_rejected(output_dir, rej)
        atomic_write_json(output_dir / "manifest.json", manifest)
        _validation_report(output_dir, manifest, report_data)
        return manifest
    import uuid

    token = uuid.uuid4().hex[:12]  # a rerun in the same session must not find the released tasks
    _write_rejected(output_dir, rej)  # before the plots, which read it
    futures = [
        client.submit(_write_dataset, *w, key=f"preprocess-write-{w[0].name}-{token}", pure=False)
        for w in writes
    ]
    futures.append(
        client.submit(
            _validation_report,
            output_dir,
            manifest,
            report_data,
            key=f"preprocess-report-{token}",
            pure=False,
        )
    )
    try:
        if plots is not None:
            plots(report_data)
        from distributed import wait

        wait(futures)
        for w, f in zip(writes, futures, strict=False):
            f.result()  # raises the task's exception
            log.info("wrote %s (%d spectra) on the cluster", w[0], len(w[2]))
        failed = futures[-1].result()
        if failed:
            log.error("validation report failed (on the cluster):\n%s", failed)
    finally:
        for f in futures:
            f.release()
    atomic_write_json(output_dir / "manifest.json", manifest)
    return manifest


def _write_rejected(output_dir: Path, rej: pd.DataFrame) -> None:
    with atomic_write(output_dir / "rejected.csv", "w", encoding="utf-8", newline="") as fh:
        rej.to_csv(fh, index=False)


def _validation_report(
    output_dir: Path, manifest: dict[str, Any], data: dict[str, dict[str, np.ndarray]]
) -> str | None:
    """Write the validation report; a failure is logged and returned as its traceback (None: written)."""
    try:
        from .report import write_validation_report

        write_validation_report(output_dir, manifest, data)
    except Exception:
        log.exception("validation report failed")
        import traceback

        return traceback.format_exc()
    return None


def _label_names(cat: Catalog, st: PipelineSettings) -> list[str]:
    names = list(cat.elements)
    if st.include_stellar_parameters:
        names += [p for p in cat.label_names if p not in names]
    return names


def _groups(plan: _SetPlan, meta: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    table = plan.catalog.table
    keys = np.array([spec_key(s) for s in table["spec"].to_numpy()[rows]], dtype=str)
    if "group" in table:
        g = table["group"].to_numpy(dtype=str)[rows]
        return np.where(np.isin(g, ["", "nan", "None"]), keys, g)
    desig = meta.get("designation", np.array([], dtype=str))
    if len(desig) == len(keys):
        return np.where(desig != "", desig, keys)
    return keys


def _columns(
    plan: _SetPlan,
    meta: dict[str, np.ndarray],
    rows: np.ndarray,
    y: np.ndarray,
    y_err: np.ndarray,
    groups: np.ndarray,
    p_hash: str,
) -> dict[str, np.ndarray]:
    table = plan.catalog.table
    snr_csv = table["snr"].to_numpy(dtype=float)[rows] if "snr" in table else np.full(len(rows), np.nan)
    snr = np.where(np.isfinite(meta["snr_header"]), meta["snr_header"], meta["snr_measured"])
    snr = np.where(np.isfinite(snr), snr, snr_csv)
    return {
        "y": y.astype(np.float32),
        "y_err": y_err.astype(np.float32),
        "filenames": np.array([t.path.name for t in plan.tasks], dtype=str),
        "obsid": meta["obsid"],
        "spec": table["spec"].to_numpy(dtype=str)[rows],
        "teff": table["teff"].to_numpy(dtype=float)[rows].astype(np.float32),
        "logg": table["logg"].to_numpy(dtype=float)[rows].astype(np.float32),
        "fe_h": table["fe_h"].to_numpy(dtype=float)[rows].astype(np.float32),
        "snr": finite_float32(snr),
        "group": groups,
        "extra_snr_measured": meta["snr_measured"].astype(np.float32),
        "extra_good_fraction": meta["good_fraction"].astype(np.float32),
        "extra_rv_used_kms": meta["rv_used_kms"].astype(np.float32),
        "extra_rv_source": meta["rv_source"],
        "extra_n_raw_pixels": meta["n_raw"].astype(np.int32),
        "preprocess_hash": np.asarray(p_hash),
    }


def _write_dataset(
    path: Path,
    chunk_files: list[Path],
    idx: np.ndarray,
    split: np.ndarray,
    cols: dict[str, np.ndarray],
    names: list[str],
    grid: np.ndarray,
    chunk_rows: int = 1000,
) -> None:
    """Stream the selected rows of the chunk files into one npz or Zarr store (memory bounded by one
    chunk; the format follows the suffix of ``path``)."""
    n = len(idx)
    bounds = []
    start = 0
    for f in chunk_files:
        with np.load(f, allow_pickle=False) as z:
            m = len(z["status"])
        bounds.append((start, start + m))
        start += m

    def rows_of(key: str) -> Iterator[np.ndarray]:
        for f, (lo, hi) in zip(chunk_files, bounds, strict=True):
            sel = idx[(idx >= lo) & (idx < hi)] - lo
            if len(sel):
                with np.load(f, allow_pickle=False) as z:
                    yield z[key][sel]

    arrays: dict[str, Any] = {
        "wavelength": grid.astype(np.float64),
        "elements": np.asarray(names, dtype=str),
        "split": split.astype(np.int8),
    }
    for key, arr in cols.items():
        arrays[key] = arr if arr.ndim == 0 else arr[idx]
    write_store(
        path,
        n_rows=n,
        n_pixels=len(grid),
        blocks=lambda key: rows_of("flux" if key == "X" else "ivar"),
        arrays=arrays,
        chunk_rows=chunk_rows,
    )
    log.info("wrote %s (%d spectra)", path, n)
