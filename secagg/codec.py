"""Fixed-point codec between float vectors and the ring Z_{2^m} that masking works in.

A float is clipped to [-clip, clip], scaled to a signed ``bits``-bit integer with stochastic
rounding (unbiased, so sums stay unbiased) and stored modulo 2^m. The sum of up to
``max_clients`` encoded vectors decodes exactly as long as it cannot wrap around the ring,
which :class:`FixedPointCodec` checks when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

import numpy as np

from secagg.errors import ConfigError
from secagg.errors import MalformedMessage
from secagg.prg import uniform01

_RING_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_SIGNED_DTYPES = {32: np.dtype("<i4"), 64: np.dtype("<i8")}


@dataclass(frozen=True)
class FixedPointCodec:
    """Quantisation parameters shared by every party of a round.

    ``bits`` is the width of one client's signed value; ``modulus_bits`` (32 or 64) is the ring.
    """

    clip: float = 1.0
    bits: int = 16
    modulus_bits: int = 32
    max_clients: int = 2
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        if self.modulus_bits not in _RING_DTYPES:
            raise ConfigError(f"modulus_bits must be 32 or 64, got {self.modulus_bits}")
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise ConfigError(f"clip must be a positive finite float, got {self.clip}")
        if not 2 <= self.bits <= self.modulus_bits - 1:
            raise ConfigError(
                f"bits must be in [2, {self.modulus_bits - 1}] for a 2^{self.modulus_bits} ring, "
                f"got {self.bits}"
            )
        if self.max_clients < 1:
            raise ConfigError(f"max_clients must be >= 1, got {self.max_clients}")
        if self.max_clients * 2**self.bits >= 2**self.modulus_bits:
            headroom = self.modulus_bits - int(np.ceil(np.log2(self.max_clients + 1)))
            raise ConfigError(
                f"a sum of {self.max_clients} clients at bits={self.bits} can overflow the "
                f"2^{self.modulus_bits} ring: lower bits to at most {headroom}, "
                f"or use modulus_bits=64, or fewer clients per round"
            )
        object.__setattr__(self, "scale", (2 ** (self.bits - 1) - 1) / self.clip)

    @property
    def dtype(self) -> np.dtype:
        """Numpy dtype of ring elements (unsigned, little-endian)."""
        return _RING_DTYPES[self.modulus_bits]

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Clip, scale and stochastically round ``values`` into ring elements (flattened)."""
        scaled = np.array(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(scaled)):
            raise MalformedMessage("input contains NaN or infinity; refuse to encode it")
        np.clip(scaled, -self.clip, self.clip, out=scaled)
        scaled *= self.scale
        # floor(s + u), u ~ U[0, 1): rounds up with probability frac(s), so it is unbiased.
        scaled += uniform01(scaled.size)
        np.floor(scaled, out=scaled)
        # Round-trip through the signed type gives two's complement, i.e. the value mod 2^m.
        return scaled.astype(_SIGNED_DTYPES[self.modulus_bits]).view(self.dtype)

    def decode(self, ring_sum: np.ndarray) -> np.ndarray:
        """Turn a ring element vector that is a sum of encodings back into floats."""
        ring_sum = np.asarray(ring_sum)
        if ring_sum.dtype != self.dtype:
            raise MalformedMessage(f"expected ring dtype {self.dtype}, got {ring_sum.dtype}")
        return ring_sum.view(_SIGNED_DTYPES[self.modulus_bits]).astype(np.float64) / self.scale

    @property
    def max_error_per_client(self) -> float:
        """Worst-case rounding error one client adds to the decoded sum (inside the clip)."""
        return 1.0 / self.scale
