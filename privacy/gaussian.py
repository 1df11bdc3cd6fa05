"""The Gaussian mechanism on a vector of bounded L2 sensitivity (e.g. routing statistics).

Noise of standard deviation ``noise_multiplier * l2_sensitivity`` on every coordinate makes the
release a dp-accounting ``GaussianDpEvent(noise_multiplier)`` (that event assumes sensitivity 1,
so the multiplier is in units of the sensitivity). The noise comes from :mod:`privacy.noise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
import numpy as np

from privacy.errors import PrivacyConfigError
from privacy.noise import gaussian_array
from privacy.release import Release


@dataclass(frozen=True)
class GaussianMechanism:
    """Adds N(0, (noise_multiplier * l2_sensitivity)^2) to each value; ``what`` it releases."""

    noise_multiplier: float
    l2_sensitivity: float
    what: str

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "l2_sensitivity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PrivacyConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise PrivacyConfigError(f"{name} must be finite and > 0, got {value!r}")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate."""
        return self.noise_multiplier * self.l2_sensitivity

    def dp_event(self) -> dp_accounting.DpEvent:
        """One application, as a dp-accounting event."""
        return dp_accounting.GaussianDpEvent(self.noise_multiplier)

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
                "mechanism": "Gaussian mechanism",
                "noise_multiplier": self.noise_multiplier,
                "l2_sensitivity": self.l2_sensitivity,
                "noise_std": self.noise_std,
                "sensitivity_basis": sensitivity_basis,
            },
        )
