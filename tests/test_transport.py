"""The authenticated ZeroMQ transport over real TCP sockets on loopback."""

from __future__ import annotations

import logging
import os
import threading
import time

import msgspec
import numpy as np
import pytest
import zmq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clients.contract.framing import PeerUnreachable
from clients.contract.messages import Hello
from clients.contract.messages import RoundEnd
from clients.contract.messages import RoundStart
from clients.runtime.transport import InstitutionEndpoint
from coordinator.transport import CoordinatorEndpoint
from coordinator.transport import key_fingerprint
from coordinator.transport import run_secagg_round
from secagg.client import SecAggClient
from secagg.errors import ConfigError
from secagg.errors import TooFewSurvivors
from secagg.errors import WrongRound
from secagg.messages import AdvertiseKeys
from secagg.messages import MaskedInput
from secagg.messages import RoundParams
from secagg.messages import SurvivorSignature
from secagg.messages import encode
from secagg.server import SecAggServer

LIMIT = 1 << 16  # max_message_bytes of every endpoint here
WAIT = 10.0  # generous upper bound for things that should happen at once; never reached if OK
NAMES = ["alice", "bob", "carol", "dave"]


@pytest.fixture
def keys():
    """CurveZMQ key pairs (public, secret) for the coordinator and each institution."""
    return {name: zmq.curve_keypair() for name in ["coordinator", *NAMES, "mallory"]}


@pytest.fixture
def coordinator(keys):
    public, secret = keys["coordinator"]
    roster = {name: keys[name][0] for name in NAMES}
    endpoint = CoordinatorEndpoint("tcp://127.0.0.1:*", secret, public, roster, LIMIT)
    yield endpoint
    endpoint.close()


@pytest.fixture
def connect(keys, coordinator):
    """Open InstitutionEndpoints to the coordinator; all closed after the test."""
    opened = []

    def open_endpoint(name: str, address: str | None = None) -> InstitutionEndpoint:
        public, secret = keys[name]
        endpoint = InstitutionEndpoint(
            address or coordinator.address, secret, public, keys["coordinator"][0], LIMIT
        )
        opened.append(endpoint)
        return endpoint

    yield open_endpoint
    for endpoint in opened:
        endpoint.close()


@pytest.fixture
def raw_dealer(keys, coordinator):
    """Bare DEALER sockets with some institution's keys, to send frames the endpoint never would."""
    context = zmq.Context()

    def open_socket(name: str, routing_id: bytes | None = None) -> zmq.Socket:
        socket = context.socket(zmq.DEALER)
        socket.linger = 0
        if routing_id is not None:
            socket.routing_id = routing_id
        socket.curve_publickey, socket.curve_secretkey = keys[name]
        socket.curve_serverkey = keys["coordinator"][0]
        socket.connect(coordinator.address)
        return socket

    yield open_socket
    context.destroy(linger=0)


def receive_until(endpoint: CoordinatorEndpoint, count: int) -> list[tuple[str, object]]:
    """``count`` messages from the coordinator endpoint (fails if they do not come)."""
    got = []
    deadline = time.monotonic() + WAIT
    while len(got) < count and time.monotonic() < deadline:
        item = endpoint.recv(deadline - time.monotonic())
        if item is not None:
            got.append(item)
    assert len(got) == count, f"only {got} arrived"
    return got


def fake_advertisement(client_id: int, round_id: int = 1) -> AdvertiseKeys:
    return AdvertiseKeys(
        round_id=round_id, client_id=client_id, enc_pk=bytes(32), mask_pk=bytes(32),
        signature=bytes(64),
    )  # fmt: skip


def test_names_come_from_authentication_not_from_the_payload(coordinator, connect, raw_dealer):
    alice = connect("alice")
    # bob claims alice's client id in the payload and even picks "alice" as routing id
    bob = raw_dealer("bob", routing_id=b"alice")
    bob.send(encode(fake_advertisement(client_id=0)))
    alice.send(Hello())
    got = dict(receive_until(coordinator, 2))
    assert got == {"bob": fake_advertisement(client_id=0), "alice": Hello()}
    assert coordinator.connected == {"alice", "bob"}

    coordinator.send("alice", RoundEnd(round_id=3, included=[0]))
    assert alice.recv(WAIT) == RoundEnd(round_id=3, included=[0])
    assert not bob.poll(100)  # nothing meant for alice went to bob


def test_send_to_an_institution_that_never_spoke_is_a_typed_error(coordinator):
    with pytest.raises(PeerUnreachable, match="carol"):
        coordinator.send("carol", RoundEnd(round_id=1, included=[]))


