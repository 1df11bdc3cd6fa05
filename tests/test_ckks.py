"""CKKS aggregation: sums, packing layout, key custody, parameter checks and hostile bytes."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
import tenseal as ts

from secagg.ckks import DEFAULT_ABS_ERROR_PER_SUMMAND
from secagg.ckks import SCALING_ERROR_FLOOR
from secagg.ckks import SCALING_ERROR_PER_FACTOR_AND_SUMMAND
from secagg.ckks import CkksAggregator
from secagg.ckks import CkksEvaluator
from secagg.ckks import CkksKeyHolder
from secagg.ckks import CkksParams
from secagg.ckks import EncryptedBatch
from secagg.errors import ConfigError
from secagg.errors import MalformedMessage
from secagg.errors import ProtocolError

SLOTS = CkksParams().slot_count
# A scalar, an empty tensor, a tensor spanning several ciphertexts, and odd small shapes.
SHAPES = [(), (3, 5), (0,), (2 * SLOTS + 17,), (2, 3, 4), (1,)]


@pytest.fixture(scope="module")
def holder() -> CkksKeyHolder:
    return CkksKeyHolder.generate()


@pytest.fixture(scope="module")
def public(holder: CkksKeyHolder) -> bytes:
    return holder.public_context()


def uniform(shapes: list[tuple[int, ...]], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1.0, 1.0, s) for s in shapes]


def test_aggregate_of_institutions_matches_plaintext_sum(holder, public):
    secret = holder.to_bytes()
    institutions = [CkksKeyHolder.from_bytes(secret) for _ in range(6)]
    updates = [uniform(SHAPES, seed) for seed in range(len(institutions))]
    agg = CkksAggregator(public)
    for inst, arrays in zip(institutions, updates):
        agg.add(inst.encrypt(arrays))
    assert agg.count == len(institutions)
    total = agg.sum()
    assert total.n_summed == len(institutions)
    got = institutions[0].decrypt(total)
    bound = len(institutions) * DEFAULT_ABS_ERROR_PER_SUMMAND
    for i, shape in enumerate(SHAPES):
        exact = np.sum([u[i] for u in updates], axis=0)
        assert got[i].shape == shape
        assert got[i].dtype == np.float64
        np.testing.assert_allclose(got[i], exact, rtol=0, atol=bound)


def test_layout_round_trip_packs_densely(holder):
    arrays = [*uniform(SHAPES, 42), np.arange(7, dtype=np.int32).reshape(7, 1)]
    batch = holder.encrypt(arrays)
    n_values = sum(math.prod(a.shape) for a in arrays)
    assert batch.n_values == n_values
    assert len(batch.ciphertexts) == math.ceil(n_values / SLOTS) == 3
    assert batch.shapes == tuple(a.shape for a in arrays)
    got = holder.decrypt(batch)
    assert [g.shape for g in got] == [a.shape for a in arrays]
    for g, a in zip(got, arrays):
        np.testing.assert_allclose(g, a, rtol=0, atol=DEFAULT_ABS_ERROR_PER_SUMMAND)


def test_batch_travels_as_msgpack(holder, public):
    batch = holder.encrypt(uniform([(10,), (2, 2)], 1))
    wire = msgspec.msgpack.encode(batch)
    back = msgspec.msgpack.decode(wire, type=EncryptedBatch)
    assert back == batch
    agg = CkksAggregator(public)
    agg.add(back)
    summed = msgspec.msgpack.decode(msgspec.msgpack.encode(agg.sum()), type=EncryptedBatch)
    np.testing.assert_allclose(holder.decrypt(summed)[1], holder.decrypt(batch)[1], atol=1e-9)
    bad = msgspec.msgpack.encode({"ciphertexts": [b"x"], "shapes": [[1]], "n_summed": 0})
    with pytest.raises(msgspec.ValidationError, match="n_summed"):
        msgspec.msgpack.decode(bad, type=EncryptedBatch)


def test_coordinator_context_cannot_decrypt(holder, public):
    ctx = ts.context_from(public)
    assert not ctx.has_secret_key()
    with pytest.raises(ValueError, match="encryption"):  # nor encrypt forged contributions
        ts.ckks_vector(ctx, [1.0])
    ct = ts.ckks_vector_from(ctx, holder.encrypt([np.ones(5)]).ciphertexts[0])
    with pytest.raises(ValueError, match="secret_key"):
        ct.decrypt()
    with pytest.raises(ConfigError, match="no secret key"):
        CkksKeyHolder.from_bytes(public)


def test_aggregator_refuses_secret_context(holder):
    with pytest.raises(ConfigError, match="secret key"):
        CkksAggregator(holder.to_bytes())


def test_secret_context_round_trip_decrypts_other_holders_batches(holder):
    other = CkksKeyHolder.from_bytes(holder.to_bytes())
    assert other.params == holder.params
    x = uniform([(5, 5)], 3)
    np.testing.assert_allclose(other.decrypt(holder.encrypt(x))[0], x[0], atol=1e-8)


def test_layout_mismatch_rejected_and_state_kept(holder, public):
    agg = CkksAggregator(public)
    first = holder.encrypt(uniform([(4,), (3,)], 5))
    agg.add(first)
    with pytest.raises(MalformedMessage, match="layout"):
        agg.add(holder.encrypt(uniform([(3,), (4,)], 6)))  # same size, other shapes
    assert agg.count == 1
    np.testing.assert_allclose(
        holder.decrypt(agg.sum())[0], holder.decrypt(first)[0], rtol=0, atol=1e-8
    )


def test_ciphertext_count_must_match_layout(holder, public):
    batch = holder.encrypt(uniform([(SLOTS + 1,)], 7))
    short = EncryptedBatch(ciphertexts=batch.ciphertexts[:1], shapes=batch.shapes)
    claims_more = EncryptedBatch(ciphertexts=batch.ciphertexts, shapes=((3 * SLOTS,),))
    for bad in (short, claims_more):
        with pytest.raises(MalformedMessage, match="ciphertexts"):
            CkksAggregator(public).add(bad)
        with pytest.raises(MalformedMessage, match="ciphertexts"):
            holder.decrypt(bad)


@pytest.mark.parametrize(
    "blob",
    [b"garbage" * 20, b"\x00", b"\xff" * 1000],
    ids=["text", "one-byte", "ff"],
)
def test_garbage_ciphertext_rejected(holder, public, blob):
    batch = EncryptedBatch(ciphertexts=(blob,), shapes=((3,),))
    with pytest.raises(MalformedMessage):
        CkksAggregator(public).add(batch)
    with pytest.raises(MalformedMessage):
        holder.decrypt(batch)


def test_truncated_empty_and_foreign_ciphertexts_rejected(holder, public):
    good = holder.encrypt([np.ones(3)]).ciphertexts[0]
    lean = CkksKeyHolder.generate(CkksParams(8192, (60, 60), 40))
    foreign = lean.encrypt([np.ones(3)]).ciphertexts[0]  # a valid ciphertext, other parameters
    for blob in (good[: len(good) // 2], b"", foreign):
        with pytest.raises(MalformedMessage):
            CkksAggregator(public).add(EncryptedBatch(ciphertexts=(blob,), shapes=((3,),)))
    with pytest.raises(MalformedMessage):
        CkksAggregator(lean.public_context()).add(holder.encrypt([np.ones(3)]))


@pytest.mark.parametrize("blob", [b"", b"not a context", b"\x0a\x05hello"])
def test_garbage_context_rejected(blob):
    with pytest.raises(MalformedMessage):
        CkksAggregator(blob)
    with pytest.raises(MalformedMessage):
        CkksKeyHolder.from_bytes(blob)


@pytest.mark.parametrize(
    ("kwargs", "knob"),
    [
        ({"poly_modulus_degree": 5000}, "poly_modulus_degree"),
        ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, "security limit of 218"),
        ({"poly_modulus_degree": 4096}, "security limit of 109"),
        ({"poly_modulus_degree": 16384, "coeff_mod_bit_sizes": (60,) * 8}, "limit of 438"),
        ({"coeff_mod_bit_sizes": (61, 60)}, "coeff_mod_bit_sizes"),
        ({"coeff_mod_bit_sizes": (60,)}, "at least 2 primes"),
        ({"coeff_mod_bit_sizes": "60,60"}, "coeff_mod_bit_sizes"),
        ({"coeff_mod_bit_sizes": (60, 60), "global_scale_bits": 59}, "global_scale_bits"),
        ({"global_scale_bits": 0}, "global_scale_bits"),
        ({"global_scale_bits": True}, "global_scale_bits"),
    ],
)
def test_invalid_params_name_the_knob(kwargs, knob):
    with pytest.raises(ConfigError, match=knob):
        CkksParams(**kwargs)


def test_params_defaults_and_range():
    p = CkksParams(coeff_mod_bit_sizes=[60, 40, 40, 60])
    assert p == CkksParams()
    assert p.slot_count == 4096
    assert CkksParams(8192, (60, 60), 40).max_abs_value == 2.0**17


def test_bad_plaintext_inputs_rejected(holder):
    lean = CkksKeyHolder.generate(CkksParams(8192, (60, 60), 40))
    cases = [
        (holder, [np.array([1.0, np.nan])], "NaN"),
        (holder, [np.array([1j])], "dtype"),
        (holder, [np.array(["a"])], "dtype"),
        (holder, [np.zeros(0)], "nothing to encrypt"),
        (holder, [], "nothing to encrypt"),
        (holder, np.ones(3), "sequence"),
        (lean, [np.array([1e6])], "max_abs_value"),
    ]
    for h, arrays, match in cases:
        with pytest.raises(MalformedMessage, match=match):
            h.encrypt(arrays)


def test_sum_of_nothing_is_refused(public):
    with pytest.raises(ProtocolError):
        CkksAggregator(public).sum()


# ------------------------------------------------------------------ keyless scaling (CKKS updates)


def _sum_of(
    holder: CkksKeyHolder, public: bytes, batches: list[list[np.ndarray]]
) -> EncryptedBatch:
    agg = CkksAggregator(public)
    for arrays in batches:
        agg.add(holder.encrypt(arrays))
    return agg.sum()


def test_scale_and_add_folds_sums_into_an_encrypted_state_round_after_round(holder, public):
    """state = f * sum + state, twice, on the keyless context: matches float64 within the bound."""
    evaluator = CkksEvaluator(public)
    rng = np.random.default_rng(3)
    n, d = 4, SLOTS + 100  # the state spans two ciphertexts; the sum carries 50 more values
    initial = [rng.uniform(-0.5, 0.5, (d - 7,)), rng.uniform(-0.5, 0.5, (7,))]
    factors = np.concatenate([np.full(d - 7, 0.02), np.full(7, 3.0)])  # per-segment factors
    state: EncryptedBatch | list[np.ndarray] = initial
    expected = np.concatenate([a.ravel() for a in initial])
    for _ in range(2):
        batches = [[rng.uniform(-1.0, 1.0, d + 50)] for _ in range(n)]
        total = _sum_of(holder, public, batches)
        state = evaluator.scale_and_add(total, factors, state)
        expected = expected + factors * np.sum([b[0][:d] for b in batches], axis=0)[:d]
        assert state.depth == 1 and state.shapes == ((d - 7,), (7,))
        assert len(state.ciphertexts) == 2
    got = np.concatenate([a.ravel() for a in holder.decrypt(state)])
    tol = 2 * (n * np.abs(factors) * SCALING_ERROR_PER_FACTOR_AND_SUMMAND + SCALING_ERROR_FLOOR)
    assert np.all(np.abs(got - expected) <= tol)
    # The test can fail: a missed factor or a dropped round is far outside the tolerance.
    assert np.max(np.abs(got - np.concatenate([a.ravel() for a in initial]))) > 100 * tol.max()
    with pytest.raises(ValueError, match="secret_key"):  # still unreadable to the coordinator
        ts.ckks_vector_from(ts.context_from(public), state.ciphertexts[0]).decrypt()


def test_scaled_state_must_be_read_at_its_level(holder, public):
    evaluator = CkksEvaluator(public)
    total = _sum_of(holder, public, [[np.ones(10)]])
    state = evaluator.scale_and_add(total, np.full(10, 0.5), [np.zeros(10)])
    np.testing.assert_allclose(holder.decrypt(state)[0], 0.5, atol=1e-6)
    relabelled = msgspec.structs.replace(state, depth=0)
    with pytest.raises(MalformedMessage, match="level"):
        holder.decrypt(relabelled)
    with pytest.raises(MalformedMessage, match="depth 5"):
        holder.decrypt(msgspec.structs.replace(state, depth=5))
    agg = CkksAggregator(public)
    with pytest.raises(MalformedMessage, match="fresh"):
        agg.add(state)
    with pytest.raises(MalformedMessage, match="fresh sum"):
        evaluator.scale_and_add(state, np.ones(10), state)
    with pytest.raises(MalformedMessage, match="depth-1 state"):
        evaluator.scale_and_add(total, np.ones(10), total)
    with pytest.raises(MalformedMessage, match="factors"):
        evaluator.scale_and_add(total, np.ones(11), [np.zeros(11)])
    with pytest.raises(MalformedMessage, match="factors"):
        evaluator.scale_and_add(total, np.array([np.nan] * 10), [np.zeros(10)])
    with pytest.raises(MalformedMessage, match="base must hold 10"):
        evaluator.scale_and_add(total, np.ones(10), [np.zeros(9)])


def test_evaluator_needs_a_keyless_context_with_a_spare_level(holder):
    with pytest.raises(ConfigError, match="secret key"):
        CkksEvaluator(holder.to_bytes())
    lean = CkksKeyHolder.generate(CkksParams(8192, (60, 60), 40))
    with pytest.raises(ConfigError, match="no level"):
        CkksEvaluator(lean.public_context())


def test_window_relays_one_segment_of_a_sum(holder, public):
    values = np.arange(2 * SLOTS + 30, dtype=np.float64) / SLOTS
    total = _sum_of(holder, public, [[values]])
    start, stop = SLOTS + 5, 2 * SLOTS + 10
    window = total.window(start, stop, SLOTS)
    assert len(window.ciphertexts) == 2 and window.n_summed == 1
    head, segment = holder.decrypt(window)
    assert head.shape == (5,)
    np.testing.assert_allclose(segment, values[start:stop], atol=1e-8)
    for bad in [(0, 0), (10, 5), (0, values.size + 1)]:
        with pytest.raises(MalformedMessage, match="window"):
            total.window(*bad, SLOTS)
