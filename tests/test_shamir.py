"""Shamir sharing: reconstruction, secrecy below the threshold, corruption, encoding, validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from secagg.errors import ConfigError
from secagg.errors import MalformedMessage
from secagg.errors import SecAggError
from secagg.shamir import SECRET_BYTES
from secagg.shamir import SHARE_BYTES
from secagg.shamir import X_MAX
from secagg.shamir import P
from secagg.shamir import ShamirError
from secagg.shamir import Share
from secagg.shamir import combine
from secagg.shamir import decode_share
from secagg.shamir import encode_share
from secagg.shamir import robust_combine
from secagg.shamir import split

FAST = settings(max_examples=60, deadline=None)
secrets_ = st.binary(min_size=SECRET_BYTES, max_size=SECRET_BYTES)


def interpolate(points: list[tuple[int, int]], x: int) -> int:
    """Value at ``x`` of the unique polynomial of degree < len(points) through ``points``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if j != i:
                term = term * (x - xj) * pow(xi - xj, -1, P) % P
        total = (total + term) % P
    return total


@st.composite
def sharings(draw, min_threshold: int = 1):
    """(secret, threshold, shares) with up to 40 holders at random distinct points."""
    k = draw(st.integers(min_value=max(1, min_threshold), max_value=40))
    t = draw(st.integers(min_value=min_threshold, max_value=k))
    xs = draw(st.lists(st.integers(1, X_MAX), min_size=k, max_size=k, unique=True))
    secret = draw(secrets_)
    return secret, t, split(secret, t, xs)


def test_known_answer_for_a_line():
    # f(x) = 5 + 7x: shares (1, 12) and (2, 19) rebuild 5 in either order.
    expected = (5).to_bytes(SECRET_BYTES, "big")
    assert combine([Share(1, 12), Share(2, 19)], 2) == expected
    assert combine([Share(2, 19), Share(1, 12)], 2) == expected


@FAST
@given(sharings(), st.data())
def test_any_threshold_subset_in_any_order_rebuilds(sharing, data):
    secret, t, shares = sharing
    size = data.draw(st.integers(t, len(shares)))
    subset = data.draw(st.permutations(shares))[:size]
    assert combine(subset, t) == secret


@FAST
@given(sharings(min_threshold=2), secrets_, st.data())
def test_fewer_than_threshold_shares_fit_every_secret(sharing, candidate, data):
    secret, t, shares = sharing
    order = data.draw(st.permutations(shares))
    known, others = order[: t - 1], order[t - 1 :]
    target = others[0].x  # a holder whose share the adversary does not have
    # The polynomial through (0, candidate) and the t-1 known shares has degree t-1, so it is a
    # valid sharing of `candidate` that agrees with everything the adversary holds.
    points = [(0, int.from_bytes(candidate, "big"))] + [(s.x, s.y) for s in known]
    forged = Share(target, interpolate(points, target))
    assert combine([*known, forged], t) == candidate
    # Sanity check of the forger: with the true secret it recovers the true missing share.
    true_points = [(0, int.from_bytes(secret, "big"))] + [(s.x, s.y) for s in known]
    assert interpolate(true_points, target) == others[0].y
    if candidate != secret:
        assert forged.y != others[0].y


@pytest.mark.parametrize("xs", [range(1, 301), range(X_MAX - 149, X_MAX + 1)])
def test_large_thresholds_rebuild(xs):
    # Long products of point differences: exercises the delayed modular reduction.
    secret = bytes(range(1, SECRET_BYTES + 1))
    shares = split(secret, len(xs), xs)
    assert combine(shares[::-1], len(xs)) == secret
    assert combine(shares[1:] + shares[:1], len(xs)) == secret