@pytest.mark.parametrize("peer", ["unknown key", "no encryption"])
def test_a_peer_outside_the_roster_gets_nothing_through(coordinator, connect, keys, caplog, peer):
    caplog.set_level(logging.INFO)
    context = zmq.Context()
    try:
        socket = context.socket(zmq.DEALER)
        socket.linger = 0
        if peer == "unknown key":
            socket.curve_publickey, socket.curve_secretkey = keys["mallory"]
            socket.curve_serverkey = keys["coordinator"][0]
        socket.connect(coordinator.address)
        for _ in range(3):
            socket.send(encode(Hello()))
        assert coordinator.recv(1.0) is None
    finally:
        context.destroy(linger=0)
    assert coordinator.connected == frozenset()
    if peer == "unknown key":
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert refusals
        assert key_fingerprint(keys["mallory"][0]) in refusals[0]
    # the coordinator still serves the roster
    connect("alice").send(Hello())
    assert receive_until(coordinator, 1) == [("alice", Hello())]


def test_bad_frames_are_dropped_and_logged_while_others_are_served(
    coordinator, connect, raw_dealer, caplog
):
    caplog.set_level(logging.WARNING)
    bob = raw_dealer("bob")
    bad_frames = [
        [b"\xc1 not msgpack"],
        [encode(Hello()), encode(Hello())],  # two frames
        [encode(RoundEnd(round_id=1, included=[]))],  # only the coordinator sends this
        [msgspec.msgpack.encode({"type": "Hello", "extra": 1})],
        [msgspec.msgpack.encode({"type": "SurvivorSignature", "round_id": -1})],
        [bytes(LIMIT + 1)],  # over the limit, under the hard cap
    ]
    for frames in bad_frames:
        bob.send_multipart(frames)
    bob.send(encode(Hello()))  # after the bad frames on the same connection
    connect("alice").send(Hello())

    got = receive_until(coordinator, 2)
    assert sorted(got) == [("alice", Hello()), ("bob", Hello())]
    dropped = [
        r.getMessage() for r in caplog.records if "dropped a frame from bob" in r.getMessage()
    ]
    assert len(dropped) == len(bad_frames)
    assert "exactly one" in dropped[1]
    assert "exceeds" in dropped[-1]


def test_a_frame_over_the_hard_cap_cuts_only_that_connection(coordinator, connect, raw_dealer):
    bob = raw_dealer("bob")
    bob.send(bytes(3 * LIMIT))  # libzmq drops the connection before buffering this
    alice = connect("alice")
    alice.send(Hello())
    assert receive_until(coordinator, 1) == [("alice", Hello())]
    # bob's socket reconnects by itself and gets through again
    deadline = time.monotonic() + WAIT
    while (got := coordinator.recv(0.2)) is None and time.monotonic() < deadline:
        bob.send(encode(Hello()))
    assert got == ("bob", Hello())


def test_the_institution_drops_bad_frames_from_the_coordinator(keys, caplog):
    caplog.set_level(logging.WARNING)
    public, secret = keys["coordinator"]
    context = zmq.Context()
    fake = context.socket(zmq.ROUTER)  # a coordinator that sends what the real one never would
    fake.linger = 0
    fake.curve_server = True
    fake.curve_publickey, fake.curve_secretkey = public, secret
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    alice_public, alice_secret = keys["alice"]
    try:
        with InstitutionEndpoint(
            f"tcp://127.0.0.1:{port}", alice_secret, alice_public, public, LIMIT
        ) as alice:
            alice.send(Hello())
            assert fake.poll(int(WAIT * 1000))
            route, _ = fake.recv_multipart()
            good = encode(RoundEnd(round_id=1, included=[0]))
            fake.send_multipart([route, b"\xc1"])
            fake.send_multipart([route, good, good])
            fake.send_multipart([route, encode(Hello())])  # only institutions send this
            fake.send_multipart([route, bytes(LIMIT + 1)])
            fake.send_multipart([route, good])
            assert alice.recv(WAIT) == RoundEnd(round_id=1, included=[0])
    finally:
        context.destroy(linger=0)
    dropped = [
        r for r in caplog.records if "dropped a frame from the coordinator" in r.getMessage()
    ]
    assert len(dropped) == 4


