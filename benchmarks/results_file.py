"""Writing a benchmark's measured rows with the machine they were measured on."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import NamedTuple


def write_rows(path: Path, rows: list[dict]) -> None:
    """``{"meta": {"machine": ...}, "rows": rows}`` as indented JSON at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


class Column(NamedTuple):
    """One printed column: the row's ``key``, its ``header``, and its format (``align`` and
    ``width`` for both, ``spec`` for the value; ``"s"`` prints the value's ``str``)."""

    key: str
    header: str
    width: int
    spec: str = "s"
    align: str = ">"


def print_header(columns: list[Column]) -> None:
    """The header line of a table of ``columns``."""
    print(" ".join(f"{c.header:{c.align}{c.width}}" for c in columns), flush=True)


def print_row(columns: list[Column], row: dict) -> None:
    """``row``'s values under :func:`print_header`'s headers."""
    cells = []
    for c in columns:
        value = str(row[c.key]) if c.spec == "s" else row[c.key]
        cells.append(f"{value:{c.align}{c.width}{'' if c.spec == 's' else c.spec}}")
    print(" ".join(cells), flush=True)