def test_share_values_look_uniform_whatever_the_secret():
    # For t >= 2 a share value is a uniform field element. Secrets are < 2^256 < P / 2^264, so a
    # leaky scheme (e.g. y = secret) would never set the top bit; a uniform y sets it half the time.
    for secret in (bytes(SECRET_BYTES), b"\xff" * SECRET_BYTES):
        ys = [s.y for _ in range(100) for s in split(secret, 3, [1, 2, 3, 4])]
        top = sum(y >> 520 for y in ys) / len(ys)
        assert 0.35 < top < 0.65  # 400 fair coins: this fails with probability < 1e-8
        assert sum(y >= 1 << 256 for y in ys) >= len(ys) - 1
        assert len(set(ys)) == len(ys)  # fresh randomness on every split


def test_polynomial_coefficients_span_the_whole_field():
    # With t = 2 the slope is y(2) - y(1); it must be uniform in GF(P), top bit set half the time.
    slopes = [
        (b.y - a.y) % P for a, b in (split(bytes(SECRET_BYTES), 2, [1, 2]) for _ in range(400))
    ]
    assert 0.35 < sum(s >> 520 for s in slopes) / len(slopes) < 0.65


def test_threshold_one_shares_are_the_secret():
    secret = bytes(range(SECRET_BYTES))
    value = int.from_bytes(secret, "big")
    assert [s.y for s in split(secret, 1, [1, 5, 9])] == [value] * 3


@FAST
@given(sharings(), st.data())
def test_a_corrupted_share_never_rebuilds_the_secret(sharing, data):
    secret, t, shares = sharing
    used = data.draw(st.permutations(shares))[:t]
    bad = data.draw(st.integers(0, t - 1))
    delta = data.draw(st.integers(1, P - 1))
    used[bad] = Share(used[bad].x, (used[bad].y + delta) % P)
    # The result moves by delta * l_bad(0), which is non-zero mod P: never the secret.
    try:
        rebuilt = combine(used, t)
    except ShamirError:
        return
    assert rebuilt != secret


@FAST
@given(sharings(), st.data())
def test_only_the_first_threshold_shares_are_used(sharing, data):
    secret, t, shares = sharing
    if len(shares) == t:
        return
    corrupted = Share(shares[-1].x, (shares[-1].y + 1) % P)
    assert combine([*shares[:-1], corrupted], t) == secret


def test_shares_of_different_secrets_do_not_combine_to_either():
    a, b = b"\x01" * SECRET_BYTES, b"\x02" * SECRET_BYTES
    mixed = [split(a, 2, [1, 2])[0], split(b, 2, [1, 2])[1]]
    with pytest.raises(ShamirError, match="inconsistent"):
        combine(mixed, 2)


@FAST
@given(sharings())
def test_encoding_round_trips_at_fixed_length(sharing):
    _, _, shares = sharing
    for share in shares:
        data = encode_share(share)
        assert len(data) == SHARE_BYTES == 70
        assert decode_share(data) == share
        assert decode_share(bytearray(data)) == share


def test_encoding_layout():
    data = encode_share(Share(3, P - 1))
    assert data[:4] == b"\x00\x00\x00\x03"
    assert int.from_bytes(data[4:], "big") == P - 1


@pytest.mark.parametrize("length", [0, 4, SHARE_BYTES - 1, SHARE_BYTES + 1])
def test_decode_rejects_wrong_lengths(length):
    with pytest.raises(MalformedMessage, match="70 bytes"):
        decode_share(b"\x01" * length)


