"""Fixed-point codec and the AES-CTR mask generator."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers import modes
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from secagg import ConfigError
from secagg import FixedPointCodec
from secagg import MalformedMessage
from secagg.prg import add_keystream
from secagg.prg import expand
from secagg.prg import random_seed


@pytest.mark.parametrize("modulus_bits", [32, 64])
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 50),
    bits=st.integers(2, 24),
    clip=st.floats(0.01, 100),
    data=st.data(),
)
def test_sum_of_encodings_decodes_to_the_clipped_sum(modulus_bits, n, bits, clip, data):
    codec = FixedPointCodec(clip=clip, bits=bits, modulus_bits=modulus_bits, max_clients=n)
    d = data.draw(st.integers(1, 30))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    xs = [rng.uniform(-2 * clip, 2 * clip, d) for _ in range(n)]
    ring_sum = np.zeros(d, dtype=codec.dtype)
    for x in xs:
        ring_sum += codec.encode(x)
    expected = sum(np.clip(x, -clip, clip) for x in xs)
    assert np.all(np.abs(codec.decode(ring_sum) - expected) <= n * codec.max_error_per_client)


def test_stochastic_rounding_is_unbiased():
    codec = FixedPointCodec(clip=1.0, bits=4, max_clients=2)
    value = 0.3 / codec.scale  # a third of a quantisation step
    decoded = codec.decode(codec.encode(np.full(200_000, value)))
    assert abs(decoded.mean() - value) < 0.01 / codec.scale
    assert set(np.unique(decoded)) == {0.0, 1 / codec.scale}


def test_overflow_is_refused_with_the_knob_to_turn():
    with pytest.raises(ConfigError, match="lower bits to at most 25"):
        FixedPointCodec(bits=26, max_clients=100)
    FixedPointCodec(bits=25, max_clients=100)
    FixedPointCodec(bits=26, max_clients=100, modulus_bits=64)
    with pytest.raises(ConfigError, match="modulus_bits"):
        FixedPointCodec(modulus_bits=16)


def test_non_finite_input_is_refused():
    with pytest.raises(MalformedMessage, match="NaN"):
        FixedPointCodec().encode(np.array([0.0, np.nan]))


def test_keystream_is_aes256_ctr_and_add_subtract_cancel():
    seed = random_seed()
    n = 300_001  # several chunks and a ragged end
    reference = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * n))
    assert np.array_equal(expand(seed, n), np.frombuffer(reference, dtype="<u4"))
    target = np.arange(n, dtype=np.uint64)
    add_keystream(target, seed)
    add_keystream(target, seed, -1)
    assert np.array_equal(target, np.arange(n, dtype=np.uint64))
    assert not np.array_equal(expand(seed, 64), expand(random_seed(), 64))


def test_prg_rejects_bad_seeds_and_dtypes():
    with pytest.raises(ValueError, match="32 bytes"):
        expand(b"short", 4)
    with pytest.raises(ValueError, match="unsigned"):
        expand(random_seed(), 4, np.int32)
