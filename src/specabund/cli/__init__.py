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
import re
import sys
import traceback
from pathlib import Path

import click

from .. import __version__
from ..errors import OutputError, SpecabundError, describe_os_error
from ..utils import cap_workers, ensure_dir
from ..workspace import FolderLock, Workspace

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


class _QuietFileHandler(logging.FileHandler):
    """A log file that goes silent when it cannot be written (full disk), instead of printing a traceback
    for every record; the command's own error says what failed."""

    def handleError(self, record: logging.LogRecord) -> None:
        self.close()
        logging.getLogger().removeHandler(self)


class _QuietStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def handleError(self, record: logging.LogRecord) -> None:  # a closed terminal must not raise
        pass


class _TerminalFormatter(logging.Formatter):
    """One line per record on the terminal: tracebacks attached to a record go to the log file only."""

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return super().format(record)
        exc = record.exc_info[1] if record.exc_info else None
        short = logging.makeLogRecord(record.__dict__)
        short.exc_info = short.exc_text = short.stack_info = None
        text = super().format(short)
        if exc is not None:
            text += f" ({type(exc).__name__}: {exc}; details in the log file)"
        return re.sub(r"\s*\n\s*", " ", text)


#: The current command's log file (None before logging is set up or when it could not be created).
_LOG_FILE: dict[str, Path | None] = {"path": None}


def setup_logging(ws: Workspace, stage: str, verbose: bool, config_file: str | Path | None = None) -> Path:
    """Log to stderr (INFO, or DEBUG with -v) and to <logs>/<stage>/<timestamp>.log (DEBUG).

    ``<logs>`` is ``[paths] logs_dir`` of ``config_file`` (default ``logs``) under the working directory; a
    configuration that cannot be read leaves the default (the command reports the problem itself). When
    the log folder cannot be written (read-only or full disk) the command logs to the terminal only, with a
    warning; the returned path then does not exist.
    """
    if config_file is not None:
        from ..config import load_config
        from ..errors import SpecabundError

        try:
            ws = ws.with_paths(load_config(config_file)["paths"])
        except (SpecabundError, OSError, ValueError):
            pass
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.DEBUG)
    sh = _QuietStreamHandler(sys.stderr)
    sh.setFormatter(_TerminalFormatter("%(levelname)s: %(message)s"))
    sh.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(sh)
    for noisy in ("matplotlib", "PIL", "numba", "fontTools"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log_file = ws.log_file(stage)
    try:
        ensure_dir(log_file.parent)
        fh = _QuietFileHandler(log_file, encoding="utf-8")
    except OSError as exc:
        _LOG_FILE["path"] = None
        root.warning("%s; logging to the terminal only", OutputError(log_file, exc))
        return log_file
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fh.setLevel(logging.DEBUG)
    root.addHandler(fh)
    _LOG_FILE["path"] = log_file
    return log_file


def lock_output(ctx: click.Context, folder: Path) -> Path:
    """Hold the lock of an output folder until the command ends (a second run into it is refused)."""
    ctx.with_resource(FolderLock(folder, f"specabund {ctx.info_name or ''}".strip()))
    return folder


def bounded_workers(n: int, option: str = "--n-workers") -> int:
    """``n`` bounded by the CPUs available; logs a warning when it was lowered."""
    n_eff, message = cap_workers(n, option)
    if message:
        logging.getLogger("specabund.cli").warning("%s", message)
    return n_eff


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def os_error_message(exc: OSError) -> str:
    """One line naming the path(s) of an OS error and its cause."""
    if isinstance(exc, SpecabundError):
        return str(exc)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(paths)
    return f"{where}: {describe_os_error(exc)}" if where else describe_os_error(exc)


class SpecabundGroup(click.Group):
    """Turns errors into a one-line message and exit code 1.

    specabund's own errors (:class:`~specabund.errors.SpecabundError`) print their message; OS errors
    (unreadable inputs, unwritable or full destinations) name the path and the cause. Anything else is a
    bug: one line says so and where the traceback was logged (``-v`` also prints it). Usage errors, ``--help``
    and Ctrl-C keep click's own handling.
    """

    def invoke(self, ctx: click.Context) -> object:
        log = logging.getLogger("specabund")
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except SpecabundError as exc:
            log.debug("error", exc_info=True)
            message = str(exc)
        except OSError as exc:
            log.debug("error", exc_info=True)
            message = os_error_message(exc)
        except MemoryError:
            log.debug("error", exc_info=True)
            message = "out of memory; use smaller batches or chunks (--batch-size, --chunk-size)"
        except Exception as exc:
            log.debug("unexpected error", exc_info=True)
            where = _LOG_FILE["path"]
            message = (
                f"unexpected {type(exc).__name__}: {exc} (a bug in specabund"
                + (f"; the traceback is in {where}" if where is not None else "")
                + "; please report it)"
            )
            if (ctx.obj or {}).get("verbose"):
                traceback.print_exc(file=sys.stderr)
        click.echo(f"Error: {_one_line(message)}", err=True)
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
    ctx.obj = {"ws": Workspace(ensure_dir(workdir).resolve()), "verbose": verbose}


def _register() -> None:
    from . import analyze, baseline, commands, predict, train, tune  # noqa: F401  (registers the subcommands on ``main``)


_register()