def test_decode_rejects_out_of_range_fields():
    with pytest.raises(MalformedMessage, match="x"):
        decode_share(bytes(4) + (5).to_bytes(66, "big"))
    with pytest.raises(MalformedMessage, match="prime"):
        decode_share((1).to_bytes(4, "big") + P.to_bytes(66, "big"))
    with pytest.raises(MalformedMessage, match="prime"):
        decode_share((1).to_bytes(4, "big") + b"\xff" * 66)
    with pytest.raises(MalformedMessage, match="bytes"):
        decode_share("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("share", [Share(0, 1), Share(X_MAX + 1, 1), Share(1, P), Share(1, -1)])
def test_encode_rejects_out_of_range_shares(share):
    with pytest.raises(ShamirError):
        encode_share(share)


@pytest.mark.parametrize(
    ("threshold", "xs", "match"),
    [
        (0, [1, 2, 3], "threshold"),
        (4, [1, 2, 3], "exceeds"),
        (2, [1, 2, 2], "distinct"),
        (2, [0, 1, 2], r"\[1, "),
        (2, [1, X_MAX + 1], r"\[1, "),
        (2, [-1, 1], r"\[1, "),
        (True, [1, 2], "threshold"),
        (1, [], "exceeds"),
    ],
)
def test_split_rejects_bad_configuration(threshold, xs, match):
    with pytest.raises(ConfigError, match=match):
        split(bytes(SECRET_BYTES), threshold, xs)


@pytest.mark.parametrize("secret", [bytes(31), bytes(33), b"", "x" * 32])
def test_split_rejects_secrets_that_are_not_32_bytes(secret):
    with pytest.raises(ShamirError, match="32 bytes"):
        split(secret, 1, [1])


def test_combine_rejects_bad_shares():
    secret = bytes(range(SECRET_BYTES))
    shares = split(secret, 3, [1, 2, 3, 4])
    with pytest.raises(ShamirError, match="need 3"):
        combine(shares[:2], 3)
    with pytest.raises(ShamirError, match="same point"):
        combine([shares[0], shares[1], shares[0]], 3)
    with pytest.raises(ShamirError, match="same point"):
        combine([*shares[:3], shares[0]], 3)  # a duplicate beyond the first t is still refused
    with pytest.raises(ShamirError, match="x must be"):
        combine([Share(0, shares[0].y), *shares[1:]], 3)
    with pytest.raises(ShamirError, match="y must be"):
        combine([Share(1, P), *shares[1:]], 3)
    with pytest.raises(ShamirError, match="expected a Share"):
        combine([(1, 2), *shares[1:]], 3)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="threshold"):
        combine(shares, 0)


def test_errors_are_typed():
    assert issubclass(ShamirError, SecAggError)
    assert issubclass(ShamirError, ValueError)


# ---------------------------------------------------------------------------- robust rebuild


@FAST
@given(secrets_, st.integers(1, 6), st.integers(0, 3), st.data())
def test_robust_combine_corrects_up_to_half_the_spare_shares(secret, t, e, data):
    """With t + 2e shares, any e wrong ones are found and the secret still comes out."""
    xs = data.draw(
        st.lists(st.integers(1, 1000), min_size=t + 2 * e, max_size=t + 2 * e, unique=True)
    )
    shares = split(secret, t, xs)
    bad = data.draw(st.lists(st.sampled_from(range(len(shares))), max_size=e, unique=True))
    for i in bad:
        shift = data.draw(st.integers(1, P - 1))
        shares[i] = Share(shares[i].x, (shares[i].y + shift) % P)
    rebuilt, wrong = robust_combine(data.draw(st.permutations(shares)), t)
    assert rebuilt == secret
    assert sorted(wrong) == sorted(shares[i].x for i in bad)


@FAST
@given(secrets_, st.integers(2, 6), st.integers(1, 1 << 40), st.data())
def test_robust_combine_never_returns_a_wrong_secret(secret, t, shift, data):
    """Beyond the correction radius it raises; a shifted share never goes unnoticed."""
    extra = data.draw(st.integers(0, 3))
    shares = split(secret, t, range(1, t + extra + 1))
    n_bad = extra // 2 + 1  # one more than can be corrected
    for i in range(n_bad):
        shares[i] = Share(shares[i].x, (shares[i].y + shift * (i + 1)) % P)
    try:
        rebuilt, wrong = robust_combine(shares, t)
    except ShamirError:
        return
    # only possible when the wrong shares happen to lie on another valid sharing
    assert rebuilt != secret or wrong


def test_robust_combine_with_exactly_t_shares_is_plain_combine():
    shares = split(bytes(range(32)), 3, [1, 2, 3])
    assert robust_combine(shares, 3) == (bytes(range(32)), [])
