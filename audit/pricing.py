"""Epsilon of a ledger's releases under both accountants, RDP and PLD, composed incrementally.

Both use dp-accounting with the add-or-remove-one neighbouring relation
(:func:`privacy.make_accountant`). Each entry records the pair; the budget is enforced with the
institution's chosen accountant, and reports show both where they differ.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import dp_accounting
import msgspec

from privacy import make_accountant

ACCOUNTANTS = ("rdp", "pld")


class Epsilons(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Epsilon at the ledger's delta under each accountant (``None``: unbounded)."""

    rdp: float | None
    pld: float | None

    def of(self, accountant: str) -> float:
        """The value of ``accountant`` (``inf`` when unbounded)."""
        value = getattr(self, accountant)
        return math.inf if value is None else value


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class Pricer:
    """Running RDP and PLD accountants over every event added so far."""

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self._accountants = {name: make_accountant(name) for name in ACCOUNTANTS}
        self._current = Epsilons(rdp=0.0, pld=0.0)

    @property
    def current(self) -> Epsilons:
        """Epsilon of everything added (0 for nothing)."""
        return self._current

    def add(self, event: dp_accounting.DpEvent) -> Epsilons:
        """Compose ``event`` into the running total; the new total."""
        for accountant in self._accountants.values():
            accountant.compose(event)
        self._current = self._epsilons(self._accountants)
        return self._current

    def fork(self) -> Pricer:
        """An independent copy (to price releases without committing to them)."""
        twin = Pricer.__new__(Pricer)
        twin.delta = self.delta
        twin._accountants = copy.deepcopy(self._accountants)
        twin._current = self._current
        return twin

    def projected(self, events: Sequence[dp_accounting.DpEvent]) -> Epsilons:
        """The total if ``events`` were added too (this pricer is left as it is)."""
        trial = self.fork()
        for event in events:
            trial.add(event)
        return trial.current

    def _epsilons(self, accountants: dict[str, dp_accounting.PrivacyAccountant]) -> Epsilons:
        values = {name: _finite(acc.get_epsilon(self.delta)) for name, acc in accountants.items()}
        return Epsilons(**values)
