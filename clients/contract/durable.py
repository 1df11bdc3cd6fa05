"""Crash-safe file writes: whole files replaced atomically, journal lines appended durably.

Used for keys, ledgers, checkpoints and journals: after ``kill -9`` or a power cut a reader
finds either the old or the new content, never a mix, and an acknowledged line is on disk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` via a same-folder temp file created with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    """Append one text line (newline added) and return only once it is on disk (with the
    folder's entry, when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    if new_file:
        _fsync_folder(path.parent)


def drop_torn_tail(path: Path) -> bool:
    """Cut an incomplete last line (a crash while appending it) off ``path``; whether one was.

    Call before appending to a line file whose readers skip a torn last line, or the next line
    would be glued onto the fragment."""
    if not path.exists():
        return False
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete == len(data):
        return False
    with path.open("r+b") as f:
        f.truncate(complete)
        f.flush()
        os.fsync(f.fileno())
    return True


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
