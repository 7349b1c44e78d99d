"""The ``specabund`` command line.

Examples
--------
::

    specabund simulate --n 2000 --output-dir demo --seed 1
    specabund preprocess --reference-csv demo/X_FE.csv --fits-dir demo/fits
    specabund train --data-path processed_data/reference_dataset.npz --elements C_FE MG_FE
    specabund test --data-path processed_data/test_dataset.npz
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import SpecabundError
from ..workspace import Workspace, timestamp

EPILOG = """\b
Examples:
  specabund simulate --n 2000 --output-dir demo --seed 1
  specabund preprocess --reference-csv demo/X_FE.csv --prediction-csv demo/galah_X_FE.csv \\
      --fits-dir demo/fits --output-dir processed_data
  specabund train --data-path processed_data/reference_dataset.npz --elements C_FE MG_FE
  specabund test --data-path processed_data/test_dataset.npz
  specabund baseline --element C_FE --model both

Runtime folders (fits/ processed_data/ models/ results/ logs/ plots/) are created under --workdir.
"""


def setup_logging(ws: Workspace, stage: str, verbose: bool) -> Path:
    """Log to stderr (INFO, or DEBUG with -v) and to logs/<stage>/<timestamp>.log (DEBUG)."""
    log_file = ws.logs(stage) / f"{stage}_{timestamp()}.log"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    fh = logging.FileHandler(log_file, encoding="utf-8")
    fh.setFormatter(fmt)
    fh.setLevel(logging.DEBUG)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    sh.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(fh)
    root.addHandler(sh)
    for noisy in ("matplotlib", "PIL", "numba", "fontTools"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return log_file


class SpecabundGroup(click.Group):
    """Turns specabund's own errors into a one-line message and exit code 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except SpecabundError as exc:
            logging.getLogger("specabund").debug("error", exc_info=True)
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=SpecabundGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="specabund")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Working directory holding the runtime folders.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug output on the terminal.")
@click.pass_context
def main(ctx: click.Context, workdir: Path, verbose: bool) -> None:
    """specabund: [X/Fe], Teff, logg and [Fe/H] from LAMOST low-resolution spectra."""
    workdir.mkdir(parents=True, exist_ok=True)
    ctx.obj = {"ws": Workspace(workdir.resolve()), "verbose": verbose}


def _not_built(name: str, issue: int, what: str) -> None:
    @main.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def _cmd() -> None:
        raise click.ClickException(
            f"'specabund {name}' ({what}) is not built yet: it is tracked in issue #{issue}."
        )

    _cmd.help = f"[not built yet: issue #{issue}] {what}"
    _cmd.short_help = f"[not built yet] {what}"


def _register() -> None:
    from . import analyze, baseline, commands, predict, train, tune  # noqa: F401  (registers the subcommands on ``main``)


_register()
