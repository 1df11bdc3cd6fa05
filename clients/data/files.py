"""An institution's own records from local files, read with Hugging Face ``datasets``.

Formats: JSON Lines (``jsonl``; ``json`` is read by the same loader), CSV, Parquet and plain text
(one record per non-blank line). Nothing is downloaded: ``datasets`` runs offline on the packaged
loaders, with a throw-away cache. Every problem with a file raises :class:`DataFileError`, which
names the file, the line (or Parquet row) and the field.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from privacy.errors import UserError

_LOADERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "text": "text"}


class DataFileError(UserError, ValueError):
    """A data file that cannot be used; the message names the file, line and field."""

    def __init__(
        self, path: str | Path, message: str, line: int | None = None, field: str | None = None
    ) -> None:
        self.path, self.line, self.field = str(path), line, field
        where = "".join(
            [f", line {line}" if line is not None else "", f", field {field!r}" if field else ""]
        )
        super().__init__(f"{self.path}{where}: {message}")


def read_records(path: str | Path, fmt: str, text_field: str = "text") -> list[str]:
    """The text of every record in ``path`` (format ``fmt``), in file order.

    Refuses a missing or empty file, a ``text_field`` the file lacks, and rows that cannot be
    decoded or whose text is missing, not a string or blank (plain text: blank lines are no
    records).
    """
    path = Path(path)
    if fmt not in _LOADERS:
        raise DataFileError(path, f"unknown format {fmt!r}; choose one of {sorted(_LOADERS)}")
    if not path.is_file():
        raise DataFileError(path, "no such file")
    if path.stat().st_size == 0:
        raise DataFileError(path, "the file is empty: it holds no records")
    field = "text" if fmt == "text" else text_field
    columns, values = _load_column(path, fmt, field)
    if fmt == "text":
        return [v for v in values if v.strip()] or _no_records(path)
    if field not in columns:
        raise DataFileError(
            path, f"no such field; the file has {sorted(columns)}: set text_field", field=field
        )
    if not values:
        _no_records(path)
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            what = "missing" if value is None else "blank" if isinstance(value, str) else "not text"
            row_name = f"row {row + 1}: " if fmt == "parquet" else ""
            raise DataFileError(
                path,
                f"{row_name}the record's text is {what} ({value!r}); fix or remove the row",
                *_where(path, fmt, row),
                field=field,
            )
    return values


def _no_records(path: Path) -> list[str]:
    raise DataFileError(path, "the file holds no records")


def _load_column(path: Path, fmt: str, field: str) -> tuple[list[str], list[Any]]:
    """(column names, values of ``field`` or [] when absent) via ``datasets``, offline."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets  # lazy: pyarrow and pandas stay out of the CLI's start-up

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="sealmoe-data-") as cache:
        try:
            table = datasets.load_dataset(
                _LOADERS[fmt],
                data_files=str(path),
                split="train",
                cache_dir=cache,
                keep_in_memory=True,
            )
        except Exception as exc:
            line, reason = _first_bad_line(path, fmt)
            raise DataFileError(
                path, f"cannot read it as {fmt}: {reason or _cause(exc)}", line
            ) from None
        columns = list(table.column_names)
        return columns, list(table[field]) if field in columns else []


def _cause(exc: BaseException) -> str:
    """The innermost exception's message (``datasets`` wraps the parser's error)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return f"{type(exc).__name__}: {exc}".strip()


def _first_bad_line(path: Path, fmt: str) -> tuple[int | None, str | None]:
    """(line, reason) of the first line that does not decode (UTF-8, JSON), or (None, None)."""
    if fmt == "parquet":
        return None, None
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return number, f"not UTF-8 ({exc.reason} at byte {exc.start})"
            if fmt in ("jsonl", "json") and text.strip():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    return number, f"not a JSON object ({exc.msg})"
                if not isinstance(record, dict):
                    return number, f"a JSON Lines record must be an object, got {text.strip()!r}"
    return None, None


def _where(path: Path, fmt: str, row: int) -> tuple[int | None]:
    """The file line of data row ``row`` (0-based), where lines mean something."""
    if fmt == "parquet":
        return (None,)
    with path.open(encoding="utf-8", newline="") as f:
        if fmt == "csv":
            reader = csv.reader(f)
            next(reader, None)  # the header
            for i, _ in enumerate(reader):
                if i == row:
                    return (reader.line_num,)
        else:
            lines = [n for n, line in enumerate(f, start=1) if line.strip()]
            if row < len(lines):
                return (lines[row],)
    return (None,)
