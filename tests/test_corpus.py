"""The bad-input corpus (tests/corpus.py) through the command line: every case gets a clear outcome.

Outcomes (see ``corpus.py``): exit 0 with the input rejected/flagged (or legitimately kept), or exit 1 with
one ``Error: ...`` line (exit 2 for click's own option checks). No traceback reaches the terminal.

Cheap by construction: one small simulated workdir and two tiny models per session (``corpus_base``),
commands run in-process (CliRunner), figures are not rendered (``Figure.savefig`` is stubbed), and the
FITS cases share one ``preprocess`` and one ``predict --fits-dir`` run over the whole FITS corpus.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

import corpus
from corpus import (
    ERROR,
    FLAGGED,
    KEPT,
    OK,
    PREDICT_FAST,
    REJECT,
    TRAIN_FAST,
    USAGE,
    Base,
    Case,
    cli,
)
from specabund.cli import main

#: case id (and command) -> the outcome seen; written as JSON to $SPECABUND_CORPUS_REPORT when set
ACTUAL: dict[str, str] = {}

TRACEBACK_MARKERS = ("Traceback (most recent call last)", "Exception ignored", "--- Logging error ---")


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", corpus._stub_savefig)


def no_traceback(r: Result) -> None:
    out = r.output
    for marker in TRACEBACK_MARKERS:
        assert marker not in out, out[-3000:]
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"exception escaped the command line: {r.exception!r}\n{out[-3000:]}")


def error_lines(r: Result) -> list[str]:
    return [ln for ln in r.output.splitlines() if ln.startswith("Error:")]


def outcome_of(r: Result) -> str:
    """'ok' (exit 0), 'error' (exit 1 with one Error line) or 'usage' (exit 2); anything else fails."""
    no_traceback(r)
    if r.exit_code == 0:
        return OK
    lines = error_lines(r)
    assert len(lines) == 1, f"exit {r.exit_code} needs exactly one 'Error:' line:\n{r.output[-3000:]}"
    assert "unexpected" not in lines[0], f"an unexpected error is a bug, not a clear message: {lines[0]}"
    if r.exit_code == 2:
        return USAGE
    assert r.exit_code == 1, r.output[-3000:]
    return ERROR


def check(r: Result, case: Case, allowed: tuple[str, ...] | None = None) -> str:
    """Assert the command's outcome is one the case allows, with the message matching."""
    got = outcome_of(r)
    want = allowed or case.outcomes
    # rejected/kept/flagged cases need exit 0 first; the caller checks the listing
    exit_ok = {REJECT, KEPT, OK, FLAGGED}
    ok_allowed = any(w in exit_ok for w in want)
    if got == OK:
        assert ok_allowed, f"{case.id}: expected {want}, the command succeeded:\n{r.output[-2000:]}"
    else:
        assert got in want, f"{case.id}: expected {want}, got {got}:\n{r.output[-2000:]}"
        if case.match:
            assert re.search(case.match, error_lines(r)[0], re.IGNORECASE), error_lines(r)[0]
    return got


# ----------------------------------------------------------------------------------------------- base


def _sources(base: Base, lamost: Path | None) -> corpus.FitsSources:
    from astropy.io import fits

    table = image = None
    for f in sorted(base.fits.iterdir()):
        with fits.open(f) as h:
            if len(h) > 1 and table is None:
                table = f
            elif len(h) == 1 and image is None:
                image = f
    assert table is not None and image is not None
    src = corpus.FitsSources(table=table, image=image)
    if lamost is not None:
        src.mrs = next((lamost / "misc").glob("med-*"), None)
        src.real_table = sorted((lamost / "dr10-table").glob("*.fits"))[0]
        src.real_gz = sorted((lamost / "dr8-repeats").glob("*.fits.gz"))[0]
        src.real_dr1 = sorted((lamost / "dr1-subcontinuum").glob("*.fits"))[0]
    return src


@pytest.fixture(scope="session")
def corpus_base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return corpus.shared_base(tmp_path_factory)


