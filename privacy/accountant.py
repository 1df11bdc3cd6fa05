"""Epsilon of a list of releases, and noise calibration, with dp-accounting's RDP and PLD.

Both accountants use the add-or-remove-one neighbouring relation. RDP is fast and slightly
loose; PLD is tight and slower (about a second per thousand-step evaluation), and the default:
for the same noise it certifies a smaller epsilon, so a plan calibrated under it needs less
noise for the same budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp

from privacy.errors import CalibrationError
from privacy.errors import PrivacyConfigError

PLD_DISCRETIZATION = 1e-4


PLD_SEARCH_DISCRETIZATION = 1e-3
"""PLD's grid while calibration searches (ten times faster; epsilon differs in the fifth
digit); the noise it finds is then checked, and raised if need be, at the ledger's grid."""
MAX_NOISE_MULTIPLIER = 1e4


PLD_CACHE_SIZE = 16
"""Distinct events whose PLD a process keeps: a federation repeats a handful every round, and
one PLD takes 1-15 MB."""


class RememberingPLDAccountant(pld.PLDAccountant):
    """dp-accounting's PLD accountant that builds the PLD of each distinct event once per
    process and composes the remembered one after that.

    Building a subsampled Gaussian's PLD takes a fraction of a second, and a federation
    charges the same few events (one DP-SGD run, one routing release) every round for every
    institution; composing is what must happen each time, building need not. Epsilons equal
    :class:`dp_accounting.pld.PLDAccountant`'s to float rounding (each remembered PLD was
    composed once more, with the identity). It overrides dp-accounting's ``_maybe_compose``;
    ``tests/test_dpsgd.py`` checks it against the plain accountant.
    """

    def _maybe_compose(
        self, event: dp_accounting.DpEvent, count: int, do_compose: bool
    ) -> pld.PLDAccountant.CompositionErrorDetails | None:
        if not do_compose or not _hashable(event):  # e.g. a ComposedDpEvent (a list):
            return super()._maybe_compose(event, count, do_compose)  # its parts come back here
        built = _event_pld(event, count, self._value_discretization_interval,
                           self.neighboring_relation)  # fmt: skip
        if built.error is None:
            self._pld = self._pld.compose(built.pld)
            self._contains_non_dp_event |= built.non_private
        return built.error


def _hashable(event: dp_accounting.DpEvent) -> bool:
    try:
        hash(event)
    except TypeError:
        return False
    return True


class _BuiltPLD(NamedTuple):
    pld: pld.privacy_loss_distribution.PrivacyLossDistribution
    non_private: bool
    error: pld.PLDAccountant.CompositionErrorDetails | None


@functools.lru_cache(maxsize=PLD_CACHE_SIZE)
def _event_pld(
    event: dp_accounting.DpEvent,
    count: int,
    discretization: float,
    relation: dp_accounting.NeighboringRelation,
) -> _BuiltPLD:
    """The PLD of ``count`` compositions of ``event`` alone (DpEvents are frozen, hashable)."""
    alone = pld.PLDAccountant(relation, value_discretization_interval=discretization)
    error = alone._maybe_compose(event, count, do_compose=True)
    return _BuiltPLD(alone._pld, alone._contains_non_dp_event, error)


def make_accountant(
    accountant: str, pld_discretization: float = PLD_DISCRETIZATION
) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant of the named kind ("rdp" or "pld")."""
    if accountant == "rdp":
        return rdp.RdpAccountant()
    if accountant == "pld":
        return RememberingPLDAccountant(value_discretization_interval=pld_discretization)
    raise PrivacyConfigError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")


def epsilon(
    events: Sequence[dp_accounting.DpEvent],
    delta: float,
    accountant: str = "pld",
    pld_discretization: float = PLD_DISCRETIZATION,
) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (``inf`` if unbounded)."""
    if not 0 < delta < 1:
        raise PrivacyConfigError(f"delta must be in (0, 1), got {delta!r}")
    acc = make_accountant(accountant, pld_discretization)
    for event in events:
        if not isinstance(event, dp_accounting.DpEvent):
            raise PrivacyConfigError(f"events must be DpEvent, got {type(event).__name__}")
        acc.compose(event)
    return float(acc.get_epsilon(delta))


def dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """``steps`` Poisson-sampled Gaussian mechanisms: the DpEvent of a DP-SGD run."""
    step = dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def calibrate_noise(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "pld",
    *,
    rtol: float = 1e-3,
    also: Sequence[dp_accounting.DpEvent] = (),
) -> float:
    """Smallest noise multiplier (within ``rtol``) whose DP-SGD run of ``total_steps`` steps
    at ``sample_rate``, composed with the fixed releases ``also`` (e.g. the routing statistics
    of every planned round), stays within (``target_epsilon``, ``target_delta``).

    Conservative: the returned sigma always satisfies the target under ``accountant``.
    ``total_steps`` is the plan for ALL rounds, so each round's release fits the budget.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyConfigError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    if not 0 < target_delta < 1:
        raise PrivacyConfigError(f"target_delta must be in (0, 1), got {target_delta!r}")
    if not 0 < sample_rate <= 1:
        raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise PrivacyConfigError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not 0 < rtol < 1:
        raise PrivacyConfigError(f"rtol must be in (0, 1), got {rtol!r}")

    also = list(also)
    if also:
        fixed = epsilon(also, target_delta, accountant)
        if fixed >= target_epsilon:
            raise CalibrationError(
                f"the fixed releases alone spend epsilon={fixed:.4g} of the {target_epsilon} "
                f"budget at delta={target_delta}; give them more noise or plan fewer rounds"
            )

    def eps(sigma: float, grid: float = PLD_SEARCH_DISCRETIZATION) -> float:
        run = dp_sgd_event(sigma, sample_rate, total_steps)
        return epsilon([run, *also], target_delta, accountant, grid)

    if accountant == "rdp":
        high = 1.0
    else:  # start from the (looser, fast) RDP answer: PLD is usually feasible there already
        high = calibrate_noise(
            target_epsilon, target_delta, sample_rate, total_steps, "rdp", rtol=rtol, also=also
        )
    while eps(high) > target_epsilon:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise CalibrationError(
                f"no noise multiplier <= {MAX_NOISE_MULTIPLIER:g} reaches epsilon="
                f"{target_epsilon} at delta={target_delta} over {total_steps} steps "
                f"with sample_rate={sample_rate}; raise the budget or plan fewer steps"
            )
    low = high / 2
    while eps(low) <= target_epsilon:
        high, low = low, low / 2
    while high - low > rtol * high:
        mid = (low + high) / 2
        if eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    while eps(high, PLD_DISCRETIZATION) > target_epsilon:  # the ledger prices at this grid
        high *= 1 + rtol
    return high
