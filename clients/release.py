"""Releasing a per-client value outside a secure sum: Gaussian noise, charged before it leaves.

A strategy that must send a value computed on private data in the clear (FedAMoLE's affinity
scores) describes the release as a dp-accounting ``DpEvent``, hands it to an injected
:class:`Charge` callback (the institution's ledger) and only then draws the noise and returns
the value. A callback that refuses (raises) stops the release: nothing is returned.

Noise comes from a ``torch.Generator`` (Mersenne Twister) seeded from ``os.urandom``; it is not a
cryptographically secure sampler (Opacus' ``secure_mode`` is unavailable here), the same
generator family the DP-SGD noise uses.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import dp_accounting
import numpy as np
import torch


class Charge(Protocol):
    """The ledger hook: record ``event`` (described by ``what``) or raise to refuse it."""

    def __call__(self, event: dp_accounting.DpEvent, what: str) -> None: ...


def noise_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator seeded from ``os.urandom`` (``seed`` only for reproducible tests)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
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
    gen = generator if generator is not None else noise_generator()
    noise = torch.normal(0.0, 1.0, size=values.shape, generator=gen, dtype=torch.float64)
    return values + noise_multiplier * sensitivity * noise.numpy()