@pytest.fixture(scope="module", autouse=True)
def _outcome_report() -> Iterator[None]:
    """With SPECABUND_CORPUS_REPORT=FILE, write the corpus size and the outcomes seen (JSON)."""
    yield
    import json
    import os
    from collections import Counter

    target = os.environ.get("SPECABUND_CORPUS_REPORT")
    if target:
        by_group = {g: len(ids) for g, ids in corpus.all_case_ids().items()}
        counts = Counter(v for v in ACTUAL.values())
        Path(target).write_text(
            json.dumps({"cases": by_group, "runs": len(ACTUAL), "outcomes": counts, "seen": ACTUAL}, indent=1)
        )


def test_corpus_size() -> None:
    ids = corpus.all_case_ids()
    assert sum(len(ids[g]) for g in ("fits", "catalogue", "config", "model")) >= 100
    for group in ids.values():
        assert len(group) == len(set(group))


# ----------------------------------------------------------------------------------------- FITS cases


@dataclass
class FitsRuns:
    names: dict[str, str]
    pre: Result
    rejected: pd.DataFrame
    kept: set[str]
    pred: Result
    predictions: pd.DataFrame
    out: Path


@pytest.fixture(scope="session")
def fits_runs(corpus_base: Base, tmp_path_factory: pytest.TempPathFactory) -> FitsRuns:
    """One ``preprocess`` and one ``predict --fits-dir`` over every FITS case (plus a few good files)."""
    from conftest import LAMOST_DIR

    lamost = LAMOST_DIR if LAMOST_DIR.is_dir() else None
    work = tmp_path_factory.mktemp("fits_corpus")
    folder = work / "fits"
    src = _sources(corpus_base, lamost)
    built = corpus.build_fits_cases(src, folder)
    good = pd.read_csv(corpus_base.reference_csv)
    good = good[good["spec"].map(lambda s: (corpus_base.fits / s).exists())].head(8)
    for s in good["spec"]:
        shutil.copy(corpus_base.fits / s, folder / s)
    template = good.iloc[0].copy()
    rows = [good]
    names = {}
    for cid, path in built.items():
        row = template.copy()
        row["spec"] = path.name
        row["rv"] = np.nan  # the header redshift is used
        rows.append(row.to_frame().T)
        names[cid] = path.name
    cat = pd.concat(rows, ignore_index=True)
    cat.to_csv(work / "corpus.csv", index=False)
    pre = cli(work, "preprocess", "--reference-csv", "corpus.csv", "--fits-dir", "fits", "--no-plots")
    rejected = (
        pd.read_csv(work / "processed_data" / "rejected.csv", keep_default_na=False)
        if pre.exit_code == 0
        else pd.DataFrame(columns=["set", "file", "spec", "reason"])
    )
    kept: set[str] = set()
    if pre.exit_code == 0:
        with np.load(work / "processed_data" / "reference_dataset.npz", allow_pickle=False) as z:
            kept = set(z["filenames"].tolist())
    shutil.copytree(corpus_base.root / "models", work / "models")
    pred = cli(
        work, "predict", "--fits-dir", "fits", "--model", "tiny", "--output-dir", "pred", *PREDICT_FAST
    )
    predictions = (
        pd.read_csv(work / "pred" / "predictions.csv", keep_default_na=False)
        if pred.exit_code == 0
        else pd.DataFrame()
    )
    return FitsRuns(names, pre, rejected, kept, pred, predictions, work / "pred")


def _fits_params() -> list[Any]:
    return [pytest.param(c, id=c.id) for c in corpus.FITS_CASES]


def test_fits_corpus_runs_are_clean(fits_runs: FitsRuns) -> None:
    for r in (fits_runs.pre, fits_runs.pred):
        no_traceback(r)
        assert r.exit_code == 0, r.output[-3000:]


def _needs(case: Case, request: pytest.FixtureRequest) -> None:
    if case.needs_shared:
        request.getfixturevalue("lamost_dir")


