"""Tiny seeded models with adapters, random token batches, and adapter weights moved off their
initialisation, shared by the adapter and strategy tests."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from clients.models.loaders import tiny_dense_model
from privacy import DPConfig

BITS = 16
"""Fixed-point bits of the adapter strategies' secure sums in tests."""
DP = DPConfig(8.0, 1e-5, 1.0, noise_multiplier=0.8)
"""One local round's DP-SGD settings (a fixed noise multiplier: no calibration)."""


def token_ids(batch: int, length: int = 12, seed: int = 0) -> torch.Tensor:
    """A ``[batch, length]`` block of byte-vocabulary token ids."""
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def seeded_model(attach: Callable[[nn.Module], nn.Module], seed: int) -> nn.Module:
    """The tiny dense model with adapters attached, drawn under ``seed`` without touching the
    global torch generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return attach(tiny_dense_model())


def exercised(
    model: nn.Module, parameters: Iterable[torch.Tensor] | None = None, scale: float = 0.1
) -> nn.Module:
    """Random weights for ``parameters`` (default: every trainable one), so every adapter
    parameter gets a gradient (B factors start at zero)."""
    if parameters is None:
        parameters = (p for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in parameters:
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def clipped_mean(deltas: list[np.ndarray], weights: list[float], bound: float) -> np.ndarray:
    """The plaintext reference of a secure aggregate: the weighted mean of the deltas, each
    clipped to +-``bound``."""
    clipped = [np.clip(d, -bound, bound) for d in deltas]
    return sum(w * d for w, d in zip(weights, clipped, strict=True)) / sum(weights)
