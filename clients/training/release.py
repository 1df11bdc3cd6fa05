"""Releasing a per-client value outside a secure sum: Gaussian noise, charged before it leaves.

A strategy that must send a value computed on private data in the clear (FedAMoLE's affinity
scores) describes the release as a dp-accounting ``DpEvent``, hands it to an injected
:class:`Charge` callback (the institution's ledger) and only then draws the noise and returns
the value. A callback that refuses (raises) stops the release: nothing is returned.

Noise comes from :mod:`privacy.noise` (an AES-CTR keystream), as DP-SGD's does; a test may pass
a seeded ``torch.Generator`` instead to reproduce it.
"""

from __future__ import annotations

import math
from typing import Protocol

import dp_accounting
import numpy as np
import torch

from privacy.noise import gaussian_array


class Charge(Protocol):
    """The ledger hook: record ``event`` (described by ``what``) or raise to refuse it."""

    def __call__(self, event: dp_accounting.DpEvent, what: str) -> None: ...


def noise_generator(seed: int) -> torch.Generator:
    """A seeded CPU generator, for tests that must reproduce a release's noise."""
    return torch.Generator().manual_seed(seed)


def gaussian_release(
    values: np.ndarray,
    *,
    sensitivity: float,
    noise_multiplier: float,
    charge: Charge,
    what: str,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """``values + N(0, (noise_multiplier * sensitivity)^2)``, charged as a Gaussian mechanism.

    ``sensitivity`` is the L2 sensitivity of ``values`` under add-or-remove-one-record (what
    dp-accounting's ``GaussianDpEvent`` assumes: its noise multiplier is std / sensitivity).
    """
    if not (math.isfinite(sensitivity) and sensitivity >= 0):
        raise ValueError(f"sensitivity must be finite and >= 0, got {sensitivity!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier!r}")
    values = np.asarray(values, dtype=np.float64)
    charge(dp_accounting.GaussianDpEvent(noise_multiplier), what)
    std = noise_multiplier * sensitivity
    if generator is None:
        return values + gaussian_array(values.shape, std)
    noise = torch.normal(0.0, 1.0, size=values.shape, generator=generator, dtype=torch.float64)
    return values + std * noise.numpy()
