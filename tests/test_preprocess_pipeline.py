"""The dataset pipeline of ``specabund preprocess``: outputs, resume, cache keys, parallelism, bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from specabund.dataset import load_dataset
from specabund.preprocess import PipelineSettings, PreprocessOptions, run_preprocess, split_groups
from specabund.preprocess.pipeline import _Interrupted
from specabund.simulate import simulate_dataset
from specabund.utils import hash_file

OUTPUTS = ("train", "val", "test", "reference", "prediction")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    simulate_dataset(90, out, seed=7, layout="mixed")
    return out


def _run(sim: Path, out: Path, **kw: object) -> dict:
    settings = PipelineSettings(chunk_size=kw.pop("chunk_size", 20), **kw)  # type: ignore[arg-type]
    return run_preprocess(
        fits_dir=sim / "fits",
        output_dir=out,
        reference_csv=sim / "X_FE.csv",
        prediction_csv=sim / "galah_X_FE.csv",
        settings=settings,
    )


def _hashes(out: Path) -> dict[str, str]:
    return {n: hash_file(out / f"{n}_dataset.npz") for n in OUTPUTS} | {
        "rejected": hash_file(out / "rejected.csv"),
        "manifest": hash_file(out / "manifest.json"),
    }


@pytest.fixture(scope="module")
def straight(sim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    _run(sim, out)
    return out


def test_outputs_and_contents(sim: Path, straight: Path) -> None:
    manifest = json.loads((straight / "manifest.json").read_text())
    truth = pd.read_csv(sim / "truth.csv")
    ref = load_dataset(straight / "reference_dataset.npz")
    for name in OUTPUTS:
        with np.load(straight / f"{name}_dataset.npz", allow_pickle=False) as z:
            for key in (
                "X",
                "y",
                "elements",
                "filenames",
                "ivar",
                "wavelength",
                "obsid",
                "teff",
                "logg",
                "snr",
            ):
                assert key in z.files, (name, key)
    assert ref.X.dtype == np.float32 and np.isfinite(ref.X).all()
    assert np.all(np.diff(ref.wavelength) > 0)
    assert ref.wavelength[0] == pytest.approx(3900, abs=1) and ref.wavelength[-1] == pytest.approx(
        8900, abs=2
    )
    # labels carried from the catalogue, matched by file name
    t = truth.set_index("spec")
    j = ref.label_index("MG_FE")
    np.testing.assert_allclose(ref.y[:, j], t.loc[ref.spec, "MG_FE"].to_numpy(), atol=1e-5)
    assert "TEFF" in ref.elements and "LOGG" in ref.elements
    # splits: 7:1:2 within rounding by star, stars kept together, and the split files are the reference rows
    n_split = [len(load_dataset(straight / f"{s}_dataset.npz")) for s in ("train", "val", "test")]
    assert sum(n_split) == len(ref)
    assert abs(n_split[0] / len(ref) - 0.7) < 0.1 and abs(n_split[2] / len(ref) - 0.2) < 0.1
    for g in np.unique(ref.group):
        assert len(np.unique(ref.split[ref.group == g])) == 1
    # nothing silently dropped: every matched file is kept or listed in rejected.csv
    rej = pd.read_csv(straight / "rejected.csv")
    c = manifest["counts"]["reference"]
    assert c["kept"] + len(rej[(rej["set"] == "reference") & rej["file"].notna()]) == c["matched_files"]
    pred = load_dataset(straight / "prediction_dataset.npz")
    assert (pred.split == -1).all()
    assert set(pred.spec).isdisjoint(set(ref.spec))
    assert manifest["preprocess_hash"] == ref.preprocess_hash == pred.preprocess_hash
    # validation report and no stray temporary files
    assert (straight / "validation" / "validation_report.txt").exists()
    assert (straight / "validation" / "plots" / "reference_label_correlations.png").exists()
    assert not list(straight.rglob("*.tmp"))


def test_resume_after_interruption_is_byte_identical(sim: Path, straight: Path, tmp_path: Path) -> None:
    with pytest.raises(_Interrupted):
        _run(sim, tmp_path, max_chunks=2)
    assert len(list((tmp_path / "cache" / "preprocessing").glob("*.npz"))) == 2
    _run(sim, tmp_path)
    assert _hashes(tmp_path) == _hashes(straight)


def test_workers_and_no_cache_give_identical_outputs(sim: Path, straight: Path, tmp_path: Path) -> None:
    _run(sim, tmp_path, n_workers=2, use_cache=False)
    assert _hashes(tmp_path) == _hashes(straight)
    assert not (tmp_path / "cache" / "preprocessing").exists() or not list(
        (tmp_path / "cache" / "preprocessing").glob("*.npz")
    )
    assert not list(tmp_path.glob(".nocache-*"))


def test_changed_config_never_reuses_cache(sim: Path, tmp_path: Path) -> None:
    _run(sim, tmp_path)
    cache = tmp_path / "cache" / "preprocessing"
    first = {p.name for p in cache.glob("*.npz")}
    m2 = run_preprocess(
        fits_dir=sim / "fits",
        output_dir=tmp_path,
        reference_csv=sim / "X_FE.csv",
        prediction_csv=sim / "galah_X_FE.csv",
        options=PreprocessOptions(clip_sigma=6.0),
        settings=PipelineSettings(chunk_size=20),
    )
    second = {p.name for p in cache.glob("*.npz")}
    assert first.isdisjoint(second - first) and len(second) == 2 * len(first)
    assert load_dataset(tmp_path / "reference_dataset.npz").preprocess_hash == m2["preprocess_hash"]
    _run(sim, tmp_path, clear_cache=True)
    assert {p.name for p in cache.glob("*.npz")} == first


def test_corrupt_and_unlabelled_files_are_logged_and_skipped(sim: Path, tmp_path: Path) -> None:
    fits = tmp_path / "fits"
    fits.mkdir()
    names = sorted(p.name for p in (sim / "fits").iterdir())[:12]
    for n in names:
        (fits / n).write_bytes((sim / "fits" / n).read_bytes())
    (fits / names[0]).write_bytes((sim / "fits" / names[0]).read_bytes()[:5000])  # truncated
    (fits / "stray.fits").write_bytes(b"not a fits file at all")
    cat = pd.read_csv(sim / "truth.csv").set_index("spec").loc[names].reset_index()
    cat.to_csv(tmp_path / "X_FE.csv", index=False)
    out = tmp_path / "out"
    m = run_preprocess(fits_dir=fits, output_dir=out, reference_csv=tmp_path / "X_FE.csv")
    rej = pd.read_csv(out / "rejected.csv", dtype={"spec": str}).set_index("spec")
    assert rej.loc[names[0], "reason"].startswith("unreadable:")
    assert rej.loc["stray", "reason"] == "no label match"
    assert m["counts"]["reference"]["kept"] == len(load_dataset(out / "reference_dataset.npz"))
    assert m["rejected_by_reason"]["unreadable"] == 1


def test_kill_9_resumes_to_identical_outputs(sim: Path, straight: Path, tmp_path: Path) -> None:
    """A real SIGKILL mid-run, then a rerun of the same command."""
    cmd = [
        sys.executable,
        "-m",
        "specabund.cli",
        "--workdir",
        str(tmp_path),
        "preprocess",
        "--reference-csv",
        str(sim / "X_FE.csv"),
        "--prediction-csv",
        str(sim / "galah_X_FE.csv"),
        "--fits-dir",
        str(sim / "fits"),
        "--output-dir",
        "out",
        "--chunk-size",
        "20",
    ]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "out" / "progress" / "preprocess.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["done"] >= 20:
            break
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _hashes(tmp_path / "out") == _hashes(straight)
    assert killed, "the run finished before it could be killed; the resume path was not exercised"


def test_split_groups_deterministic_and_grouped() -> None:
    groups = np.array([f"s{i // 2}" for i in range(1000)])
    a = split_groups(groups, (0.7, 0.1, 0.2), seed=1)
    b = split_groups(groups, (0.7, 0.1, 0.2), seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, split_groups(groups, (0.7, 0.1, 0.2), seed=2))
    np.testing.assert_allclose(np.bincount(a) / len(a), [0.7, 0.1, 0.2], atol=0.01)
    for g in np.unique(groups):
        assert len(set(a[groups == g])) == 1


def test_real_lamost_files_preprocess(lamost_dir: Path, tmp_path: Path) -> None:
    """Every real low-resolution file is kept or rejected with a reason; kept spectra have median flux ~1."""
    files = sorted(
        p
        for p in lamost_dir.rglob("*")
        if p.name.endswith((".fits", ".fits.gz")) and not p.name.startswith("med-")
    )
    fits = tmp_path / "fits"
    fits.mkdir()
    for p in files:
        (fits / p.name).symlink_to(p)
    pd.DataFrame({"spec": [p.name for p in files]}).to_csv(tmp_path / "pred.csv", index=False)
    m = run_preprocess(fits_dir=fits, output_dir=tmp_path / "out", prediction_csv=tmp_path / "pred.csv")
    ds = load_dataset(tmp_path / "out" / "prediction_dataset.npz")
    rej = pd.read_csv(tmp_path / "out" / "rejected.csv")
    assert len(ds) + len(rej) == len(files)
    assert not rej["reason"].str.startswith(("error", "unreadable")).any(), rej
    assert len(ds) >= 0.9 * len(files), rej
    med = np.array([np.median(x[iv > 0]) for x, iv in zip(ds.X, ds.ivar, strict=True)])
    # the continuum passes through the upper envelope of the noise: a median over line-free and line pixels
    # of a normalised FGK spectrum lies at 0.95-1.0 (lines pull it down by a few per cent)
    assert np.all(np.abs(med - 0.985) < 0.04), med
    assert m["counts"]["prediction"]["matched_files"] == len(files)


# ------------------------------------------------------------------------ catalogue values, y_err, bad paths


def test_y_err_and_masking_in_every_output(straight: Path) -> None:
    manifest = json.loads((straight / "manifest.json").read_text())
    for name in OUTPUTS:
        with np.load(straight / f"{name}_dataset.npz", allow_pickle=False) as z:
            assert z["y_err"].shape == z["y"].shape and z["y_err"].dtype == np.float32, name
            assert np.isnan(z["y_err"]).all()  # the simulated catalogues carry no error columns
    assert set(manifest["label_masking"]) == {"reference", "prediction"}
    assert manifest["label_masking"]["reference"]["MG_FE"] == {
        "non_numeric": 0,
        "sentinel": 0,
        "implausible": 0,
        "flag": 0,
    }
    assert manifest["settings"]["catalog_rules"]["flag_policy"] == "mask"
    assert "Catalogue values masked" in (straight / "validation" / "validation_report.txt").read_text()


def _copy_fits(sim: Path, dest: Path, n: int) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (sim / "fits").iterdir() if p.name.endswith(".fits"))[:n]
    for name in names:
        (dest / name).write_bytes((sim / "fits" / name).read_bytes())
    return names


def test_symlink_loops_are_rejected_rows(sim: Path, tmp_path: Path) -> None:
    fits = tmp_path / "fits"
    names = _copy_fits(sim, fits, 3)
    (fits / "loop_a.fits").symlink_to("loop_b.fits")
    (fits / "loop_b.fits").symlink_to("loop_a.fits")
    (fits / "sub").mkdir()
    (fits / "sub" / "self.fits").symlink_to("self.fits")
    (fits / "dangling.fits").symlink_to("nowhere.fits")
    cat = pd.read_csv(sim / "truth.csv").set_index("spec").loc[names].reset_index()[["spec", "MG_FE"]]
    cat = pd.concat([cat, pd.DataFrame({"spec": ["sub/self.fits"], "MG_FE": [0.1]})], ignore_index=True)
    cat.to_csv(tmp_path / "X_FE.csv", index=False)
    out = tmp_path / "out"
    m = run_preprocess(fits_dir=fits, output_dir=out, reference_csv=tmp_path / "X_FE.csv")
    rej = pd.read_csv(out / "rejected.csv", dtype={"spec": str}).set_index("spec")
    for key in ("loop_a", "loop_b", "sub/self.fits", "dangling"):
        assert rej.loc[key, "reason"].startswith("unreadable"), rej
    assert rej.loc["sub/self.fits", "set"] == "reference"  # named by a row: an unreadable spectrum of the set
    assert "symbolic links" in rej.loc["loop_a", "reason"]
    assert m["counts"]["reference"]["kept"] == len(load_dataset(out / "reference_dataset.npz")) == 3


def test_empty_or_unmatched_catalogue_is_a_clear_error(sim: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from specabund.cli import main
    from specabund.errors import CatalogError

    (tmp_path / "empty.csv").write_text("spec,MG_FE\n")
    (tmp_path / "nomatch.csv").write_text("spec,MG_FE\nnot-a-file.fits,0.1\nalso-missing,0.2\n")
    out = tmp_path / "out"
    with pytest.raises(CatalogError, match=r"empty.csv: the reference catalogue has no rows"):
        run_preprocess(fits_dir=sim / "fits", output_dir=out, reference_csv=tmp_path / "empty.csv")
    with pytest.raises(CatalogError, match=r"nomatch.csv: none of the 2 rows .* matches one of the 90"):
        run_preprocess(fits_dir=sim / "fits", output_dir=out, prediction_csv=tmp_path / "nomatch.csv")
    assert not out.exists()
    args = ["--workdir", str(tmp_path), "preprocess", "--fits-dir", str(sim / "fits"), "--output-dir", "o"]
    r = CliRunner().invoke(main, [*args, "--reference-csv", str(tmp_path / "empty.csv")])
    assert r.exit_code == 1 and "has no rows" in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if "Error" in ln]) == 1
    assert not (tmp_path / "o" / "cache").exists()


def test_implausible_values_are_masked_or_rejected(sim: Path, tmp_path: Path) -> None:
    from astropy.io import fits as afits

    fits = tmp_path / "fits"
    names = _copy_fits(sim, fits, 5)
    afits.setval(fits / names[2], "Z", value=-1.0)  # z = -1: no usable header velocity
    afits.setval(fits / names[3], "Z", value=-1.0)
    afits.setval(fits / names[4], "Z", value="NaN")
    truth = pd.read_csv(sim / "truth.csv").set_index("spec").loc[names].reset_index()
    cat = truth[["spec", "teff", "logg", "fe_h", "MG_FE", "CA_FE"]].copy()
    cat["MG_FE_ERR"] = [0.05, -0.01, 0.05, 0.05, 0.05]
    cat["rv"] = [9999.0, np.nan, np.nan, truth["rv"][3], np.nan]
    cat.loc[1, ["teff", "MG_FE"]] = [-9999.0, -999.0]
    cat.to_csv(tmp_path / "X_FE.csv", index=False)
    out = tmp_path / "out"
    m = run_preprocess(fits_dir=fits, output_dir=out, reference_csv=tmp_path / "X_FE.csv")
    rej = pd.read_csv(out / "rejected.csv", dtype={"spec": str}).set_index("spec")
    assert rej.loc[names[2], "reason"].startswith("no_valid_rv: no catalogue rv and header Z = -1")
    assert rej.loc[names[4], "reason"].startswith("no_valid_rv: no catalogue rv and header Z is missing")
    ds = load_dataset(out / "reference_dataset.npz")
    by_spec = {s: i for i, s in enumerate(ds.spec)}
    src = ds.extra["rv_source"]
    assert src[by_spec[names[0]]] == "header_z"  # rv = 9999 km/s ignored, header Z used
    assert src[by_spec[names[3]]] == "csv_rv"  # header Z = -1 does not matter with a catalogue rv
    i1, j = by_spec[names[1]], ds.label_index("MG_FE")
    assert np.isnan(ds.teff[i1]) and np.isnan(ds.y[i1, ds.label_index("TEFF")]) and np.isnan(ds.y[i1, j])
    assert ds.y_err[by_spec[names[0]], j] == pytest.approx(0.05) and np.isnan(ds.y_err[i1, j])
    masking = m["label_masking"]["reference"]
    assert masking["rv"]["implausible"] == 1 and masking["TEFF"]["sentinel"] == 1
    assert masking["MG_FE"]["sentinel"] == 1 and masking["MG_FE_err"]["implausible"] == 1
    assert m["label_columns"]["reference"]["MG_FE"] == {"value": "MG_FE", "error": "MG_FE_ERR"}
    assert m["rejected_by_reason"] == {"no_valid_rv": 2}


def test_lasp_catalogue_without_abundances_via_cli(lamost_dir: Path, tmp_path: Path) -> None:
    """The real DR10 LASP sample (teff, logg, fe_h only) preprocesses into a Teff/logg/[Fe/H] dataset."""
    from click.testing import CliRunner

    from specabund.cli import main

    src = lamost_dir / "dr10-lasp"
    labels = pd.read_csv(src / "lasp_labels.csv").iloc[:24]
    fits = tmp_path / "fits"
    fits.mkdir()
    for name in labels["spec"]:
        (fits / name).symlink_to(src / "fits" / name)
    labels.to_csv(tmp_path / "lasp_labels.csv", index=False)
    args = ["--workdir", str(tmp_path), "preprocess", "--reference-csv", str(tmp_path / "lasp_labels.csv")]
    r = CliRunner().invoke(main, [*args, "--fits-dir", "fits", "--output-dir", "out", "--no-plots"])
    assert r.exit_code == 0, r.output
    ds = load_dataset(tmp_path / "out" / "reference_dataset.npz")
    assert ds.elements == ["TEFF", "LOGG", "FE_H"] and len(ds) >= 20
    np.testing.assert_allclose(ds.y[:, 0], ds.teff)
    assert np.isnan(ds.y_err).all()
