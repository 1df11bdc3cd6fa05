"""Gaussian noise for DP releases, drawn from a cryptographically secure generator.

Whoever sees a release must not be able to predict the noise that hides a record in it, so the
noise comes from an AES-256-CTR keystream (``cryptography``) under a fresh ``os.urandom`` key
per call, never from a seedable PRNG. The Box-Muller transform turns pairs of 53-bit uniforms
into standard normals. Opacus' own secure mode needs ``torchcsprng``, which is not installable
here, so DP-SGD takes its noise from :func:`gaussian_like` and its Poisson sampling coins from
:func:`uniform` as well (``privacy.dpsgd``).

What this does not do: the samples are float64 values rounded to the gradient's dtype, so the
floating-point attacks on textbook Gaussian samplers (Mironov 2012; Jin et al. 2021) are not
mitigated the way Opacus' secure mode does (summing four samples per coordinate).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers import modes

_BYTES_PER_WORD = 8


def uniform(count: int) -> np.ndarray:
    """``count`` independent uniforms on [0, 1) (float64, 53 random bits each) from a fresh
    AES-256-CTR keystream."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    keystream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    words = np.frombuffer(keystream.update(bytes(_BYTES_PER_WORD * count)), dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def standard_normal(count: int) -> np.ndarray:
    """``count`` independent N(0, 1) samples (float64) from a fresh AES-256-CTR keystream."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    u = uniform(2 * ((count + 1) // 2))
    radius = np.sqrt(-2.0 * np.log1p(-u[0::2]))  # 1 - u in (0, 1]: finite
    angle = 2.0 * math.pi * u[1::2]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


def gaussian_like(reference: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std²) noise with ``reference``'s shape, dtype and device."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be finite and >= 0, got {std!r}")
    if std == 0:
        return torch.zeros_like(reference)
    noise = torch.from_numpy(standard_normal(reference.numel()) * std)
    return noise.reshape(reference.shape).to(device=reference.device, dtype=reference.dtype)


def gaussian_array(shape: tuple[int, ...], std: float) -> np.ndarray:
    """N(0, std²) float64 noise of ``shape``."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be finite and >= 0, got {std!r}")
    return standard_normal(math.prod(shape)).reshape(shape) * std
