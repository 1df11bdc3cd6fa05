"""Recompute a ledger from its file: the hash chain, every signature and every epsilon.

:func:`verify_ledger` reads a ledger line by line and raises :class:`LedgerTampered`, naming
the file, the line and what is wrong, at the first line that does not follow: a line that is
not a well-formed entry, a sequence number out of place (an entry deleted, inserted or moved),
a ``prev`` hash that does not match the line before (an entry edited, deleted, inserted or
reordered), a signature that does not verify under the institution's identity key, an epsilon
that does not follow from the recorded events, or a release recorded beyond its budget. Given
the coordinator's signed head, it also detects a ledger whose last entries were deleted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.entry import (
    FORMAT_VERSION,
    GENESIS,
    Entry,
    entry_signature_ok,
    head_signature_ok,
    line_hash,
)
from audit.events import EventFormatError, event_from_json
from privacy.budget import Composition, Epsilons
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
    """A ledger that verified: its entries and whether a coordinator head was checked too."""

    path: Path
    institution: str | None
    entries: tuple[Entry, ...]
    head_checked: bool

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
) -> VerifiedLedger:
    """Verify the ledger at ``path`` of ``institution`` (any, if None) under ``public_key``,
    and against the coordinator's ``head`` if given."""
    return replay_ledger(path, public_key, institution=institution, head=head)[0]


def replay_ledger(
    path: str | Path,
    public_key: Ed25519PublicKey,
    *,
    institution: str | None = None,
    head: LedgerHead | None = None,
) -> tuple[VerifiedLedger, Composition | None]:
    """:func:`verify_ledger`, also returning the accountants with every release composed
    (``None`` for an empty ledger), so a ledger that opens a file need not price it twice."""
    path = Path(path)
    try:
        data = path.read_bytes()
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
    prev = GENESIS
    pricer: Composition | None = None
    released: set[tuple[int, str]] = set()
    for number, raw in enumerate(lines, start=1):

        def fail(message: str, number: int = number) -> LedgerTampered:
            return LedgerTampered(path, number, message)

        try:
            entry = parse_entry(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise fail(str(exc)) from None
        if entry.version != FORMAT_VERSION:
            raise fail(f"format version {entry.version}, this verifier reads {FORMAT_VERSION}")
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
        prev = line_hash(raw)
    if head is not None:
        _check_head(path, head, public_key, institution, len(entries), lines)
    return VerifiedLedger(path, institution, tuple(entries), head is not None), pricer


def _check_head(
    path: Path,
    head: LedgerHead,
    public_key: Ed25519PublicKey,
    institution: str | None,
    count: int,
    lines: list[bytes],
) -> None:
    if not head_signature_ok(head, public_key):
        raise LedgerTampered(path, 0, "the coordinator's head for this ledger has a bad signature")
    if institution is not None and head.institution != institution:
        raise LedgerTampered(
            path, 0, f"the head is {head.institution!r}'s, the ledger {institution!r}'s"
        )
    if head.entries > count:
        raise LedgerTampered(
            path, 0,
            f"truncated: the coordinator holds a signed head at {head.entries} entries, the "
            f"ledger has {count}; entries {count + 1}..{head.entries} were deleted",
        )  # fmt: skip
    if head.entries:
        want = head.last_hash.hex()
        if line_hash(lines[head.entries - 1]) != want:
            raise LedgerTampered(
                path, head.entries,
                "this line does not hash to the coordinator's signed head: the ledger was "
                "rewritten",
            )  # fmt: skip
