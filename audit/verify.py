"""Recompute a ledger from its file: the hash chain, every signature and every epsilon.

:func:`verify_ledger` reads a ledger line by line and raises :class:`LedgerTampered`, naming
the file, the line and what is wrong, at the first line that does not follow: a line that is
not a well-formed entry, a sequence number out of place (an entry deleted, inserted or moved),
a ``prev`` hash that does not match the line before (an entry edited, deleted, inserted or
reordered), a signature that does not verify under the institution's identity key, an epsilon
that does not follow from the recorded events, or a release recorded beyond its budget.

Given the coordinator's kept heads (every head it accepted, :mod:`audit.heads`), it checks each:
its signature, and that the ledger has at least that many entries and the chain hash at that
position is the head's. So a ledger whose last entries were deleted (truncated), one whose
history was rewritten and re-signed by its owner (the hash at an old head's position changes),
and a deleted ledger (when heads are on file) all fail, naming the head.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.entry import FORMAT_VERSION
from audit.entry import GENESIS
from audit.entry import Entry
from audit.entry import entry_hash
from audit.entry import entry_signature_ok
from audit.entry import head_signature_ok
from audit.entry import line_bytes
from audit.events import EventFormatError
from audit.events import event_from_json
from privacy.budget import Composition
from privacy.budget import Epsilons
from privacy.config import ACCOUNTANTS
from privacy.head import LedgerHead

EPSILON_RTOL = 1e-6
"""Relative tolerance between a recorded and a recomputed epsilon (same library: exact)."""


class LedgerTampered(Exception):
    """A ledger does not verify; ``line`` is 1-based (0: the file as a whole)."""

    def __init__(self, path: Path, line: int, message: str) -> None:
        self.path, self.line, self.problem = path, line, message
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class VerifiedLedger:
    """A ledger that verified: its entries, its last chain hash (:data:`GENESIS` when empty)
    and how many of the coordinator's heads it was checked against."""

    path: Path
    institution: str | None
    entries: tuple[Entry, ...]
    heads_checked: int
    last_hash: str = GENESIS

    @property
    def head_checked(self) -> bool:
        """Whether the ledger was checked against at least one coordinator head."""
        return self.heads_checked > 0

    @property
    def spent(self) -> Epsilons:
        """Cumulative epsilon after the last release (zeros when nothing was released)."""
        releases = [e for e in self.entries if e.kind == "release"]
        return releases[-1].epsilon if releases else Epsilons(rdp=0.0, pld=0.0)


def parse_entry(text: str) -> Entry:
    """One line as an :class:`Entry` (strict); ValueError says what is wrong."""
    try:
        return msgspec.convert(json.loads(text), Entry, strict=True)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    except msgspec.ValidationError as exc:
        raise ValueError(f"not a ledger entry: {exc}") from None


def _version_of(raw: bytes) -> object:
    """The ``version`` field of a line that is a JSON object, else None."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record.get("version") if isinstance(record, dict) else None


def _close(recorded: float | None, recomputed: float | None) -> bool:
    if recorded is None or recomputed is None:
        return recorded is None and recomputed is None
    return math.isclose(recorded, recomputed, rel_tol=EPSILON_RTOL, abs_tol=1e-12)


def verify_ledger(
    path: str | Path,
    public_key: Ed25519PublicKey,
    *,
    institution: str | None = None,
    head: LedgerHead | None = None,
    heads: Sequence[LedgerHead] = (),
) -> VerifiedLedger:
    """Verify the ledger at ``path`` of ``institution`` (any, if None) under ``public_key``,
    and against the coordinator's ``heads`` (oldest first; ``head``: one more, checked last)."""
    return replay_ledger(path, public_key, institution=institution, head=head, heads=heads)[0]


