"""An empirical privacy audit in one training run (Steinke, Nasr and Jagielski, 2023).

:func:`canary_audit` trains with the project's real DP-SGD path (:func:`privacy.make_private`,
Opacus) at given (noise multiplier, sampling rate, steps) on a set of ``m`` canaries, each put
into the training set independently with probability 1/2. Canary i is the input that only
touches weight i of a linear model (a one-hot input in the audit's white-box setting, the
strongest for DP-SGD with clipping), so the trained weight i is the auditor's score for "canary
i was in". The auditor guesses "in" for the ``r/2`` highest scores and "out" for the ``r/2``
lowest and abstains on the rest; :func:`epsilon_lower_bound` turns the number of correct guesses
into a lower bound on epsilon that holds with the given confidence for any (epsilon, delta)-DP
training (their Theorem 3 with the delta term of their Appendix D). It is printed next to the
accountant's upper bound for the same training.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

from privacy import DPConfig
from privacy import dp_sgd_event
from privacy import epsilon
from privacy import make_private
from privacy.errors import UserError

DEFAULT_CONFIDENCE = 0.95


class AuditError(UserError, ValueError):
    """Bad audit parameters (the message names the parameter)."""


def _log_binomial_pmf(r: int, q: float) -> np.ndarray:
    k = np.arange(r + 1)
    log_choose = np.array([math.lgamma(r + 1) - math.lgamma(i + 1) - math.lgamma(r - i + 1)
                           for i in k])  # fmt: skip
    with np.errstate(divide="ignore"):
        return log_choose + k * np.log(q) + (r - k) * np.log1p(-q)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of at least ``v`` correct guesses out of ``r`` (``m`` canaries) if training
    were (eps, delta)-DP; small values refute that guarantee."""
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomised response
    pmf = np.exp(_log_binomial_pmf(r, q))
    tail = float(pmf[v:].sum())
    if delta == 0 or v == 0:
        return min(1.0, tail)
    below = np.cumsum(pmf[v - 1 :: -1])  # P[v - i <= Bin < v] for i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + alpha * delta * 2 * m)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = DEFAULT_CONFIDENCE
) -> float:
    """The largest epsilon that ``v`` correct guesses of ``r`` refute at ``confidence`` (0 if
    none): no (epsilon, delta)-DP training with a smaller epsilon gets so many right so often."""
    if not 0 <= v <= r <= m:
        raise AuditError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    if not 0 < confidence < 1:
        raise AuditError(f"confidence must be in (0, 1), got {confidence!r}")
    level = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, high * 2
    for _ in range(50):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < level:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class AuditResult:
    """What one canary audit found, with the accountant's upper bound for the same training."""

    label: str
    canaries: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_lower_bound: float
    epsilon_upper_bound: float
    method: str = (
        "Steinke, Nasr and Jagielski 2023 (one training run), white-box one-hot canaries, "
        "DP-SGD through Opacus"
    )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def canary_audit(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    *,
    delta: float,
    canaries: int = 1000,
    guesses: int | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    max_grad_norm: float = 1.0,
    label: str = "DP-SGD",
    seed: int | None = None,
) -> AuditResult:
    """Train once with DP-SGD at these settings on random canaries; the audit's outcome.

    ``guesses`` (default ``canaries // 5``) is fixed before training, as the bound requires.
    ``seed`` fixes canary inclusion and sampling (tests only); by default both come from
    ``os.urandom``. The DP-SGD noise is never seeded (:mod:`privacy.noise`).
    """
    if canaries < 2:
        raise AuditError(f"canaries must be >= 2, got {canaries}")
    guesses = canaries // 5 if guesses is None else guesses
    if not 2 <= guesses <= canaries or guesses % 2:
        raise AuditError(f"guesses must be even and in [2, {canaries}], got {guesses}")
    if not 0 < sample_rate <= 1:
        raise AuditError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little") if seed is None else seed)
    included = rng.random(canaries) < 0.5
    members = np.flatnonzero(included)
    # Training set: the included canaries plus filler examples on one extra coordinate, as many
    # as make the batch size hit the requested sampling rate.
    filler = max(canaries, len(members))
    n = len(members) + filler
    batch_size = max(1, round(sample_rate * n))
    inputs = torch.zeros(n, canaries + 1)
    inputs[torch.arange(len(members)), torch.as_tensor(members)] = 10.0 * max_grad_norm
    inputs[len(members) :, canaries] = 1.0
    model = nn.Linear(canaries + 1, 1, bias=False)
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(inputs), batch_size=batch_size)
    dp = DPConfig(target_epsilon=1.0, target_delta=delta, max_grad_norm=max_grad_norm,
                  noise_multiplier=noise_multiplier)  # fmt: skip
    torch_seed = None if seed is None else int(rng.integers(1 << 62))
    with make_private(model, optimizer, loader, dp, seed=torch_seed) as training:
        batches = training.batches()
        for _ in range(steps):
            (x,) = next(batches)
            training.step(None if len(x) == 0 else -model(x).squeeze(-1))
        actual_rate = training.sample_rate
    scores = model.weight.detach()[0, :canaries].numpy()
    order = np.argsort(scores)
    half = guesses // 2
    correct = int(included[order[-half:]].sum() + (~included[order[:half]]).sum())
    lower = epsilon_lower_bound(canaries, guesses, correct, delta, confidence)
    upper = epsilon([dp_sgd_event(noise_multiplier, actual_rate, steps)], delta)
    return AuditResult(
        label=label, canaries=canaries, guesses=guesses, correct=correct,
        confidence=confidence, delta=delta, noise_multiplier=noise_multiplier,
        sample_rate=actual_rate, steps=steps, epsilon_lower_bound=lower,
        epsilon_upper_bound=upper,
    )  # fmt: skip
