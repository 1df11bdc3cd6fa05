"""SecAgg+ protocol: exact sums under dropouts, refusal of unsafe requests, typed bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import secagg
from secagg import kex
from secagg.graph import neighbour_graph
from secagg.local import local_graph_seed
from secagg.messages import AdvertiseKeys
from secagg.messages import KeyRoster
from secagg.messages import MaskedInput
from secagg.messages import RelayedShares
from secagg.messages import ShareKeys
from secagg.messages import Stage
from secagg.messages import UnmaskRequest
from secagg.messages import decode
from secagg.messages import encode
from tests.secagg_harness import ManualRound

STAGES = [s.value for s in Stage]


def _tolerance(n: int, clip: float = 1.0, bits: int = 16) -> float:
    # Stochastic rounding moves each client's value by less than one quantisation step.
    return n * clip / (2 ** (bits - 1) - 1) + 1e-12


@st.composite
def rounds(draw):
    n = draw(st.integers(2, 64))
    classic = draw(st.booleans())
    if classic:
        k = n - 1
    else:
        k = draw(st.integers(1, n - 1))
        if k % 2 == 1 and n % 2 == 1:
            k = k + 1 if k < n - 1 else k - 1
        k = max(k, 1)
    holders = k + 1
    t = draw(st.integers(holders // 2 + 1, holders))
    drop_rate = draw(st.sampled_from([0.0, 0.1, 0.3, 0.6]))
    flags = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    stages = draw(st.lists(st.sampled_from(STAGES), min_size=n, max_size=n))
    dropouts = {i: stages[i] for i in range(n) if flags[i] < drop_rate}
    d = draw(st.integers(1, 40))
    return n, k, t, dropouts, d, draw(st.integers(0, 2**32))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds())
def test_sum_is_exact_under_any_dropout_pattern(case):
    n, k, t, dropouts, d, seed = case
    rng = np.random.default_rng(seed)
    inputs = [rng.uniform(-1.2, 1.2, d) for _ in range(n)]
    finishers = [i for i in range(n) if i not in dropouts]
    try:
        result = secagg.run_local(inputs, threshold=t, neighbours=k, dropouts=dropouts, seed=seed)
    except secagg.TooFewSurvivors:
        # With the complete graph, t finishers always suffice; sparse graphs may fall short
        # locally, and then the only acceptable outcome is this error.
        assert k < n - 1 or len(finishers) < t
        return
    assert len(finishers) >= t
    masked_in = {i for i in range(n) if STAGES.index(dropouts.get(i, "unmask")) > 2}
    assert set(result.included) <= masked_in
    # A finisher is left out only when fewer than t of its closed neighbourhood advertised
    # keys (it cannot share its secrets t ways): never with the complete graph.
    graph = neighbour_graph(list(range(n)), k, local_graph_seed(seed))
    advertised = {i for i in range(n) if dropouts.get(i) != "advertise"}
    can_share = {u for u in finishers if len((graph[u] | {u}) & advertised) >= t}
    assert can_share == set(finishers) or k < n - 1
    assert can_share <= set(result.included)
    expected = sum(np.clip(inputs[i], -1, 1) for i in result.included)
    np.testing.assert_allclose(result.sum, expected, rtol=0, atol=_tolerance(len(result.included)))


def test_masked_inputs_hide_the_input():
    """What the server receives from one client is not its encoded input."""
    r = ManualRound(n=4, threshold=3, d=1000)
    r.advertise()
    r.respond()
    relayed = r.outgoing
    reply = r.clients[0].handle(relayed[0])
    masked = np.frombuffer(reply.vector, dtype=np.uint32)
    encoded = r.params.codec.encode(r.inputs[0])
    assert np.mean(masked == encoded) < 0.01
    # Uniform-looking: the top bit is set about half of the time.
    assert 0.4 < np.mean(masked >> 31) < 0.6


@pytest.mark.parametrize("stage", STAGES)
def test_fewer_than_threshold_survivors_raises_never_a_wrong_sum(stage):
    inputs = [np.full(4, 0.5) for _ in range(6)]
    dropouts = dict.fromkeys(range(3), stage)  # 3 remain, threshold 4
    with pytest.raises(secagg.TooFewSurvivors, match="threshold"):
        secagg.run_local(inputs, threshold=4, dropouts=dropouts)


def test_sparse_graph_with_enough_survivors_sums_exactly():
    rng = np.random.default_rng(1)
    inputs = [rng.uniform(-1, 1, 100) for _ in range(30)]
    result = secagg.run_local(
        inputs, threshold=5, neighbours=8, dropouts={3: "masked_input", 17: "unmask"}, seed=4
    )
    assert 3 not in result.included and 17 in result.included
    expected = sum(inputs[i] for i in result.included)
    np.testing.assert_allclose(result.sum, expected, atol=_tolerance(29))


def test_bytes_per_client_close_to_plain_float32():
    d = 20_000
    inputs = [np.zeros(d, dtype=np.float32) for _ in range(10)]
    result = secagg.run_local(inputs, threshold=4, neighbours=6, seed=0)
    assert all(sent < 1.05 * 4 * d for sent in result.bytes_sent.values())


# ---------------------------------------------------------------------------- refusals


def _round_at_unmask(n=5, threshold=4, drop=(4,)):
    r = ManualRound(n=n, threshold=threshold)
    r.advertise()
    r.respond()  # shares
    r.respond([i for i in range(n) if i not in drop])  # masked inputs
    r.respond([i for i in range(n) if i not in drop])  # survivor signatures
    return r


def test_unmask_request_for_both_shares_of_one_client_is_refused():
    r = _round_at_unmask()
    honest = r.outgoing[0]
    assert isinstance(honest, UnmaskRequest)
    greedy = UnmaskRequest(
        round_id=honest.round_id,
        survivors=honest.survivors,
        dropped=[*honest.dropped, 2],
        signatures=honest.signatures,
    )
    with pytest.raises(secagg.RefusedRequest, match="both"):
        r.clients[0].handle(greedy)
    assert r.clients[0].aborted


def test_unmask_request_with_a_survivor_set_other_than_the_signed_one_is_refused():
    r = _round_at_unmask()
    honest = r.outgoing[1]
    forged = UnmaskRequest(
        round_id=honest.round_id,
        survivors=[s for s in honest.survivors if s != 2],
        dropped=[*honest.dropped, 2],
        signatures=honest.signatures,
    )
    with pytest.raises(secagg.RefusedRequest, match="differs"):
        r.clients[1].handle(forged)


def test_unmask_request_without_enough_attestations_is_refused():
    r = _round_at_unmask()
    honest = r.outgoing[0]
    thin = UnmaskRequest(
        round_id=honest.round_id,
        survivors=honest.survivors,
        dropped=honest.dropped,
        signatures=honest.signatures[:2],
    )
    with pytest.raises(secagg.TooFewSurvivors, match="attested"):
        r.clients[0].handle(thin)


def test_a_second_unmask_request_in_the_same_round_is_refused():
    r = _round_at_unmask()
    r.clients[0].handle(r.outgoing[0])
    with pytest.raises(secagg.WrongStage):
        r.clients[0].handle(r.outgoing[0])


def test_replay_from_another_round_is_refused_by_client_and_server():
    old = _round_at_unmask()
    new = ManualRound(n=5, threshold=4, round_id=old.params.round_id + 1)
    new.advertise()
    with pytest.raises(secagg.WrongRound):
        new.clients[0].handle(old.outgoing[0])
    assert not new.clients[0].aborted  # a replay does not derail the honest client
    with pytest.raises(secagg.WrongRound):
        new.server.receive(1, old.server.advertised[1])  # its keys from the old round


def test_substituted_public_key_is_caught_by_signature():
    r = ManualRound(n=4, threshold=3)
    adverts = [c.advertise() for c in r.clients]
    forged = AdvertiseKeys(
        round_id=adverts[2].round_id,
        client_id=2,
        enc_pk=adverts[2].enc_pk,
        mask_pk=adverts[3].mask_pk,  # the server's or an attacker's key
        signature=adverts[2].signature,
    )
    # The server refuses it at intake ...
    with pytest.raises(secagg.BadSignature, match="client 2"):
        r.server.receive(2, forged)
    # ... and a client refuses a roster in which the server substituted it.
    roster = KeyRoster(round_id=forged.round_id, keys=[adverts[0], adverts[1], forged])
    with pytest.raises(secagg.BadSignature, match="client 2"):
        r.clients[0].handle(roster)


def test_tampered_relayed_share_fails_authentication(caplog):
    r = ManualRound(n=4, threshold=3)
    r.advertise()
    r.respond()
    relayed = r.outgoing[0]
    assert isinstance(relayed, RelayedShares)
    first = relayed.shares[0]
    flipped = bytes([first.ciphertext[0] ^ 1]) + first.ciphertext[1:]
    tampered = RelayedShares(
        round_id=relayed.round_id,
        shares=[type(first)(peer=first.peer, ciphertext=flipped), *relayed.shares[1:]],
    )
    with pytest.raises(secagg.InvalidShare) as info:  # a DecryptionError naming the sender
        r.clients[0]._open_share(first.peer, flipped)
    assert info.value.sender == first.peer
    # Not fatal: the client names the sender to the server with its masked input and goes on.
    with caplog.at_level(logging.WARNING, logger="secagg.client"):
        reply = r.clients[0].handle(tampered)
    assert isinstance(reply, MaskedInput) and not r.clients[0].aborted
    assert reply.accused == [first.peer]
    assert f"accuses client {first.peer}" in caplog.text


# ---------------------------------------------------------------------------- bad input


def test_garbage_and_truncated_frames_raise_malformed_message():
    good = encode(ManualRound(n=3, threshold=3).clients[0].advertise())
    for frame in (b"", b"\xff\xfe", good[:-5], good + b"\x00", b"\x81\xa4type\xa3bad"):
        with pytest.raises(secagg.MalformedMessage):
            decode(frame)
    with pytest.raises(secagg.MalformedMessage, match="limit"):
        decode(good, max_bytes=10)


def test_wrong_field_types_and_out_of_range_ids_are_rejected():
    import msgspec

    raw = msgspec.msgpack.decode(encode(ManualRound(n=3, threshold=3).clients[0].advertise()))
    for field, value in [("client_id", -1), ("client_id", 1 << 40), ("enc_pk", b"short"),
                         ("round_id", "seven"), ("signature", 5)]:  # fmt: skip
        bad = dict(raw, **{field: value})
        with pytest.raises(secagg.MalformedMessage):
            decode(msgspec.msgpack.encode(bad))


def test_bad_messages_leave_the_server_serving_honest_clients():
    r = ManualRound(n=5, threshold=4, d=16)
    adverts = [c.advertise() for c in r.clients]
    for i, adv in enumerate(adverts):
        r.send(i, adv)
    with pytest.raises(secagg.DuplicateMessage):
        r.send(0, adverts[0])
    with pytest.raises(secagg.ProtocolError, match="claims"):
        r.server.receive(1, adverts[2])  # client 1 speaks for client 2
    with pytest.raises(secagg.UnknownParty):
        r.server.receive(9, adverts[0])
    with pytest.raises(secagg.WrongStage):
        r.server.receive(0, ShareKeys(round_id=r.params.round_id, client_id=0, shares=[]))
    r.advance()
    with pytest.raises(secagg.MalformedMessage, match="expected exactly one"):
        r.send(0, ShareKeys(round_id=r.params.round_id, client_id=0, shares=[]))
    r.respond()
    # Masked input of the wrong length, then from a round that is not this one.
    short = MaskedInput(round_id=r.params.round_id, client_id=0, vector=memoryview(bytes(8)))
    with pytest.raises(secagg.MalformedMessage, match="bytes"):
        r.send(0, short)
    replay = MaskedInput(round_id=r.params.round_id - 1, client_id=0, vector=memoryview(bytes(64)))
    with pytest.raises(secagg.WrongRound):
        r.send(0, replay)
    r.respond()
    r.respond()
    r.respond()
    assert r.server.stage is None
    result = r.params.codec.decode(r.server.result)
    np.testing.assert_allclose(result, sum(r.inputs), atol=_tolerance(5))


def test_client_rejects_input_of_the_wrong_length_and_unknown_ids():
    r = ManualRound(n=3, threshold=3, d=4)
    with pytest.raises(secagg.MalformedMessage, match="expects 4"):
        secagg.SecAggClient(r.params, 0, np.zeros(5), r.keys[0], r.identities)
    with pytest.raises(secagg.UnknownParty):
        secagg.SecAggClient(r.params, 7, np.zeros(4), r.keys[0], r.identities)


def test_round_parameters_refuse_unsafe_thresholds():
    with pytest.raises(secagg.ConfigError, match="strict majority"):
        secagg.run_local([np.zeros(2)] * 6, threshold=3)
    with pytest.raises(secagg.ConfigError, match="dropout stage"):
        secagg.run_local([np.zeros(2)] * 3, threshold=2, dropouts={0: "lunch"})


def test_key_agreement_is_symmetric_and_bound_to_round_and_parties():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pa, pb = kex.raw_public(a), kex.raw_public(b)
    ab = kex.agree(a, pb, purpose=kex.MASK_PURPOSE, round_id=1, me=0, peer=1)
    assert ab == kex.agree(b, pa, purpose=kex.MASK_PURPOSE, round_id=1, me=1, peer=0)
    assert ab != kex.agree(a, pb, purpose=kex.MASK_PURPOSE, round_id=2, me=0, peer=1)
    assert ab != kex.agree(a, pb, purpose=kex.MASK_PURPOSE, round_id=1, me=0, peer=2)
    assert ab != kex.agree(a, pb, purpose=kex.SHARE_PURPOSE, round_id=1, me=0, peer=1)
    with pytest.raises(secagg.MalformedMessage, match="low-order"):
        kex.agree(a, bytes(32), purpose=kex.MASK_PURPOSE, round_id=1, me=0, peer=1)
