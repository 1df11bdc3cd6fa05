"""The empirical privacy audit: its epsilon lower bound, and canaries in a real DP-SGD run."""

from __future__ import annotations

import logging

import pytest

from audit.empirical import AuditError
from audit.empirical import canary_audit
from audit.empirical import epsilon_lower_bound
from audit.empirical import p_value


@pytest.fixture(autouse=True)
def quiet_absl():
    logging.getLogger("absl").setLevel(logging.ERROR)


def test_the_lower_bound_grows_with_correct_guesses_and_vanishes_at_chance():
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in (100, 110, 150, 180, 200)]
    assert bounds[0] == 0.0 and bounds[1] == 0.0  # chance level refutes nothing
    assert 0 < bounds[2] < bounds[3] < bounds[4]
    # at the bound, the guesses are exactly at the edge of the confidence level
    eps = bounds[3]
    assert p_value(1000, 200, 180, eps, 1e-5) == pytest.approx(0.05, rel=1e-3)
    # a larger delta explains more luck, so it refutes less
    assert epsilon_lower_bound(1000, 200, 180, 1e-3) < eps
    with pytest.raises(AuditError, match="correct <= guesses"):
        epsilon_lower_bound(10, 5, 6, 1e-5)


def test_canaries_give_a_positive_bound_below_the_accountant_for_weak_privacy():
    weak = canary_audit(0.5, 0.1, 50, delta=1e-5, canaries=1000, seed=7)
    assert weak.sample_rate == pytest.approx(0.1, rel=0.01)
    assert weak.correct > 0.8 * weak.guesses
    assert 1.0 < weak.epsilon_lower_bound < weak.epsilon_upper_bound


def test_canaries_give_a_bound_near_zero_for_strong_privacy():
    # The noise is never seeded: at this confidence a correct DP-SGD run puts the lower bound
    # above the accountant's upper bound with probability at most 1e-6.
    strong = canary_audit(8.0, 0.1, 50, delta=1e-5, canaries=1000, confidence=1 - 1e-6, seed=7)
    assert strong.epsilon_upper_bound < 0.5
    assert strong.epsilon_lower_bound <= strong.epsilon_upper_bound