def test_client_reconnects_to_a_restarted_coordinator_and_delivers_what_it_queued(
    keys, coordinator, connect
):
    alice = connect("alice")
    alice.send(SurvivorSignature(round_id=1, client_id=0, signature=bytes(64)))
    assert receive_until(coordinator, 1)[0][1].round_id == 1
    address = coordinator.address
    coordinator.close()
    alice.send(SurvivorSignature(round_id=2, client_id=0, signature=bytes(64)))  # while down

    public, secret = keys["coordinator"]
    roster = {name: keys[name][0] for name in NAMES}
    with CoordinatorEndpoint(address, secret, public, roster, LIMIT) as restarted:
        alice.send(SurvivorSignature(round_id=3, client_id=0, signature=bytes(64)))
        got = receive_until(restarted, 2)
        assert [(name, message.round_id) for name, message in got] == [("alice", 2), ("alice", 3)]
        restarted.send("alice", RoundEnd(round_id=3, included=[0]))
        assert alice.recv(WAIT) == RoundEnd(round_id=3, included=[0])


def test_roster_must_be_valid(keys):
    public, secret = keys["coordinator"]
    with pytest.raises(ConfigError, match="same key"):
        CoordinatorEndpoint(
            "tcp://127.0.0.1:*", secret, public, {"a": keys["bob"][0], "b": keys["bob"][0]}
        )
    with pytest.raises(ConfigError, match="'a'"):
        CoordinatorEndpoint("tcp://127.0.0.1:*", secret, public, {"a": b"short"})


# ------------------------------------------------------------------ a secagg round over sockets


def institution(endpoint, values, identity_key, identities, outcome, *, stop_before=None):
    """An institution's side of one round: answer every coordinator message until RoundEnd.

    ``stop_before``: a message type this institution silently never sends (it vanishes).
    """
    try:
        endpoint.send(Hello())
        client = None
        while (message := endpoint.recv(WAIT)) is not None:
            if isinstance(message, RoundEnd):
                outcome["end"] = message
                return
            if isinstance(message, RoundStart):
                client = SecAggClient(  # the transport, not the threshold bound, is tested
                    message.params, message.client_id, values, identity_key, identities,
                    active_bound=False,
                )  # fmt: skip
                reply = client.advertise()
                # misbehave: a copy that claims the next client's id, then a duplicate
                spoof_id = (message.client_id + 1) % len(message.params.client_ids)
                endpoint.send(msgspec.structs.replace(reply, client_id=spoof_id))
                endpoint.send(reply)
            else:
                reply = client.handle(message)
            if isinstance(reply, stop_before or ()):
                outcome["stopped"] = type(reply).__name__
                return
            endpoint.send(reply)
        outcome["end"] = None
    except Exception as exc:
        outcome["error"] = exc


def run_round_over_sockets(coordinator, connect, *, n, threshold, dropouts, d=16, **options):
    names = dict(enumerate(NAMES[:n]))
    rng = np.random.default_rng(1)
    inputs = [rng.uniform(-1, 1, d) for _ in range(n)]
    identity_keys = [Ed25519PrivateKey.generate() for _ in range(n)]
    identities = {i: k.public_key() for i, k in enumerate(identity_keys)}
    outcomes = [{} for _ in range(n)]
    threads = [
        threading.Thread(
            target=institution,
            args=(connect(names[i]), inputs[i], identity_keys[i], identities, outcomes[i]),
            kwargs={"stop_before": dropouts.get(i)},
        )
        for i in range(n)
    ]
    for thread in threads:
        thread.start()
    assert {name for name, _ in receive_until(coordinator, n)} == set(names.values())

    params = RoundParams(
        round_id=5, client_ids=list(range(n)), threshold=threshold, neighbours=n - 1,
        graph_seed=os.urandom(32), vector_length=d,
    )  # fmt: skip
    server = SecAggServer(params, identities)
    try:
        total = run_secagg_round(coordinator, server, names, stage_timeout_s=3.0, **options)
    except TooFewSurvivors as exc:
        total = exc
    finally:
        for thread in threads:
            thread.join(WAIT)
    return inputs, server, total, outcomes


def test_a_secagg_round_over_sockets_survives_a_silent_dropout(coordinator, connect, caplog):
    caplog.set_level(logging.WARNING)
    inputs, server, total, outcomes = run_round_over_sockets(
        coordinator, connect, n=4, threshold=3, dropouts={2: MaskedInput}
    )
    assert server.included == [0, 1, 3]
    np.testing.assert_allclose(total, inputs[0] + inputs[1] + inputs[3], atol=1e-3)
    assert outcomes[2] == {"stopped": "MaskedInput"}
    for i in (0, 1, 3):
        assert outcomes[i] == {"end": RoundEnd(round_id=5, included=[0, 1, 3])}
    refused = [r.getMessage() for r in caplog.records if "rejected AdvertiseKeys" in r.getMessage()]
    # the id comes from the authenticated name, so a message claiming another id is refused
    spoofs = [m for m in refused if "claims another client id" in m]
    assert len(spoofs) == 4
    # a second advertisement is refused as a duplicate, or as stale once the stage closed
    repeats = [m for m in refused if "already sent" in m or "collecting ShareKeys" in m]
    assert len(repeats) == 4