def replay_ledger(
    path: str | Path,
    public_key: Ed25519PublicKey,
    *,
    institution: str | None = None,
    head: LedgerHead | None = None,
    heads: Sequence[LedgerHead] = (),
) -> tuple[VerifiedLedger, Composition | None]:
    """:func:`verify_ledger`, also returning the accountants with every release composed
    (``None`` for an empty ledger), so a ledger that opens a file need not price it twice."""
    path = Path(path)
    heads = [*heads, *([head] if head is not None else [])]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        stated = [h for h in heads if h.entries]
        if stated:
            who = institution or stated[-1].institution
            raise LedgerTampered(
                path, 0,
                f"{who}: the ledger is missing, but the coordinator holds {len(heads)} signed "
                f"heads of it, head {heads.index(stated[0]) + 1} at {stated[0].entries} entries "
                f"and the last at {heads[-1].entries}: the ledger was deleted",
            ) from None  # fmt: skip
        raise LedgerTampered(path, 0, "cannot read the ledger (no such file)") from None
    except OSError as exc:
        raise LedgerTampered(path, 0, f"cannot read the ledger ({exc})") from None
    if data and not data.endswith(b"\n"):
        raise LedgerTampered(
            path, data.count(b"\n") + 1,
            "the last line is incomplete (a crash while writing it, or a cut file); the "
            "institution repairs this when it next opens its ledger",
        )  # fmt: skip
    lines = data.split(b"\n")[:-1] if data else []
    entries: list[Entry] = []
    hashes: list[str] = []  # the chain hash after each entry
    prev = GENESIS
    pricer: Composition | None = None
    released: set[tuple[int, str]] = set()
    for number, raw in enumerate(lines, start=1):

        def fail(message: str, number: int = number) -> LedgerTampered:
            return LedgerTampered(path, number, message)

        try:
            entry = parse_entry(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            version = _version_of(raw)
            if version is not None and version != FORMAT_VERSION:
                raise fail(
                    f"format version {version}, this verifier reads {FORMAT_VERSION} (format 1 "
                    "chained whole lines; verify it with an earlier sealmoe)"
                ) from None
            raise fail(str(exc)) from None
        if entry.seq != number - 1:
            raise fail(
                f"sequence number {entry.seq} where {number - 1} belongs: an entry was deleted, "
                "inserted or moved"
            )
        if entry.prev != prev:
            raise fail(
                "prev does not match the hash of the line before: an entry before this one was "
                "edited, deleted, inserted or reordered"
            )
        if not entry_signature_ok(entry, public_key):
            raise fail(
                f"the signature does not verify under {entry.institution!r}'s identity key: "
                "the entry was edited, or signed by another key"
            )
        if line_bytes(entry) != raw:  # the chain hashes the parsed entry: keep one spelling
            raise fail("the line is not in canonical form (sorted keys, no spaces, ASCII)")
        if institution is None:
            institution = entry.institution
        if entry.institution != institution:
            raise fail(f"entry of institution {entry.institution!r} in {institution!r}'s ledger")
        if pricer is None:
            pricer = Composition(entry.delta)
        if entry.delta != pricer.delta:
            raise fail(f"delta {entry.delta:g} differs from the ledger's {pricer.delta:g}")
        try:
            event = event_from_json(entry.event, "$.event")
        except EventFormatError as exc:
            raise fail(str(exc)) from None
        if entry.kind == "release":
            key = (entry.round_id, entry.what)
            if key in released:
                raise fail(f"a second {entry.what} release under round id {entry.round_id}")
            released.add(key)
            recomputed = pricer.add(event)
        else:
            recomputed = pricer.projected([event])
        for name in ACCOUNTANTS:
            got, want = getattr(entry.epsilon, name), getattr(recomputed, name)
            if not _close(got, want):
                raise fail(
                    f"recorded {name} epsilon {got} does not follow from the recorded events "
                    f"(recomputed: {want})"
                )
        if entry.kind == "release" and entry.epsilon.of(entry.accountant) > entry.budget_epsilon * (
            1 + EPSILON_RTOL
        ):
            raise fail(
                f"a release that exceeds the budget is on record: epsilon "
                f"{entry.epsilon.of(entry.accountant):.6g} > {entry.budget_epsilon:g}"
            )
        entries.append(entry)
        prev = entry_hash(entry)
        hashes.append(prev)
    for index, kept in enumerate(heads):
        _check_head(path, index, len(heads), kept, public_key, institution, hashes)
    verified = VerifiedLedger(path, institution, tuple(entries), len(heads), prev)
    return verified, pricer


def _check_head(
    path: Path,
    index: int,
    count: int,
    head: LedgerHead,
    public_key: Ed25519PublicKey,
    institution: str | None,
    hashes: list[str],
) -> None:
    """Check the ledger (``hashes``: its chain hash after each entry) against kept head
    ``index`` of ``count``."""
    who = institution or head.institution
    which = f"head {index + 1} of {count}"
    if not head_signature_ok(head, public_key):
        raise LedgerTampered(
            path, 0, f"{who}: the coordinator's {which} (at {head.entries} entries) has a bad "
            "signature",
        )  # fmt: skip
    if institution is not None and head.institution != institution:
        raise LedgerTampered(path, 0, f"{who}: the coordinator's {which} is {head.institution!r}'s")
    if head.entries > len(hashes):
        raise LedgerTampered(
            path, 0,
            f"{who}: truncated: the coordinator holds a signed head at {head.entries} entries "
            f"({which}), the ledger has {len(hashes)}; entries {len(hashes) + 1}..{head.entries} "
            "were deleted",
        )  # fmt: skip
    at = hashes[head.entries - 1] if head.entries else GENESIS
    if at != head.last_hash.hex():
        raise LedgerTampered(
            path, head.entries,
            f"{who}: rewritten: the chain hash of this line is not the one of the coordinator's "
            f"signed head at {head.entries} entries ({which}): an entry up to here was edited, "
            "dropped or inserted, and the chain signed again",
        )  # fmt: skip