@pytest.mark.parametrize("case", _fits_params())
def test_fits_case_preprocess(case: Case, fits_runs: FitsRuns, request: pytest.FixtureRequest) -> None:
    _needs(case, request)
    assert fits_runs.pre.exit_code == 0, fits_runs.pre.output[-3000:]
    name = fits_runs.names[case.id]
    rej = fits_runs.rejected
    rows = rej[
        rej["file"].map(lambda f: Path(f).name == name) | ((rej["file"] == "") & (rej["spec"] == name))
    ]
    ACTUAL[f"fits:{case.id}:preprocess"] = KEPT if name in fits_runs.kept else REJECT
    if name in fits_runs.kept:
        assert KEPT in case.outcomes, f"{case.id}: kept, expected {case.outcomes}"
        return
    assert REJECT in case.outcomes, f"{case.id}: rejected ({rows['reason'].tolist()}), expected kept"
    assert len(rows) == 1, f"{case.id}: not kept and not listed in rejected.csv"
    reason = rows["reason"].iloc[0]
    assert reason and re.search(case.match or ".", reason, re.IGNORECASE), f"{case.id}: reason {reason!r}"


@pytest.mark.parametrize("case", _fits_params())
def test_fits_case_predict(case: Case, fits_runs: FitsRuns, request: pytest.FixtureRequest) -> None:
    _needs(case, request)
    assert fits_runs.pred.exit_code == 0, fits_runs.pred.output[-3000:]
    df = fits_runs.predictions
    rows = df[df["filename"] == fits_runs.names[case.id]]
    if case.extra.get("predict") == "absent":  # not a file: not an input of predict --fits-dir
        assert len(rows) == 0
        return
    assert len(rows) == 1, f"{case.id}: no row in predictions.csv"
    flag, reason = int(rows["flag"].iloc[0]), str(rows["flag_reason"].iloc[0])
    ACTUAL[f"fits:{case.id}:predict"] = "flagged (no prediction)" if flag & 1 else KEPT
    if flag & 1:
        assert REJECT in case.outcomes, f"{case.id}: no prediction ({reason}), expected {case.outcomes}"
        assert re.search(case.match or ".", reason, re.IGNORECASE), f"{case.id}: reason {reason!r}"
    else:
        assert KEPT in case.outcomes, f"{case.id}: predicted, expected it refused ({case.match})"


def test_unicode_names_reach_the_fits_catalogue(fits_runs: FitsRuns) -> None:
    """Issue 16 item 5: a non-ASCII name no longer breaks predictions.fits (nor summary.json)."""
    from astropy.table import Table

    assert fits_runs.pred.exit_code == 0
    assert "spec-é-Ω–星.fits" in fits_runs.predictions["spec"].tolist()
    out = fits_runs.out
    t = Table.read(out / "predictions.fits")
    assert "spec-\\xe9-\\u03a9\\u2013\\u661f.fits" in [str(x) for x in t["spec"]]
    assert (out / "summary.json").exists()


# ------------------------------------------------------------------------------------ catalogue cases


def _small_fits(base: Base, work: Path) -> Path:
    """A FITS folder with the first few reference files."""
    folder = work / "fits"
    folder.mkdir()
    good = pd.read_csv(base.reference_csv).head(4)
    for s in good["spec"]:
        shutil.copy(base.fits / s, folder / s)
    return folder


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in corpus.CATALOGUE_CASES])
def test_catalogue_case(
    case: Case, corpus_base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the validation report's figures cost most of a small run: the FITS corpus run keeps them
    monkeypatch.setattr("specabund.preprocess.report.write_validation_report", lambda *a, **k: None)
    _small_fits(corpus_base, tmp_path)
    assert case.make is not None
    csv = case.make(tmp_path, corpus_base.reference_csv)
    r = cli(tmp_path, "preprocess", "--reference-csv", str(csv), "--fits-dir", "fits", "--no-plots")
    got = ACTUAL[f"catalogue:{case.id}"] = check(r, case)
    if got != OK:
        return
    rej = pd.read_csv(tmp_path / "processed_data" / "rejected.csv", keep_default_na=False)
    rej = rej[rej["set"] == "reference"]
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("WARNING")]
    if FLAGGED in case.outcomes and any(re.search(case.match, w, re.IGNORECASE) for w in warnings):
        ACTUAL[f"catalogue:{case.id}"] = FLAGGED
        return
    if len(rej):
        ACTUAL[f"catalogue:{case.id}"] = REJECT
    assert case.outcomes != (ERROR, FLAGGED), f"{case.id}: neither refused nor flagged:\n{r.output[-2000:]}"
    if REJECT in case.outcomes and OK not in case.outcomes:
        assert len(rej), f"{case.id}: nothing rejected:\n{r.output[-2000:]}"
        assert any(re.search(case.match, x, re.IGNORECASE) for x in rej["reason"]), rej.to_string()
    elif REJECT not in case.outcomes:
        assert not len(rej), f"{case.id}: rows rejected: {rej.to_string()}"


