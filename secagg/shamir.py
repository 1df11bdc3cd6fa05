"""Shamir t-of-k secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A client shares its self-mask seed and its mask private key with its neighbours so that any
``threshold`` of them can rebuild the secret for the server when the client drops (or survives),
while fewer learn nothing about it. The field is larger than every secret, so a secret is one
field element; polynomial coefficients come from the OS CSPRNG.

Evaluation points are the share-holders' ids plus one (the protocol uses ``x = client_id + 1``)
and are limited to 32 bits so that every share has one fixed-length encoding.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

from secagg.errors import ConfigError
from secagg.errors import MalformedMessage
from secagg.errors import SecAggError

P = 2**521 - 1
"""The field prime (a Mersenne prime, far above every 256-bit secret)."""

SECRET_BYTES = 32
X_BYTES = 4
Y_BYTES = (P.bit_length() + 7) // 8  # 66
SHARE_BYTES = X_BYTES + Y_BYTES
X_MAX = 2 ** (8 * X_BYTES) - 1
"""Largest evaluation point: every x fits the 4-byte field of the share encoding."""

_SECRET_LIMIT = 1 << (8 * SECRET_BYTES)


class ShamirError(SecAggError, ValueError):
    """Shares or a secret that cannot be used: too few, duplicated, out of range, inconsistent."""


@dataclass(frozen=True, slots=True)
class Share:
    """One holder's share: the point ``(x, f(x))`` of the sharing polynomial ``f``."""

    x: int
    y: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _random_element() -> int:
    """A uniform element of GF(P) by rejection sampling 521 bits of OS randomness."""
    while True:
        candidate = int.from_bytes(os.urandom(Y_BYTES), "big") & P  # P is all ones: a 521-bit mask
        if candidate < P:
            return candidate


def _check_threshold(threshold: int) -> None:
    if not _is_int(threshold) or threshold < 1:
        raise ConfigError(f"threshold must be an integer >= 1, got {threshold!r}")


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Share ``secret`` so that any ``threshold`` of the returned shares rebuild it.

    Returns one share per evaluation point in ``xs``, in that order. Each point must be distinct
    and in ``[1, X_MAX]`` (0 would be the secret itself).
    """
    if not isinstance(secret, bytes | bytearray | memoryview):
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes, got {type(secret).__name__}")
    secret = bytes(secret)
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    _check_threshold(threshold)
    xs = list(xs)
    if threshold > len(xs):
        raise ConfigError(
            f"threshold {threshold} exceeds the number of share-holders {len(xs)}; "
            "lower the threshold or add holders"
        )
    for x in xs:
        if not _is_int(x) or not 1 <= x <= X_MAX:
            raise ConfigError(f"share-holder point must be an integer in [1, {X_MAX}], got {x!r}")
    if len(set(xs)) != len(xs):
        raise ConfigError("share-holder points must be distinct")

    # f(x) = secret + c_1 x + ... + c_{t-1} x^{t-1}, coefficients highest degree first for Horner.
    coefficients = [_random_element() for _ in range(threshold - 1)]
    coefficients.reverse()
    coefficients.append(int.from_bytes(secret, "big"))
    shares = []
    for x in xs:
        y = 0
        for c in coefficients:
            y = (y * x + c) % P
        shares.append(Share(x, y))
    return shares


def _check_share(share: Share) -> None:
    if not isinstance(share, Share):
        raise ShamirError(f"expected a Share, got {type(share).__name__}")
    if not _is_int(share.x) or not 1 <= share.x <= X_MAX:
        raise ShamirError(f"share point x must be in [1, {X_MAX}], got {share.x!r}")
    if not _is_int(share.y) or not 0 <= share.y < P:
        raise ShamirError("share value y must be a field element in [0, P)")


@functools.lru_cache(maxsize=128)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Weights w_i with f(0) = sum_i w_i f(x_i) for every f of degree < len(xs); xs distinct.

    w_i = prod_{j != i} x_j / (x_j - x_i) = (prod_j x_j) / (x_i prod_{j != i} (x_j - x_i)). The
    weights are public and a server rebuilds many secrets from the same holders, hence the cache.
    """
    numerator = 1
    for x in xs:
        numerator = numerator * x % P
    denominators = []
    for xi in xs:
        d = xi
        for xj in xs:
            if xj != xi:
                d *= xj - xi  # a small factor: reduce only once the product has grown
                if d.bit_length() > 2 * P.bit_length():
                    d %= P
        denominators.append(d % P)
    # Montgomery's trick: one modular inverse for all denominators.
    prefix = [1]
    for d in denominators:
        prefix.append(prefix[-1] * d % P)
    inverse = pow(prefix[-1], -1, P)
    weights = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        weights[i] = numerator * inverse * prefix[i] % P
        inverse = inverse * denominators[i] % P
    return tuple(weights)


