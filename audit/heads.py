"""The coordinator's record of every ledger head it accepted, and the rule for accepting one.

One append-only JSON Lines file per institution, ``<run_dir>/ledger-heads/<name>.jsonl``, a line
per accepted head (institution, entries, last hash, signature; the proof is not kept: it was
checked on arrival, and ``verify`` checks each head against the ledger itself). Lines are
appended with fsync (:func:`clients.contract.durable.append_line`); a torn last line (a crash
while appending) is ignored on reading and cut off before the next append, as with the journal.

:func:`check_extends` is the rule: a head is accepted only if it provably extends the last
accepted one (or, for the first, the empty ledger). From the kept hash at ``k`` entries and the
digests in the new head's proof of entries ``k+1..n``, the chain hash at ``n`` is recomputed
(:func:`audit.entry.chain_hash`) and must equal the head's ``last_hash``. Since every chain hash
commits to all the hashes before it, a ledger that matches the new head also matches every head
kept before it. An institution that drops a past entry and re-signs its whole chain cannot
produce such a proof for its rewritten ledger: it is refused. It can send digests that are not
those of its ledger; the head is then kept, but no ledger it can show matches it, and
``verify``, which checks the ledger against every kept head, fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from audit.entry import GENESIS
from audit.entry import chain_hash
from privacy.errors import UserError
from privacy.head import LedgerHead

HEADS_DIR = "ledger-heads"
FIELDS = {"institution", "entries", "last_hash", "signature"}


class HeadFileError(UserError, ValueError):
    """A heads file cannot be read (the message names the file and the line)."""


class HeadRefused(ValueError):
    """A ledger head that does not extend the last accepted one (the message says how)."""


def head_path(run_dir: str | Path, institution: str) -> Path:
    """Where the coordinator keeps ``institution``'s accepted heads (JSON Lines)."""
    return Path(run_dir) / HEADS_DIR / f"{institution}.jsonl"


def head_to_json(head: LedgerHead) -> bytes:
    """The head's line in the heads file (without the newline; no proof)."""
    record = {
        "institution": head.institution,
        "entries": head.entries,
        "last_hash": head.last_hash.hex(),
        "signature": head.signature.hex(),
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode("ascii")


def parse_head(text: str | bytes) -> LedgerHead:
    """One line of a heads file as a :class:`LedgerHead` (no proof); ValueError if it is not."""
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or set(record) != FIELDS:
            raise ValueError("expected exactly institution, entries, last_hash and signature")
        return msgspec.convert(
            {
                **record,
                "last_hash": bytes.fromhex(record["last_hash"]),
                "signature": bytes.fromhex(record["signature"]),
            },
            LedgerHead,
        )
    except (ValueError, TypeError, msgspec.ValidationError) as exc:
        raise ValueError(str(exc)) from None


def read_heads(path: str | Path) -> list[LedgerHead]:
    """Every head in the file at ``path``, oldest first (none if there is no file); a torn last
    line is ignored. :class:`HeadFileError` if a complete line is not a head."""
    path = Path(path)
    try:
        data = path.read_bytes() if path.exists() else b""
    except OSError as exc:
        raise HeadFileError(f"{path}: cannot read the ledger heads ({exc})") from None
    heads = []
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):  # [-1]: "" or a torn line
        try:
            heads.append(parse_head(line))
        except ValueError as exc:
            raise HeadFileError(f"{path}:{number}: not a ledger head ({exc})") from None
    return heads


def read_head(path: str | Path) -> LedgerHead | None:
    """The last head in the file at ``path`` (None if there is none)."""
    heads = read_heads(path)
    return heads[-1] if heads else None


def check_extends(kept: LedgerHead | None, head: LedgerHead) -> bool:
    """Whether ``head`` is new: True if it extends ``kept`` (None: the empty ledger), False if it
    states ``kept`` again; :class:`HeadRefused` otherwise. Signatures are not checked here."""
    k = kept.entries if kept is not None else 0
    kept_hash = kept.last_hash.hex() if kept is not None else GENESIS
    n, proof = head.entries, head.proof
    if len(proof) > n:
        raise HeadRefused(f"its proof has {len(proof)} digests for {n} entries")
    if kept is not None and head.institution != kept.institution:
        raise HeadRefused(f"it is {head.institution!r}'s, the kept heads {kept.institution!r}'s")
    if n < k:
        raise HeadRefused(
            f"it states {n} entries, the last accepted head {k}: was the ledger rolled back?"
        )
    if n == k:
        if head.last_hash.hex() != kept_hash:
            raise HeadRefused(
                f"it states {n} entries like the last accepted head, with another last hash: "
                "two histories"
            )
        return False
    base = n - len(proof)
    if base > k:
        raise HeadRefused(
            f"its proof covers entries {base + 1}..{n}, the last accepted head is at {k}: "
            f"entries {k + 1}..{base} are unproven"
        )
    digest = kept_hash
    for item in proof[k - base :]:
        digest = chain_hash(digest, item)
    if digest != head.last_hash.hex():
        raise HeadRefused(
            f"its {n} entries do not extend the {k} of the last accepted head: the ledger's "
            "history was rewritten"
        )
    return True
