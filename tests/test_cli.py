"""The click command line (CliRunner)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from specabund import __version__
from specabund.cli import main
from specabund.cli.options import MultiValueOption


def test_version_and_help() -> None:
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for cmd in (
        "preprocess",
        "train",
        "test",
        "tune",
        "analyze",
        "predict",
        "baseline",
        "show-results",
        "simulate",
    ):
        assert cmd in main.commands, cmd
    assert "Examples" in r.output


@pytest.mark.parametrize(
    "args",
    [
        ["--elements", "C_FE", "MG_FE", "--n", "3"],
        ["--elements", "C_FE,MG_FE", "--n", "3"],
        ["--elements", "C_FE", "--elements", "MG_FE", "--n", "3"],
        ["--n", "3", "--elements", "C_FE", "MG_FE"],
    ],
)
def test_multi_value_option_spellings(args: list[str]) -> None:
    @click.command()
    @click.option("--elements", cls=MultiValueOption)
    @click.option("--n", type=int)
    def cmd(elements: tuple[str, ...], n: int) -> None:
        click.echo(f"{','.join(elements)}|{n}")

    r = CliRunner().invoke(cmd, args)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "C_FE,MG_FE|3"


def test_preprocess_requires_a_catalogue(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["--workdir", str(tmp_path), "preprocess", "--fits-dir", str(tmp_path)])
    assert r.exit_code == 2
    assert "--reference-csv, --prediction-csv or both" in r.output


def test_specabund_errors_are_one_line(tmp_path: Path) -> None:
    csv = tmp_path / "nospec.csv"
    csv.write_text("name,C_FE\na,0.1\n")
    (tmp_path / "fits").mkdir()
    r = CliRunner().invoke(
        main, ["--workdir", str(tmp_path), "preprocess", "--reference-csv", str(csv), "--fits-dir", "fits"]
    )
    assert r.exit_code == 1
    assert "Error:" in r.output and "no FITS files found" in r.output
    assert "Traceback" not in r.output


def test_logs_go_to_the_configured_logs_dir(tmp_path: Path) -> None:
    """[paths] logs_dir of --config decides where the command's log file goes."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[paths]\nlogs_dir = "mylogs"\n', encoding="utf-8")
    (tmp_path / "fits").mkdir()
    r = CliRunner().invoke(
        main,
        ["--workdir", str(tmp_path), "preprocess", "--config", str(cfg), "--fits-dir", "fits",
         "--reference-csv", "missing.csv"],
    )  # fmt: skip
    assert r.exit_code != 0
    assert list((tmp_path / "mylogs" / "preprocess").glob("preprocess_*.log"))
    assert not (tmp_path / "logs").exists()