def test_a_round_below_threshold_aborts_and_tells_the_institutions(coordinator, connect):
    _, server, total, outcomes = run_round_over_sockets(
        coordinator, connect, n=3, threshold=3, dropouts={0: MaskedInput}
    )
    assert isinstance(total, TooFewSurvivors)
    assert server.result is None
    for i in (1, 2):
        end = outcomes[i]["end"]
        assert end.included == []
        assert "below the threshold" in end.error


def test_a_message_replayed_from_an_earlier_round_is_rejected(coordinator, connect):
    _, first, _, _ = run_round_over_sockets(coordinator, connect, n=3, threshold=2, dropouts={})
    assert first.included == [0, 1, 2]
    # Round 6 starts; alice replays the advertisement she sent in round 5.
    alice = connect("alice")
    alice.send(Hello())
    receive_until(coordinator, 1)
    params = msgspec.structs.replace(first.params, round_id=6)
    server = SecAggServer(params, first._identities)
    replay = first.advertised[0]
    alice.send(replay)
    name, message = receive_until(coordinator, 1)[0]
    assert (name, message) == ("alice", replay)
    with pytest.raises(WrongRound, match="replay"):
        server.receive(0, message)
    assert server.expected == {0, 1, 2}  # nothing was accepted


def test_the_first_stage_gets_the_training_timeout_and_the_others_the_stage_timeout(
    coordinator, connect, monkeypatch
):
    """The first stage includes the institutions' local training (``training_timeout_s``)."""
    import coordinator.transport as transport

    granted: list[tuple[str, float]] = []
    original = transport._collect

    def collect(endpoint, server, ids, deadline, on_message):
        granted.append((server.stage.value, deadline - time.monotonic()))
        original(endpoint, server, ids, deadline, on_message)

    monkeypatch.setattr(transport, "_collect", collect)
    _, server, _, _ = run_round_over_sockets(
        coordinator, connect, n=3, threshold=2, dropouts={}, first_stage_timeout_s=60.0
    )
    assert server.included == [0, 1, 2]
    (first, first_s), *rest = granted
    assert first == "advertise" and 3.0 < first_s <= 60.0
    assert rest and all(seconds <= 3.0 for _, seconds in rest)


def test_an_institution_gone_before_the_round_start_is_not_waited_for(
    coordinator, connect, monkeypatch
):
    """One that said Hello and vanished before its RoundStart could be sent is given up on at
    once: the first stage awaits only the others."""
    import coordinator.transport as transport

    n = 3
    names = dict(enumerate(NAMES[:n]))
    identity_keys = [Ed25519PrivateKey.generate() for _ in range(n)]
    identities = {i: k.public_key() for i, k in enumerate(identity_keys)}
    gone = connect(names[2])
    gone.send(Hello())
    assert [name for name, _ in receive_until(coordinator, 1)] == [names[2]]
    gone.close()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:  # until the coordinator's socket noticed
        try:
            coordinator.send(names[2], RoundEnd(round_id=0, included=[]))
        except PeerUnreachable:
            break
        time.sleep(0.1)
    rng = np.random.default_rng(2)
    inputs = [rng.uniform(-1, 1, 8) for _ in range(n)]
    outcomes = [{} for _ in range(n)]
    threads = [
        threading.Thread(
            target=institution,
            args=(connect(names[i]), inputs[i], identity_keys[i], identities, outcomes[i]),
        )
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    assert {name for name, _ in receive_until(coordinator, 2)} == {names[0], names[1]}
    awaited: list[set[int]] = []
    original = transport._collect

    def collect(endpoint, server, ids, deadline, on_message):
        awaited.append(set(server.expected))
        original(endpoint, server, ids, deadline, on_message)

    monkeypatch.setattr(transport, "_collect", collect)
    params = RoundParams(
        round_id=9, client_ids=list(range(n)), threshold=2, neighbours=n - 1,
        graph_seed=os.urandom(32), vector_length=8,
    )  # fmt: skip
    server = SecAggServer(params, identities)
    try:
        total = run_secagg_round(coordinator, server, names, stage_timeout_s=WAIT)
    finally:
        for thread in threads:
            thread.join(WAIT)
    assert awaited[0] == {0, 1}  # the vanished one was never awaited
    assert server.included == [0, 1]
    np.testing.assert_allclose(total, inputs[0] + inputs[1], atol=1e-3)
