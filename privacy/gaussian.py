"""The Gaussian mechanism on a vector of bounded L2 sensitivity (e.g. routing statistics).

Noise of standard deviation ``noise_multiplier * l2_sensitivity`` on every coordinate makes the
release a dp-accounting ``GaussianDpEvent(noise_multiplier)`` (that event assumes sensitivity 1,
so the multiplier is in units of the sensitivity). When the vector is computed on a Poisson
sample of the records (each in independently with probability ``sample_rate``, coins from
:func:`poisson_sample`), the release is ``PoissonSampledDpEvent(sample_rate, ...)`` of it and
gains amplification by subsampling. The noise and the coins come from :mod:`privacy.noise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
import numpy as np

from privacy.errors import PrivacyConfigError
from privacy.noise import gaussian_array
from privacy.noise import uniform
from privacy.release import Release


@dataclass(frozen=True)
class GaussianMechanism:
    """Adds N(0, (noise_multiplier * l2_sensitivity)^2) to each value; ``what`` it releases.

    ``sample_rate`` < 1: the caller computes the values on :func:`poisson_sample` of its records
    at that rate (the accounting assumes it)."""

    noise_multiplier: float
    l2_sensitivity: float
    what: str
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "l2_sensitivity", "sample_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PrivacyConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise PrivacyConfigError(f"{name} must be finite and > 0, got {value!r}")
        if self.sample_rate > 1:
            raise PrivacyConfigError(f"sample_rate must be <= 1, got {self.sample_rate!r}")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate."""
        return self.noise_multiplier * self.l2_sensitivity

    def dp_event(self) -> dp_accounting.DpEvent:
        """One application, as a dp-accounting event."""
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sample_rate == 1:
            return gaussian
        return dp_accounting.PoissonSampledDpEvent(self.sample_rate, gaussian)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """``values`` (float64) plus fresh Gaussian noise (:mod:`privacy.noise`)."""
        values = np.asarray(values, dtype=np.float64)
        return values + gaussian_array(values.shape, self.noise_std)

    def release(self, federation_round: int, round_id: int, sensitivity_basis: str) -> Release:
        """One application in a round as a :class:`~privacy.release.Release`.

        ``sensitivity_basis`` says, in words, why one unit of privacy moves the released vector
        by at most ``l2_sensitivity`` (it goes into the ledger and the report).
        """
        return Release(
            federation_round=federation_round,
            round_id=round_id,
            what=self.what,
            event=self.dp_event(),
            parameters={
                "mechanism": "Gaussian mechanism"
                + ("" if self.sample_rate == 1 else " on a Poisson sample of the records"),
                "sample_rate": self.sample_rate,
                "noise_multiplier": self.noise_multiplier,
                "l2_sensitivity": self.l2_sensitivity,
                "noise_std": self.noise_std,
                "sensitivity_basis": sensitivity_basis,
            },
        )


def poisson_sample(count: int, sample_rate: float) -> np.ndarray:
    """Which of ``count`` records a Poisson sample at ``sample_rate`` takes (a boolean mask),
    each independently; the coins come from a CSPRNG (:func:`privacy.noise.uniform`)."""
    if not 0 < sample_rate <= 1:
        raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return uniform(count) < sample_rate
