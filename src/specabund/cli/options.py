"""Click helpers shared by the subcommands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..elements import split_values


class MultiValueOption(click.Option):
    """An option that takes every following value up to the next option.

    ``--elements C_FE MG_FE``, ``--elements C_FE,MG_FE`` and ``--elements C_FE --elements MG_FE`` all give
    ``('C_FE', 'MG_FE')``. The value reaches the command as a tuple of strings (empty when not given).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["multiple"] = True
        kwargs.setdefault("default", ())
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            opt = parser._long_opt.get(name) or parser._short_opt.get(name)
            if opt is None:
                continue
            previous = opt.process

            def process(value: Any, state: Any, _previous: Any = previous, _opt: Any = opt) -> None:
                values = [value]
                while state.rargs:
                    nxt = state.rargs[0]
                    if nxt == "--" or (any(nxt.startswith(p) for p in _opt.prefixes) and len(nxt) > 1):
                        break
                    values.append(state.rargs.pop(0))
                for v in values:
                    _previous(v, state)

            opt.process = process

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        value = super().process_value(ctx, value)
        return tuple(split_values(value or ()))


def elements_option(help_text: str = "Labels to use, e.g. --elements C_FE MG_FE (or C_FE,MG_FE).") -> Any:
    """The shared ``--elements`` option."""
    return click.option("--elements", "elements", cls=MultiValueOption, help=help_text)


def resolve_in_workdir(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Option callback: a relative path is taken relative to ``--workdir`` (like running from there)."""
    if value is None or value == ():
        return value
    obj = ctx.find_object(dict) or {}
    ws = obj.get("ws")
    if ws is None:
        return Path(value)
    return ws.resolve(value)


def _config_file(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """``--config``: relative to ``--workdir``; a file that is not UTF-8 text is refused here."""
    path = resolve_in_workdir(ctx, param, value)
    if path is not None and Path(path).is_file():
        try:
            Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise click.BadParameter(
                f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); a configuration is TOML",
                ctx=ctx,
                param=param,
            ) from None
        except OSError as exc:
            raise click.BadParameter(
                f"{path}: cannot be read ({exc.strerror})", ctx=ctx, param=param
            ) from None
    return path


def config_option() -> Any:
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        callback=_config_file,
        help="TOML file overlaying configs/default.toml; flags override both.",
    )