def _validated(shares: Sequence[Share], threshold: int) -> list[Share]:
    """The shares as a list once count, ranges and distinct points are checked."""
    _check_threshold(threshold)
    shares = list(shares)
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares to rebuild the secret, got {len(shares)}")
    for share in shares:
        _check_share(share)
    if len({share.x for share in shares}) != len(shares):
        raise ShamirError("two shares have the same point x")
    return shares


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """Rebuild the secret from the first ``threshold`` of ``shares`` (Lagrange interpolation at 0).

    All given shares are validated. A result that does not fit in 32 bytes means the shares do not
    lie on one sharing polynomial (corrupted or from different secrets) and raises ShamirError.
    """
    shares = _validated(shares, threshold)
    used = shares[:threshold]
    weights = _lagrange_at_zero(tuple(share.x for share in used))
    secret = sum(share.y * w for share, w in zip(used, weights, strict=True)) % P
    if secret >= _SECRET_LIMIT:
        raise ShamirError("shares are inconsistent: the rebuilt value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


MAX_DECODING_SUBSETS = 4096
"""Most threshold-sized subsets :func:`robust_combine` tries before it gives up."""


def _evaluate(points: Sequence[Share], x: int) -> int:
    """The value at ``x`` of the polynomial of degree < len(points) through ``points``."""
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * (x - pj.x) % P
                den = den * (pi.x - pj.x) % P
        total += pi.y * num * pow(den, -1, P)
    return total % P


def robust_combine(shares: Sequence[Share], threshold: int) -> tuple[bytes, list[int]]:
    """Rebuild the secret from ALL ``shares``, correcting wrong ones where that is unambiguous.

    Returns the secret and the points ``x`` of the shares that do not lie on the sharing
    polynomial. With m shares, up to e = (m - t) // 2 wrong ones are corrected (the polynomial
    that agrees with at least m - e shares is unique); beyond that, or when the search exceeds
    :data:`MAX_DECODING_SUBSETS`, raises ShamirError rather than guess. Every share is checked,
    so one shifted share can never silently change the secret.
    """
    shares = _validated(shares, threshold)
    m = len(shares)
    agree_needed = m - (m - threshold) // 2
    base = shares[:threshold]
    if all(_evaluate(base, s.x) == s.y for s in shares[threshold:]):
        return combine(base, threshold), []
    for tried, subset in enumerate(itertools.combinations(shares, threshold)):
        if tried >= MAX_DECODING_SUBSETS:
            break
        wrong = [s.x for s in shares if s not in subset and _evaluate(subset, s.x) != s.y]
        if m - len(wrong) >= agree_needed:
            try:
                return combine(list(subset), threshold), wrong
            except ShamirError:
                continue  # agrees with enough shares but is not a 32-byte secret
    raise ShamirError(
        f"{m} shares do not lie on one polynomial of degree {threshold - 1} and no unique "
        f"correction exists; the secret is not rebuilt"
    )


def encode_share(share: Share) -> bytes:
    """Fixed-length encoding: 4-byte big-endian x, then 66-byte big-endian y."""
    _check_share(share)
    return share.x.to_bytes(X_BYTES, "big") + share.y.to_bytes(Y_BYTES, "big")


def decode_share(data: bytes) -> Share:
    """Inverse of :func:`encode_share`; raises MalformedMessage on a bad length or range."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage(f"a share must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) != SHARE_BYTES:
        raise MalformedMessage(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    x = int.from_bytes(data[:X_BYTES], "big")
    y = int.from_bytes(data[X_BYTES:], "big")
    if x == 0:
        raise MalformedMessage("share point x must not be 0")
    if y >= P:
        raise MalformedMessage("share value y is not below the field prime")
    return Share(x, y)
