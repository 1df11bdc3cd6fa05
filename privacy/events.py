"""Immutable descriptions of what a DP mechanism released, as dp-accounting ``DpEvent`` s.

The description is kept apart from the accounting math (:mod:`privacy.accountant`) so a ledger
can store the facts, and anyone can recompute epsilon from them later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting

from privacy.accountant import dp_sgd_event
from privacy.accountant import epsilon
from privacy.errors import PrivacyConfigError
from privacy.release import ADAPTER_UPDATE
from privacy.release import Release


@dataclass(frozen=True)
class DPTrainingFacts:
    """One local DP-SGD run: ``steps`` Poisson-sampled Gaussian releases.

    Each step samples every record independently with probability ``sample_rate``, clips each
    per-sample gradient to L2 norm ``max_grad_norm`` and adds N(0, (noise_multiplier *
    max_grad_norm)^2) noise to their sum. ``delta`` is the delta at which epsilon is reported.
    Neighbouring relation: add or remove one record (one training block).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "max_grad_norm", "delta"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise PrivacyConfigError(f"{name} must be finite and > 0, got {value!r}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise PrivacyConfigError(f"steps must be an int >= 0, got {self.steps!r}")
        if self.delta >= 1:
            raise PrivacyConfigError(f"delta must be < 1, got {self.delta!r}")

    def dp_event(self) -> dp_accounting.DpEvent:
        """The release as a dp-accounting event (composition of ``steps`` sampled Gaussians)."""
        if self.steps == 0:
            return dp_accounting.NoOpDpEvent()
        return dp_sgd_event(self.noise_multiplier, self.sample_rate, self.steps)

    def epsilon(self, accountant: str = "pld") -> float:
        """Epsilon of this run alone at ``delta``."""
        return epsilon([self.dp_event()], self.delta, accountant)

    def release(self, federation_round: int, round_id: int) -> Release:
        """This run as the adapter-update :class:`~privacy.release.Release` of a round."""
        return Release(
            federation_round=federation_round,
            round_id=round_id,
            what=ADAPTER_UPDATE,
            event=self.dp_event(),
            parameters={
                "mechanism": "DP-SGD: Poisson sampling, per-sample clipping, Gaussian noise",
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
                "steps": self.steps,
                "max_grad_norm": self.max_grad_norm,
            },
        )
