"""Declaring a ``sealmoe`` subcommand: its name, one-line help, description, arguments, handler.

Each command is one call, so the command table reads as a list of what the tool can do.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]
Argument = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **options: Any) -> Argument:
    """One argument, as ``add_argument(*flags, **options)`` takes it."""
    return flags, options


CONFIG = arg("--config", required=True, metavar="F", help="federation config (TOML)")


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