# --------------------------------------------------------------------------------------- config cases

CONFIG_COMMANDS = ("preprocess", "train", "test", "predict", "tune", "baseline", "analyze")


def _command_args(base: Base, command: str, work: Path) -> list[str]:
    p = str(base.processed)
    return {
        "preprocess": [
            "preprocess",
            "--reference-csv",
            str(base.reference_csv),
            "--fits-dir",
            str(base.fits),
            "--output-dir",
            str(work / "pp"),
            "--no-plots",
        ],
        "train": ["train", "--data-path", f"{p}/reference_dataset.npz", *TRAIN_FAST, "--run-name", "cfg"],
        "test": ["test", "--data-path", f"{p}/test_dataset.npz", "--model", str(base.model)],
        "predict": [
            "predict",
            "--data-path",
            f"{p}/prediction_dataset.npz",
            "--model",
            str(base.model),
            "--output-dir",
            str(work / "pred"),
            *PREDICT_FAST,
        ],
        "tune": ["tune", "--data-path", f"{p}/reference_dataset.npz", "--n-trials", "1"],
        "baseline": ["baseline", "--data-path", f"{p}/reference_dataset.npz", "--element", "C_FE"],
        "analyze": ["analyze", "--model", str(base.model), "--data-path", f"{p}/test_dataset.npz"],
    }[command]


def _config_params() -> list[Any]:
    out = []
    for c in corpus.CONFIG_CASES:
        if OK in c.outcomes:
            commands: tuple[str, ...] = ("predict",)
        else:
            commands = CONFIG_COMMANDS
        out += [pytest.param(c, cmd, id=f"{c.id}-{cmd}") for cmd in commands]
    return out


@pytest.mark.parametrize(("case", "command"), _config_params())
def test_config_case(case: Case, command: str, corpus_base: Base, tmp_path: Path) -> None:
    assert case.make is not None
    cfg = case.make(tmp_path)
    r = cli(tmp_path, *_command_args(corpus_base, command, tmp_path), "--config", str(cfg))
    got = ACTUAL[f"config:{case.id}:{command}"] = check(r, case)
    if got != OK:  # a refused command leaves no resolved configuration behind
        assert not list(tmp_path.rglob("resolved_config.toml"))


# ---------------------------------------------------------------------------------------- model cases


@pytest.fixture
def model_work(corpus_base: Base, tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    return tmp_path


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in corpus.MODEL_CASES])
def test_model_case(case: Case, corpus_base: Base, model_work: Path) -> None:
    run = model_work / "models" / case.id
    shutil.copytree(corpus_base.model, run)
    assert case.make is not None
    case.make(run, corpus_base.other_model)
    p = str(corpus_base.processed)
    r = cli(
        model_work,
        "predict",
        "--data-path",
        f"{p}/prediction_dataset.npz",
        "--model",
        case.id,
        "--output-dir",
        "pred",
        *PREDICT_FAST,
    )
    got = ACTUAL[f"model:{case.id}:predict"] = check(r, case)
    if got == ERROR:
        assert not (model_work / "pred" / "predictions.csv").exists()
    if got == ERROR and not case.extra.get("predict_only"):
        r = cli(model_work, "test", "--data-path", f"{p}/test_dataset.npz", "--model", case.id)
        ACTUAL[f"model:{case.id}:test"] = check(r, case)


