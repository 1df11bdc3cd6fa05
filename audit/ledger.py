"""An institution's privacy ledger: append-only, hash-chained, signed, written ahead of releases.

:class:`Ledger` is the one front door. ``charge(releases)`` prices the releases of one round
together with everything already recorded; if they fit the (epsilon, delta) budget it appends one
signed entry per release and returns only once the lines are on disk (fsync), so the caller
sends them afterwards: a crash in between leaves the budget charged, never a release
uncharged. If they do not fit, or a release of that kind is already recorded under the round
id (a restarted institution must not release a second, freshly noised copy), it appends one
signed refusal entry and raises :class:`privacy.BudgetExceeded` or
:class:`privacy.AlreadyReleased`. ``check(releases)`` is the same screen without charging
(used before training, so a round that cannot be released is not trained for).

Opening a ledger verifies what is already there (:func:`audit.verify.verify_ledger` under the
institution's own key) and drops a torn last line: its write never finished, so its release
was never sent.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import dp_accounting
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit.entry import FORMAT_VERSION
from audit.entry import GENESIS
from audit.entry import Entry
from audit.entry import entry_digest
from audit.entry import entry_hash
from audit.entry import line_bytes
from audit.entry import sign_entry
from audit.entry import sign_head
from audit.events import event_to_json
from audit.verify import LedgerTampered
from audit.verify import replay_ledger
from privacy import AlreadyReleased
from privacy import Release
from privacy.budget import Composition
from privacy.budget import Epsilons
from privacy.budget import PrivacyBudget
from privacy.config import ACCOUNTANTS
from privacy.errors import UserError
from privacy.head import MAX_PROOF
from privacy.head import LedgerHead

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.jsonl"


class LedgerError(UserError):
    """The ledger cannot be opened or used (the message names the file and what to do)."""


def ledger_path(run_dir: str | Path, institution: str) -> Path:
    """Where institution ``institution`` keeps its ledger in a run directory."""
    return Path(run_dir) / "institutions" / institution / LEDGER_FILE


class Ledger:
    """The ledger of ``institution`` at ``path``, signing with its Ed25519 ``identity`` key.

    ``budget_epsilon`` at ``delta`` is the budget for the whole run, enforced with
    ``accountant`` ("rdp" or "pld"); every entry records both accountants' epsilon.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        institution: str,
        identity: Ed25519PrivateKey,
        budget_epsilon: float,
        delta: float,
        accountant: str,
    ) -> None:
        if not (math.isfinite(budget_epsilon) and budget_epsilon > 0):
            raise LedgerError(f"budget_epsilon must be finite and > 0, got {budget_epsilon!r}")
        if not 0 < delta < 1:
            raise LedgerError(f"delta must be in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise LedgerError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.path = Path(path)
        self.institution = institution
        self.budget_epsilon = float(budget_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self._identity = identity
        self._budget = PrivacyBudget(self.budget_epsilon, self.delta, accountant)
        self._entries: list[Entry] = []
        self._last_hash = GENESIS
        self._digests: list[bytes] = []  # of every entry, for the heads' proofs
        self._released: set[tuple[int, str]] = set()
        self._screened: tuple[tuple, Composition, list[Epsilons]] | None = None
        self._load()

    # ------------------------------------------------------------------------------ reading

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            log.warning("%s: dropping an incomplete last entry (never released)", self.path)
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
                os.fsync(f.fileno())
        try:
            verified, spent = replay_ledger(self.path, self._identity.public_key())
        except LedgerTampered as exc:
            raise LedgerError(
                f"{exc}; the ledger does not verify, so this institution will not add to it "
                "(restore it from a backup, or start a new run directory)"
            ) from None
        if verified.institution not in (None, self.institution):
            raise LedgerError(f"{self.path} is {verified.institution!r}'s ledger")
        if verified.entries and verified.entries[0].delta != self.delta:
            raise LedgerError(
                f"{self.path} accounts at delta={verified.entries[0].delta:g}, the config says "
                f"{self.delta:g}; keep delta fixed for a run"
            )
        if spent is not None:
            self._budget = PrivacyBudget(self.budget_epsilon, self.delta, self.accountant, spent)
        self._entries = list(verified.entries)
        self._released = {(e.round_id, e.what) for e in self._entries if e.kind == "release"}
        self._digests = [entry_digest(e) for e in self._entries]
        self._last_hash = verified.last_hash

    @property
    def entries(self) -> tuple[Entry, ...]:
        """Every entry, oldest first."""
        return tuple(self._entries)

    def epsilons(self) -> Epsilons:
        """Cumulative epsilon of every recorded release under both accountants."""
        return self._budget.epsilons()

    def spent(self) -> float:
        """Cumulative epsilon under the enforcing accountant (0 when nothing was released)."""
        return self._budget.spent()

    def remaining(self) -> float:
        """Budget left (never negative)."""
        return self._budget.remaining()

    def has(self, round_id: int, what: str) -> bool:
        """Whether a ``what`` release under ``round_id`` is on record."""
        return (round_id, what) in self._released

    def head(self) -> LedgerHead:
        """A freshly signed head for the coordinator: entry count and last entry hash, with the
        digests of the last entries (up to :data:`privacy.head.MAX_PROOF`) as its proof.

        The institution cannot know which of its heads reached the coordinator (none is
        acknowledged), so every head proves as far back as the bound allows: a head lost on
        the way costs nothing as long as fewer than ``MAX_PROOF`` entries were added since the
        last one that arrived."""
        return sign_head(
            self.institution, len(self._entries), self._last_hash, self._identity,
            self._digests[-MAX_PROOF:],
        )  # fmt: skip

    # ------------------------------------------------------------------------------ writing

    def check(self, releases: Sequence[Release]) -> None:
        """Refuse (recording the refusal, then raising) releases that ``charge`` would refuse."""
        self._screen(list(releases))

    def charge(self, releases: Sequence[Release]) -> tuple[Entry, ...]:
        """Record ``releases`` (one round's, released together) on disk before they are sent.

        Raises :class:`privacy.BudgetExceeded` or :class:`privacy.AlreadyReleased` after
        recording a refusal entry, with nothing charged.
        """
        releases = list(releases)
        trial, after = self._screen(releases)
        now = time.time()
        written = self._append(
            [
                self._entry("release", r, r.what, r.event, dict(r.parameters), eps, None, now)
                for r, eps in zip(releases, after, strict=True)
            ]
        )
        self._budget.commit(trial)
        self._released.update((r.round_id, r.what) for r in releases)
        return tuple(written)

    def _screen(self, releases: list[Release]) -> tuple[Composition, list[Epsilons]]:
        """The composition with ``releases`` added and the total after each; or record a refusal
        and raise."""
        if not releases:
            raise LedgerError("nothing to charge: pass the releases of the round")
        rounds = {(r.federation_round, r.round_id) for r in releases}
        if len(rounds) != 1:
            raise LedgerError(f"releases charged together must share one round, got {rounds}")
        kinds = [r.what for r in releases]
        if len(set(kinds)) != len(kinds):
            raise LedgerError(f"two releases of one kind in one round: {kinds}")
        key = (len(self._entries), tuple(r.event for r in releases))
        if self._screened is not None and self._screened[0] == key:
            _, trial, after = self._screened  # priced by check() before training: reuse
            trial = trial.fork()
        else:
            trial, after = self._budget.price([r.event for r in releases])
            self._screened = (key, trial.fork(), after)
        projected = after[-1]
        repeated = [r.what for r in releases if self.has(r.round_id, r.what)]
        refusal: Exception | None = None
        if repeated:
            refusal = AlreadyReleased(
                f"round id {releases[0].round_id} already has a {', '.join(repeated)} release "
                "on record; a second release in the same round would be uncharged"
            )
        elif self._budget.exceeds(projected):
            refusal = self._budget.refusal(projected)
        if refusal is None:
            return trial, after
        event = (
            releases[0].event
            if len(releases) == 1
            else dp_accounting.ComposedDpEvent([r.event for r in releases])
        )
        parameters = {r.what: dict(r.parameters) for r in releases}
        entry = self._entry(
            "refusal", releases[0], "+".join(kinds), event, parameters, projected,
            str(refusal), time.time(),
        )  # fmt: skip
        self._append([entry])
        raise refusal

    def _entry(
        self,
        kind: str,
        release: Release,
        what: str,
        event: dp_accounting.DpEvent,
        parameters: dict,
        epsilon: Epsilons,
        reason: str | None,
        now: float,
    ) -> Entry:
        return Entry(
            version=FORMAT_VERSION,
            seq=0,
            prev=GENESIS,
            institution=self.institution,
            kind=kind,  # type: ignore[arg-type]
            federation_round=release.federation_round,
            round_id=release.round_id,
            what=what,
            event=event_to_json(event),
            parameters=parameters,
            delta=self.delta,
            budget_epsilon=self.budget_epsilon,
            accountant=self.accountant,  # type: ignore[arg-type]
            epsilon=epsilon,
            reason=reason,
            time=now,
        )

    def _append(self, entries: list[Entry]) -> list[Entry]:
        """Chain, sign and write ``entries`` in one write, then fsync (file and, if new, folder)."""
        lines: list[bytes] = []
        chained: list[Entry] = []
        prev, seq = self._last_hash, len(self._entries)
        for entry in entries:
            signed = sign_entry(msgspec.structs.replace(entry, seq=seq, prev=prev), self._identity)
            lines.append(line_bytes(signed))
            chained.append(signed)
            prev, seq = entry_hash(signed), seq + 1
        new_file = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.write(b"".join(line + b"\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        if new_file:
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        self._entries.extend(chained)
        self._digests.extend(entry_digest(e) for e in chained)
        self._last_hash = prev
        return chained
