"""Cryptographic pseudo-random generator: AES-256-CTR keystreams as numpy ring vectors.

Masks must be unpredictable to anyone without the seed, so they come from a block cipher in
counter mode, never from numpy's or Python's generators. Keystreams are produced chunk by chunk
into a small reusable buffer and added straight into the target vector, so expanding a mask
costs no allocation and no per-element Python.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers import modes

SEED_BYTES = 32
_BLOCK = 16
_ZERO_NONCE = bytes(_BLOCK)
_CHUNK = 1 << 20  # bytes per step: fast in cache, few calls (measured best of 64 KiB..4 MiB)
_ZEROS = bytes(_CHUNK)
_scratch = threading.local()


def _encryptor(seed: bytes):
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    # Each seed keys exactly one stream, so a fixed all-zero initial counter is safe.
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()


def _scratch_buffer() -> memoryview:
    buf = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = memoryview(bytearray(_CHUNK + _BLOCK - 1))
    return buf


def _ring_dtype(dtype: np.dtype | type) -> np.dtype:
    dt = np.dtype(dtype).newbyteorder("<")
    if dt.kind != "u":
        raise ValueError(f"PRG output dtype must be unsigned, got {dt}")
    return dt


def expand(seed: bytes, length: int, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    """Expand ``seed`` into a new array of ``length`` uniform elements of an unsigned dtype."""
    out = np.zeros(length, dtype=_ring_dtype(dtype))
    add_keystream(out, seed)
    return out


def add_keystream(target: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """Add (``sign=1``) or subtract (``sign=-1``) the keystream of ``seed`` into ``target``.

    ``target`` is a contiguous 1-D unsigned array; arithmetic wraps modulo 2^bits, which is the
    ring. ``expand(seed, len(target), target.dtype)`` is the keystream being added.
    """
    dt = _ring_dtype(target.dtype)
    if target.ndim != 1 or not target.flags.c_contiguous:
        raise ValueError("target must be a contiguous 1-D array")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    encryptor = _encryptor(seed)
    scratch = _scratch_buffer()
    per_chunk = _CHUNK // dt.itemsize
    op = np.add if sign == 1 else np.subtract
    for start in range(0, target.size, per_chunk):
        stop = min(start + per_chunk, target.size)
        n_bytes = (stop - start) * dt.itemsize
        encryptor.update_into(_ZEROS[:n_bytes], scratch)
        words = np.frombuffer(scratch, dtype=dt, count=stop - start)
        op(target[start:stop], words, out=target[start:stop])


def uniform01(length: int) -> np.ndarray:
    """``length`` floats uniform in [0, 1) from a fresh OS-random seed (32-bit resolution)."""
    words = expand(random_seed(), length, np.uint32)
    return words * (1.0 / (1 << 32))


def random_seed() -> bytes:
    """A fresh 32-byte seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)