def test_renamed_labels_are_refused_not_mislabelled(corpus_base: Base, tmp_path: Path) -> None:
    """Issue 16 item 8: Teff values must never be printed under CA_FE."""
    import json

    run = tmp_path / "models" / "renamed"
    shutil.copytree(corpus_base.model, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["labels"] = ["CA_FE" if x == "TEFF" else x for x in cfg["labels"]]
    (run / "config.json").write_text(json.dumps(cfg))
    r = cli(
        tmp_path,
        "predict",
        "--data-path",
        f"{corpus_base.processed}/prediction_dataset.npz",
        "--model",
        "renamed",
        *PREDICT_FAST,
    )
    assert r.exit_code == 1 and "differ from those the weights were trained for" in r.output
    assert not (tmp_path / "results" / "predictions" / "predictions.csv").exists()


def test_malicious_checkpoint_is_refused_on_resume(corpus_base: Base, tmp_path: Path) -> None:
    import os
    import pickle

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    run = tmp_path / "models" / "evil"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(pickle.dumps({"model": Evil()}))
    r = cli(
        tmp_path,
        "train",
        "--resume",
        "evil",
        "--data-path",
        f"{corpus_base.processed}/reference_dataset.npz",
        *TRAIN_FAST,
    )
    assert outcome_of(r) == ERROR and "cannot read training checkpoint" in r.output
    assert not (tmp_path / "pwned").exists()


# -------------------------------------------------------------------------------------- dataset cases

DATASET_COMMANDS = ("predict", "train", "test", "baseline")


@pytest.mark.parametrize(
    ("case", "command"),
    [
        pytest.param(c, cmd, id=f"{c.id}-{cmd}")
        for c in corpus.DATASET_CASES
        # a dataset a command may accept is run through the cheap commands only
        for cmd in (DATASET_COMMANDS if OK not in c.outcomes else ("predict", "test"))
    ],
)
def test_dataset_case(case: Case, command: str, corpus_base: Base, tmp_path: Path) -> None:
    assert case.make is not None
    which = {"train": "reference", "baseline": "reference", "predict": "prediction", "test": "test"}[command]
    good = corpus_base.processed / f"{which}_dataset.npz"
    bad = case.make(tmp_path, good)
    args = {
        "predict": ["predict", "--data-path", str(bad), "--model", str(corpus_base.model), *PREDICT_FAST],
        "train": ["train", "--data-path", str(bad), *TRAIN_FAST, "--run-name", "ds"],
        "test": ["test", "--data-path", str(bad), "--model", str(corpus_base.model)],
        "baseline": ["baseline", "--data-path", str(bad), "--element", "C_FE", "--model", "lightgbm"],
    }[command]
    ACTUAL[f"dataset:{case.id}:{command}"] = check(cli(tmp_path, *args), case)


# ------------------------------------------------------------------------- destinations and options


@pytest.fixture
def readonly(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "ro"
    try:
        undo = corpus.make_readonly(folder)
    except OSError as exc:
        pytest.skip(f"no read-only folder here: {exc}")
    try:
        yield folder
    finally:
        undo()


def _predict_args(base: Base, out: str) -> list[str]:
    data = f"{base.processed}/prediction_dataset.npz"
    return ["predict", "--data-path", data, "--model", str(base.model), "--output-dir", out, *PREDICT_FAST]


def test_output_folder_read_only(corpus_base: Base, tmp_path: Path, readonly: Path) -> None:
    r = cli(tmp_path, *_predict_args(corpus_base, str(readonly / "out")))
    assert outcome_of(r) == ERROR
    assert str(readonly / "out") in error_lines(r)[0] and re.search("read-only|permission", error_lines(r)[0])


def test_output_folder_under_a_file(corpus_base: Base, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    r = cli(tmp_path, *_predict_args(corpus_base, str(tmp_path / "afile" / "out")))
    assert outcome_of(r) == ERROR and "is a file, not a folder" in error_lines(r)[0]
    r = cli(
        tmp_path,
        "preprocess",
        "--reference-csv",
        str(corpus_base.reference_csv),
        "--fits-dir",
        str(corpus_base.fits),
        "--output-dir",
        str(tmp_path / "afile" / "pp"),
        "--no-plots",
    )
    assert outcome_of(r) == ERROR and str(tmp_path / "afile") in error_lines(r)[0]


def test_workdir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(
        main, ["--workdir", str(tmp_path / "afile" / "w"), "show-results", "--result-type", "training"]
    )
    assert outcome_of(r) == ERROR and "afile" in error_lines(r)[0]


def test_workdir_read_only_still_reports(corpus_base: Base, readonly: Path) -> None:
    """Logs cannot be written: the command says so once and goes on (its outputs go elsewhere)."""
    other = str(readonly.parent / "sim")
    r = CliRunner().invoke(main, ["--workdir", str(readonly), "simulate", "--n", "1", "--output-dir", other])
    assert outcome_of(r) == OK and "logging to the terminal only" in r.output
    r = CliRunner().invoke(
        main, ["--workdir", str(readonly), *_predict_args(corpus_base, str(readonly.parent / "o"))]
    )
    assert outcome_of(r) == ERROR and str(readonly / "results") in error_lines(r)[0]


def test_unicode_output_folder(corpus_base: Base, tmp_path: Path) -> None:
    r = cli(tmp_path, *_predict_args(corpus_base, str(tmp_path / "résultats ✓")))
    assert outcome_of(r) == OK and (tmp_path / "résultats ✓" / "predictions.fits").exists()


@pytest.mark.parametrize("command", ["predict", "preprocess", "simulate"])
def test_n_workers_bounded_by_cpus(command: str, corpus_base: Base, tmp_path: Path) -> None:
    if command == "predict":
        args = [
            "predict",
            "--fits-dir",
            str(corpus_base.fits),
            "--model",
            str(corpus_base.model),
            *PREDICT_FAST,
        ]
    elif command == "preprocess":
        args = [
            "preprocess",
            "--reference-csv",
            str(corpus_base.reference_csv),
            "--fits-dir",
            str(corpus_base.fits),
            "--no-plots",
        ]
    else:
        args = ["simulate", "--n", "2", "--output-dir", "s"]
    r = cli(tmp_path, *args, "--n-workers", "1000")
    assert outcome_of(r) == OK
    assert re.search(r"--n-workers = 1000 is more than the \d+ CPU\(s\) available; using \d+", r.output)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["predict", "--fits-dir", "nowhere"], "nowhere"),
        (["predict", "--files", "nothing-*.fits"], "no FITS file matches"),
        (["predict", "--data-path", "missing.npz"], "missing.npz"),
        (["train", "--run-name", "../escape"], "plain folder name"),
        (["train", "--resume", "never-ran"], "not found"),
        (["test", "--data-path", "missing.npz"], "missing.npz"),
        (["tune", "--storage", "study.xyz", "--n-trials", "1"], "tuning.storage"),
        (["baseline", "--data-path", "PRED", "--element", "C_FE"], "train, validation and test"),
        (["analyze", "--data-path", "missing.npz"], "missing.npz"),
    ],
    ids=[
        "fits_dir_missing",
        "glob_nothing",
        "data_missing",
        "run_name_traversal",
        "resume_unknown",
        "test_data_missing",
        "tune_bad_storage",
        "baseline_no_splits",
        "analyze_data_missing",
    ],
)
def test_bad_option_values(args: list[str], match: str, corpus_base: Base, tmp_path: Path) -> None:
    shutil.copytree(corpus_base.model, tmp_path / "models" / "tiny")
    args = [str(corpus_base.processed / "prediction_dataset.npz") if a == "PRED" else a for a in args]
    if args[0] in ("train", "tune"):
        args += ["--data-path", str(corpus_base.processed / "reference_dataset.npz")]
    r = cli(tmp_path, *args)
    assert outcome_of(r) == ERROR and re.search(match, error_lines(r)[0]), r.output[-2000:]


def test_files_list_not_utf8(corpus_base: Base, tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xff\xfe\x00bad\n")
    r = cli(tmp_path, "predict", "--files", str(lst), "--model", str(corpus_base.model), *PREDICT_FAST)
    assert outcome_of(r) == ERROR and "list.txt" in error_lines(r)[0]
