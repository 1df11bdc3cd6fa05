"""Writing a benchmark's measured rows with the machine they were measured on."""

from __future__ import annotations

import json
import platform
from pathlib import Path


def write_rows(path: Path, rows: list[dict]) -> None:
    """``{"meta": {"machine": ...}, "rows": rows}`` as indented JSON at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
