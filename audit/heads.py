"""The coordinator's copy of each institution's latest signed ledger head, as a JSON file.

One file per institution, ``<run_dir>/ledger-heads/<name>.json``; the coordinator replaces it
atomically whenever a newer, validly signed head arrives. ``verify`` reads it to detect a ledger
whose tail was cut off (deleted entries leave no broken link behind them otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from privacy.errors import UserError
from privacy.head import LedgerHead

HEADS_DIR = "ledger-heads"


class HeadFileError(UserError, ValueError):
    """A head file cannot be read (the message names the file)."""


def head_path(run_dir: str | Path, institution: str) -> Path:
    """Where the coordinator keeps ``institution``'s head."""
    return Path(run_dir) / HEADS_DIR / f"{institution}.json"


def head_to_json(head: LedgerHead) -> bytes:
    """The head file's bytes."""
    record = {
        "institution": head.institution,
        "entries": head.entries,
        "last_hash": head.last_hash.hex(),
        "signature": head.signature.hex(),
    }
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


def read_head(path: str | Path) -> LedgerHead:
    """The head stored at ``path``; :class:`HeadFileError` if it is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or set(record) != {
            "institution", "entries", "last_hash", "signature"
        }:  # fmt: skip
            raise ValueError("expected exactly institution, entries, last_hash and signature")
        return msgspec.convert(
            {
                **record,
                "last_hash": bytes.fromhex(record["last_hash"]),
                "signature": bytes.fromhex(record["signature"]),
            },
            LedgerHead,
        )
    except (OSError, ValueError, TypeError, msgspec.ValidationError) as exc:
        raise HeadFileError(f"{path}: not a ledger head ({exc})") from None
