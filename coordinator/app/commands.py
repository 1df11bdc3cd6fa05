"""Declaring a ``sealmoe`` subcommand: its name, one-line help, description, arguments, handler.

Each command is one call, so the command table reads as a list of what the tool can do.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from privacy.errors import UserError

Handler = Callable[[argparse.Namespace], int]
Argument = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **options: Any) -> Argument:
    """One argument, as ``add_argument(*flags, **options)`` takes it."""
    return flags, options


CONFIG = (
    arg("config", nargs="?", metavar="CONFIG", help="federation config (TOML)"),
    arg("--config", dest="config_option", metavar="CONFIG", help="the same, as an option"),
)
"""Every command that reads the federation config takes it as ``sealmoe CMD CONFIG`` (or,
as earlier releases did for some commands, ``--config CONFIG``): pass ``*CONFIG``."""


class MissingConfigError(UserError):
    """A command that needs the federation config was given none (or two different ones)."""


def config_path(args: argparse.Namespace) -> str:
    """The config file the command was given, positionally or with ``--config``."""
    given = {p for p in (args.config, args.config_option) if p is not None}
    if len(given) != 1:
        problem = "two different configs" if given else "no federation config"
        raise MissingConfigError(
            f"{problem} given: name one, e.g. `sealmoe {args.command} examples/tiny.toml`"
        )
    return given.pop()


def add_command(
    commands: argparse._SubParsersAction,
    name: str,
    handler: Handler,
    summary: str,
    description: str,
    *arguments: Argument,
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` that runs ``handler``; ``summary`` is its line in the parent's
    ``--help``, ``description`` the text of its own."""
    parser = commands.add_parser(name, help=summary, description=description)
    for flags, options in arguments:
        parser.add_argument(*flags, **options)
    parser.set_defaults(handler=handler)
    return parser
