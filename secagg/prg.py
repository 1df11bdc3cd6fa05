"""Cryptographic pseudo-random generator: AES-256-CTR keystreams as numpy ring vectors.

Masks must be unpredictable to anyone without the seed, so they come from a block cipher in
counter mode, never from numpy's or Python's generators. The keystream is written straight
into a numpy buffer (no per-element Python).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_BLOCK = 16
_ZERO_NONCE = bytes(_BLOCK)


def keystream(seed: bytes, n_bytes: int) -> bytearray:
    """Return ``n_bytes`` of AES-256-CTR keystream under ``seed`` (plus up to 15 spare bytes)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    # Each seed keys exactly one stream, so a fixed all-zero initial counter is safe.
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    out = bytearray(n_bytes + _BLOCK - 1)
    encryptor.update_into(bytes(n_bytes), out)
    return out


def expand(seed: bytes, length: int, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    """Expand ``seed`` into ``length`` uniformly random elements of an unsigned integer dtype.

    The result is read-only memory owned by the returned array; copy it to modify in place.
    """
    dt = np.dtype(dtype).newbyteorder("<")
    if dt.kind != "u":
        raise ValueError(f"PRG output dtype must be unsigned, got {dt}")
    buf = keystream(seed, length * dt.itemsize)
    return np.frombuffer(buf, dtype=dt, count=length)


def uniform01(length: int) -> np.ndarray:
    """``length`` floats uniform in [0, 1) from a fresh OS-random seed (53-bit resolution)."""
    words = expand(os.urandom(SEED_BYTES), length, np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def random_seed() -> bytes:
    """A fresh 32-byte seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)
