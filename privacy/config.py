"""DP-SGD configuration: one immutable value, validated on construction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace
from typing import Literal

import dp_accounting

from privacy.accountant import calibrate_noise
from privacy.errors import PrivacyConfigError

Accountant = Literal["rdp", "pld"]
GradSampleMode = Literal["hooks", "ghost"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ghost")


def _positive_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyConfigError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise PrivacyConfigError(f"{name} must be finite and > 0, got {value!r}")


@dataclass(frozen=True)
class DPConfig:
    """What DP-SGD must guarantee and how.

    ``target_epsilon``/``target_delta`` are the budget for ALL planned local steps across all
    rounds; ``noise_multiplier`` (sigma) is calibrated once for that plan (see
    :meth:`calibrated`) and stays fixed across rounds. ``max_grad_norm`` is the per-sample
    clipping bound C. ``grad_sample_mode`` picks Opacus' per-sample hooks ("hooks", verified
    per-sample gradients) or ghost clipping ("ghost", verified clipped sum).
    """

    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    noise_multiplier: float | None = None
    accountant: Accountant = "pld"
    grad_sample_mode: GradSampleMode = "hooks"

    def __post_init__(self) -> None:
        _positive_finite("target_epsilon", self.target_epsilon)
        _positive_finite("target_delta", self.target_delta)
        if self.target_delta >= 1:
            raise PrivacyConfigError(f"target_delta must be < 1, got {self.target_delta!r}")
        _positive_finite("max_grad_norm", self.max_grad_norm)
        if self.noise_multiplier is not None:
            _positive_finite("noise_multiplier", self.noise_multiplier)
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(
                f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}"
            )
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyConfigError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, "
                f"got {self.grad_sample_mode!r}"
            )

    def calibrated(
        self, sample_rate: float, total_steps: int, also: Sequence[dp_accounting.DpEvent] = ()
    ) -> DPConfig:
        """A copy whose noise multiplier spends exactly the target budget over ``total_steps``,
        together with the fixed releases ``also`` (see :func:`privacy.calibrate_noise`)."""
        sigma = calibrate_noise(
            self.target_epsilon,
            self.target_delta,
            sample_rate,
            total_steps,
            self.accountant,
            also=also,
        )
        return replace(self, noise_multiplier=sigma)

    def require_noise_multiplier(self) -> float:
        """The noise multiplier, or a typed error saying how to obtain one."""
        if self.noise_multiplier is None:
            raise PrivacyConfigError(
                "noise_multiplier is None: calibrate it for the whole plan first "
                "(DPConfig.calibrated(sample_rate, total_steps) or privacy.calibrate_noise)"
            )
        return self.noise_multiplier
