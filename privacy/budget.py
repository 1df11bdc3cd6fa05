"""The one budget object: compose releases, refuse one that would exceed, calibrate the plan.

An institution's (epsilon, delta) budget is enforced under one accountant; every charged
release is composed under both RDP and PLD (:class:`Composition`) so reports can show both.
The audit ledger, the institution runtime and the in-process simulation all price releases
and calibrate DP-SGD through this module, so a release the simulation accepts is one the
ledger accepts too.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence

import dp_accounting
import msgspec

from privacy.accountant import make_accountant
from privacy.config import ACCOUNTANTS
from privacy.config import DPConfig
from privacy.errors import BudgetExceeded
from privacy.errors import PrivacyConfigError


class Epsilons(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Epsilon at the budget's delta under each accountant (``None``: unbounded)."""

    rdp: float | None
    pld: float | None

    def of(self, accountant: str) -> float:
        """The value of ``accountant`` (``inf`` when unbounded)."""
        value = getattr(self, accountant)
        return math.inf if value is None else value


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class Composition:
    """Running RDP and PLD accountants over every event added so far, at one delta."""

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
        values = {
            name: _finite(acc.get_epsilon(self.delta)) for name, acc in self._accountants.items()
        }
        self._current = Epsilons(**values)
        return self._current

    def fork(self) -> Composition:
        """An independent copy (to price releases without committing to them)."""
        twin = Composition.__new__(Composition)
        twin.delta = self.delta
        twin._accountants = copy.deepcopy(self._accountants)
        twin._current = self._current
        return twin

    def projected(self, events: Sequence[dp_accounting.DpEvent]) -> Epsilons:
        """The total if ``events`` were added too (this composition is left as it is)."""
        trial = self.fork()
        for event in events:
            trial.add(event)
        return trial.current


class PrivacyBudget:
    """An (epsilon, delta) budget enforced under ``accountant``, and what was charged to it.

    :meth:`price` says what releases would bring the total to without committing;
    :meth:`charge` commits them, or raises :class:`~privacy.BudgetExceeded` with nothing
    charged. ``spent`` may carry a composition replayed from a ledger on disk.
    """

    def __init__(
        self,
        epsilon: float,
        delta: float,
        accountant: str = "pld",
        spent: Composition | None = None,
    ) -> None:
        if accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise PrivacyConfigError(f"epsilon must be finite and > 0, got {epsilon!r}")
        if spent is not None and spent.delta != delta:
            raise PrivacyConfigError(
                f"the spent composition is at delta={spent.delta:g}, not {delta:g}"
            )
        self.epsilon, self.delta, self.accountant = epsilon, delta, accountant
        self._spent = spent if spent is not None else Composition(delta)

    def spent(self) -> float:
        """Epsilon of everything charged, under the enforcing accountant."""
        return self._spent.current.of(self.accountant)

    def epsilons(self) -> Epsilons:
        """Epsilon of everything charged, under both accountants."""
        return self._spent.current

    def remaining(self) -> float:
        """Budget left (never negative)."""
        return max(0.0, self.epsilon - self.spent())

    def price(self, events: Sequence[dp_accounting.DpEvent]) -> tuple[Composition, list[Epsilons]]:
        """What charging ``events`` in order would give: the new composition and the total
        after each event (nothing is committed)."""
        trial = self._spent.fork()
        return trial, [trial.add(event) for event in events]

    def exceeds(self, total: Epsilons) -> bool:
        """Whether ``total`` is beyond the budget under the enforcing accountant."""
        return total.of(self.accountant) > self.epsilon

    def would_exceed(self, events: Sequence[dp_accounting.DpEvent]) -> bool:
        """Whether charging ``events`` would take the total beyond the budget."""
        return self.exceeds(self._spent.projected(events))

    def refusal(self, total: Epsilons) -> BudgetExceeded:
        """The error that refuses a release bringing the total to ``total``."""
        return BudgetExceeded(self.spent(), total.of(self.accountant), self.epsilon, self.delta)

    def commit(self, trial: Composition) -> None:
        """Take a composition from :meth:`price` as the new total."""
        self._spent = trial

    def charge(self, events: Sequence[dp_accounting.DpEvent]) -> list[Epsilons]:
        """Charge ``events`` together; the total after each. Raises
        :class:`~privacy.BudgetExceeded` (nothing charged) if they would exceed the budget."""
        trial, after = self.price(events)
        if after and self.exceeds(after[-1]):
            raise self.refusal(after[-1])
        self.commit(trial)
        return after


def plan_dp_sgd(
    dp: DPConfig,
    *,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    per_round: Sequence[dp_accounting.DpEvent] = (),
) -> DPConfig:
    """``dp`` with the noise multiplier that spends its budget over the whole plan: ``rounds``
    rounds of ``steps_per_round`` DP-SGD steps at ``sample_rate``, composed with ``rounds``
    of each release in ``per_round`` (the other releases a round makes)."""
    also = tuple(dp_accounting.SelfComposedDpEvent(event, rounds) for event in per_round)
    return _calibrated(dp, sample_rate, rounds * steps_per_round, also)


@functools.lru_cache(maxsize=64)
def _calibrated(
    dp: DPConfig, sample_rate: float, total_steps: int, also: tuple[dp_accounting.DpEvent, ...]
) -> DPConfig:
    """Remembered: institutions and runs with one plan share it (the search composes the
    whole plan many times)."""
    return dp.calibrated(sample_rate=sample_rate, total_steps=total_steps, also=also)
