"""A minimal write-ahead privacy-budget ledger of one institution (until the audit ledger).

Every release is appended as one JSON line and forced to disk BEFORE it is sent, so a crash
between the two can only over-count spending, never under-count it. A release that would take
the institution past its (epsilon, delta) budget is refused with :class:`BudgetExceeded` and
leaves no trace. Entries are keyed by the round id of the release: charging the same round id
again (e.g. after a restart) is a no-op, so one release is never charged twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from clients.durable import append_line
from privacy import DPTrainingFacts, epsilon

log = logging.getLogger(__name__)


class BudgetError(Exception):
    """Base of the ledger's errors."""


class BudgetExceeded(BudgetError):
    """Charging a release would exceed the institution's privacy budget."""

    def __init__(self, spent: float, projected: float, budget: float, delta: float) -> None:
        self.spent, self.projected, self.budget, self.delta = spent, projected, budget, delta
        super().__init__(
            f"privacy budget exhausted: spent epsilon={spent:.4g}, this release would bring it "
            f"to {projected:.4g}, budget is epsilon={budget:.4g} at delta={delta:g}"
        )


class AlreadyReleased(BudgetError):
    """This round id already has a recorded release; releasing again would go uncharged."""


class LedgerFileError(BudgetError, ValueError):
    """The ledger file cannot be read back (the message names the file and line)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded release: a DP-SGD run of ``steps`` steps, and epsilon spent after it."""

    federation_round: int
    round_id: int
    what: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    epsilon_after: float
    timestamp: float

    def facts(self, delta: float) -> DPTrainingFacts:
        """The release as :class:`privacy.DPTrainingFacts` at ``delta``."""
        return DPTrainingFacts(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            max_grad_norm=self.max_grad_norm,
            delta=delta,
        )


class BudgetLedger:
    """Append-only JSON-lines ledger at ``path``; reloads what is already there.

    ``budget_epsilon`` at ``delta`` is the institution's total budget; ``accountant`` ("rdp" or
    "pld") prices the composition of all recorded releases.
    """

    def __init__(
        self, path: str | os.PathLike[str], budget_epsilon: float, delta: float, accountant: str
    ) -> None:
        if not (math.isfinite(budget_epsilon) and budget_epsilon > 0):
            raise BudgetError(f"budget_epsilon must be finite and > 0, got {budget_epsilon!r}")
        if not 0 < delta < 1:
            raise BudgetError(f"delta must be in (0, 1), got {delta!r}")
        self.path = Path(path)
        self.budget_epsilon = float(budget_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self._entries: dict[int, LedgerEntry] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            # a torn last line: its write never finished, so its release was never sent
            log.warning("%s: dropping an incomplete last entry", self.path)
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
                os.fsync(f.fileno())
        for number, line in enumerate(
            complete.decode("utf-8", errors="replace").splitlines(), start=1
        ):
            if not line.strip():
                continue
            try:
                entry = LedgerEntry(**json.loads(line))
            except (ValueError, TypeError) as exc:
                raise LedgerFileError(f"{self.path}:{number}: not a ledger entry: {exc}") from None
            self._entries.setdefault(entry.round_id, entry)

    @property
    def entries(self) -> list[LedgerEntry]:
        """Recorded releases, oldest first."""
        return list(self._entries.values())

    def has(self, round_id: int) -> bool:
        """Whether a release of ``round_id`` is already recorded."""
        return round_id in self._entries

    def spent(self) -> float:
        """Epsilon at ``delta`` of every recorded release together (0 when none)."""
        return self._epsilon([e.facts(self.delta) for e in self._entries.values()])

    def remaining(self) -> float:
        """Budget left (may be 0, never negative)."""
        return max(0.0, self.budget_epsilon - self.spent())

    def projected_epsilon(self, facts: DPTrainingFacts) -> float:
        """Epsilon after every recorded release plus the release ``facts``."""
        recorded = [e.facts(self.delta) for e in self._entries.values()]
        return self._epsilon([*recorded, self._at_delta(facts)])

    def charge(
        self, federation_round: int, round_id: int, facts: DPTrainingFacts, what: str = "dp-sgd"
    ) -> LedgerEntry:
        """Record the release of ``round_id`` on disk (fsync), before the caller sends it.

        Raises :class:`AlreadyReleased` when ``round_id`` already has a release on record (an
        institution that restarted mid-round must not release a second, freshly noised update
        under the same charge), and :class:`BudgetExceeded`, recording nothing, when the release
        would exceed the budget.
        """
        if round_id in self._entries:
            raise AlreadyReleased(
                f"round id {round_id} already has a release on record; a second release in the "
                "same round would be uncharged"
            )
        projected = self.projected_epsilon(facts)
        if projected > self.budget_epsilon:
            raise BudgetExceeded(self.spent(), projected, self.budget_epsilon, self.delta)
        entry = LedgerEntry(
            federation_round=federation_round,
            round_id=round_id,
            what=what,
            noise_multiplier=facts.noise_multiplier,
            sample_rate=facts.sample_rate,
            steps=facts.steps,
            max_grad_norm=facts.max_grad_norm,
            epsilon_after=projected,
            timestamp=time.time(),
        )
        append_line(self.path, json.dumps(asdict(entry), sort_keys=True))
        self._entries[round_id] = entry
        return entry

    def _at_delta(self, facts: DPTrainingFacts) -> DPTrainingFacts:
        if facts.delta == self.delta:
            return facts
        return DPTrainingFacts(
            facts.noise_multiplier, facts.sample_rate, facts.steps, facts.max_grad_norm, self.delta
        )

    def _epsilon(self, releases: list[DPTrainingFacts]) -> float:
        if not releases:
            return 0.0
        return epsilon([r.dp_event() for r in releases], self.delta, self.accountant)
