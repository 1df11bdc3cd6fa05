"""Hostile frames over real CurveZMQ sockets: neither side raises, both keep serving.

A roster member (mallory) sends the coordinator 10^4 mutated frames (nesting bombs, huge
declared lengths, wrong types, truncations, random bytes, oversize frames) and then joins a
real SecAgg+ round as a fuzzing participant; the honest institutions' sum must come out right.
A fake coordinator (holding the coordinator's CurveZMQ keys) sends a real
:class:`~clients.runtime.institution.Institution` 10^4 mutated frames; it must then answer a
legitimate round start with a correctly signed key advertisement and leave on Shutdown.
Each side must log exactly one "dropped a frame" line per frame its decoder refuses.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import pytest
import zmq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clients.contract.framing import SEND_HWM
from clients.contract.framing import receive_queue_depth
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import generate_keys
from clients.contract.keys import identity_keys
from clients.contract.keys import load_coordinator_keys
from clients.contract.keys import load_roster
from clients.contract.messages import Assignment
from clients.contract.messages import Decline
from clients.contract.messages import Hello
from clients.contract.messages import RoundEnd
from clients.contract.messages import RoundStart
from clients.contract.messages import Shutdown
from clients.contract.messages import decode_from_client
from clients.contract.messages import decode_from_server
from clients.runtime.transport import InstitutionEndpoint
from coordinator.app.wiring import make_institution
from coordinator.transport import CoordinatorEndpoint
from coordinator.transport import run_secagg_round
from privacy.head import LedgerHead
from secagg.errors import MalformedMessage
from secagg.messages import AdvertiseKeys
from secagg.messages import EncryptedShare
from secagg.messages import KeyRoster
from secagg.messages import MaskedInput
from secagg.messages import RelayedShares
from secagg.messages import RoundParams
from secagg.messages import ShareKeys
from secagg.messages import SurvivorSetRequest
from secagg.messages import SurvivorSignature
from secagg.messages import UnmaskRequest
from secagg.messages import UnmaskShares
from secagg.messages import decode
from secagg.messages import encode
from secagg.server import SecAggServer
from tests.frame_fuzzer import mutated_frames
from tests.frame_fuzzer import nesting_bomb
from tests.test_runtime import NAMES as RUNTIME_NAMES
from tests.test_runtime import write_config
from tests.test_transport import institution  # an honest one (its spoofed copies are refused)

LIMIT = 1 << 16
FRAMES = int(os.environ.get("FUZZ_FRAMES", 10_000))
WAIT = 60.0  # upper bound for things that should happen at once; reached only if broken
HONEST = ["alice", "bob", "carol"]
ROUND = 7


def test_a_three_kilobyte_nesting_bomb_is_a_malformed_message_for_every_decoder():
    bomb = b"\x81\xa1a" * 1000 + b"\xc0"
    assert len(bomb) < 3100
    for decoder in (decode, decode_from_client, decode_from_server):
        with pytest.raises(MalformedMessage, match="RecursionError"):
            decoder(bomb)


def client_corpus(round_id: int, client_id: int) -> list[bytes]:
    """Valid frames an institution sends, all naming ``round_id`` and ``client_id``."""
    r, c = round_id, client_id
    return [encode(m) for m in [
        Hello(),
        LedgerHead(institution="mallory", entries=3, last_hash=bytes(32), signature=bytes(64)),
        Decline(round_id=r, client_id=c, reason="no"),
        AdvertiseKeys(round_id=r, client_id=c, enc_pk=bytes(32), mask_pk=bytes(32),
                      signature=bytes(64)),
        ShareKeys(round_id=r, client_id=c, shares=[EncryptedShare(peer=0, ciphertext=b"x" * 80)]),
        MaskedInput(round_id=r, client_id=c, vector=memoryview(bytes(64))),
        MaskedInput(round_id=r, client_id=c, vector=memoryview(bytes(64)), accused=[1, 2]),
        SurvivorSignature(round_id=r, client_id=c, signature=bytes(64)),
        UnmaskShares(round_id=r, client_id=c, self_mask_shares={0: b"a" * 40},
                     mask_key_shares={1: b"b" * 40}),
    ]]  # fmt: skip


def server_corpus(params: RoundParams) -> list[bytes]:
    """Valid frames a coordinator sends, for the round of ``params`` (not Shutdown: a valid one,
    from the authenticated coordinator, rightly ends the institution)."""
    r = params.round_id
    return [encode(m) for m in [
        RoundStart(params=params, client_id=0, global_state=b"\x08" + bytes(16)),
        RoundEnd(round_id=r, included=[0, 1]),
        KeyRoster(round_id=r, keys=[]),
        RelayedShares(round_id=r, shares=[EncryptedShare(peer=1, ciphertext=b"y" * 80)]),
        SurvivorSetRequest(round_id=r, survivors=[0, 1]),
        UnmaskRequest(round_id=r, survivors=[0], dropped=[1], signatures=[]),
        Assignment(round_id=r, selection=b"\x00" * 8),
    ]]  # fmt: skip


def hostile(corpus: list[bytes], count: int, seed: int) -> list[bytes]:
    """``count`` fuzz frames; every 97th is over the size limit (read, refused, logged)."""
    frames = list(mutated_frames(corpus, count, seed))
    for i in range(0, count, 97):
        frames[i] = os.urandom(LIMIT + 1 + i % LIMIT)
    return frames


def refused(frames: list[bytes], decoder) -> int:
    """How many of ``frames`` ``decoder`` refuses (under the size limit of this file)."""
    count = 0
    for frame in frames:
        try:
            decoder(frame, max_bytes=LIMIT)
        except MalformedMessage:
            count += 1
    return count


class DropCounter(logging.Handler):
    """Counts the "dropped a frame from <sender>" lines of one logger (caplog is too slow for
    10^4 records)."""

    def __init__(self, logger: str, sender: str) -> None:
        super().__init__(logging.WARNING)
        self.needle = f"dropped a frame from {sender}:"
        self.count = 0
        self.logger = logging.getLogger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith(self.needle)

    def __enter__(self) -> DropCounter:
        self.logger.addHandler(self)
        self.level_before = self.logger.level
        self.logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


@pytest.fixture
def curve_keys():
    return {name: zmq.curve_keypair() for name in ["coordinator", *HONEST, "mallory"]}


def curve_dealer(context: zmq.Context, keys, name: str, address: str) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.curve_publickey, socket.curve_secretkey = keys[name]
    socket.curve_serverkey = keys["coordinator"][0]
    socket.connect(address)
    return socket


def fuzzing_participant(socket: zmq.Socket, frames: list[bytes], outcome: dict) -> None:
    """Mallory in the round: on RoundStart, spray ``frames``, then decline (so nobody waits)."""
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and socket.poll(int(WAIT * 1000)):
            message = decode_from_server(socket.recv(), max_bytes=LIMIT)
            if isinstance(message, RoundStart):
                for frame in frames:
                    socket.send(frame)
                reply = Decline(round_id=message.params.round_id,
                                client_id=message.client_id, reason="done fuzzing")  # fmt: skip
                socket.send(encode(reply))
            elif isinstance(message, RoundEnd):
                outcome["end"] = message
                return
    except Exception as exc:  # reported by the test
        outcome["error"] = exc


def spray(socket: zmq.Socket, frames: list[bytes], last: bytes) -> threading.Thread:
    """Send ``frames`` (every 1000th twice in one multipart message), then ``last``, from a
    thread: a live attacker sends while the victim reads."""

    def run() -> None:
        for i, frame in enumerate(frames):
            socket.send_multipart([frame, frame] if i % 1000 == 1 else [frame])
        socket.send(last)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_the_coordinator_survives_ten_thousand_hostile_frames_and_runs_a_correct_round(curve_keys):
    public, secret = curve_keys["coordinator"]
    roster = {name: curve_keys[name][0] for name in [*HONEST, "mallory"]}
    context = zmq.Context()
    n = 4
    names = dict(enumerate([*HONEST, "mallory"]))
    inputs = list(np.random.default_rng(3).uniform(-1, 1, (3, 16)))
    identity = [Ed25519PrivateKey.generate() for _ in range(n)]
    identities = {i: k.public_key() for i, k in enumerate(identity)}
    params = RoundParams(
        round_id=ROUND, client_ids=list(range(n)), threshold=3, neighbours=n - 1,
        graph_seed=os.urandom(32), vector_length=16,
    )  # fmt: skip
    outcomes = [{} for _ in range(n)]
    frames = hostile(client_corpus(ROUND, 3), FRAMES, seed=12)
    sentinel = Decline(round_id=999, client_id=3, reason="end of the fuzz")
    with (
        DropCounter("coordinator.transport", "mallory") as drops,
        CoordinatorEndpoint("tcp://127.0.0.1:*", secret, public, roster, LIMIT) as coordinator,
    ):
        mallory = curve_dealer(context, curve_keys, "mallory", coordinator.address)
        try:
            # 1. between rounds (the gather loop): 10^4 hostile frames
            sprayer = spray(mallory, frames, encode(sentinel))
            accepted = []
            deadline = time.monotonic() + WAIT
            while (received := coordinator.recv(1.0)) != ("mallory", sentinel):
                assert time.monotonic() < deadline, f"only {drops.count} frames were dropped"
                if received is not None:
                    accepted.append(received)
            sprayer.join(WAIT)
            dropped_between_rounds = drops.count

            # 2. a real round: three honest institutions and mallory, who fuzzes it
            endpoints = [
                InstitutionEndpoint(coordinator.address, curve_keys[name][1],
                                    curve_keys[name][0], public, LIMIT)
                for name in HONEST
            ]  # fmt: skip
            threads = [
                threading.Thread(target=institution,
                                 args=(endpoints[i], inputs[i], identity[i], identities,
                                       outcomes[i]))
                for i in range(3)
            ]  # fmt: skip
            in_round = hostile(client_corpus(ROUND, 3), 2_000, seed=13)
            threads.append(threading.Thread(target=fuzzing_participant,
                                            args=(mallory, in_round, outcomes[3])))  # fmt: skip
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + WAIT
            while set(HONEST) - coordinator.connected and time.monotonic() < deadline:
                coordinator.recv(0.2)
            server = SecAggServer(params, identities)
            total = run_secagg_round(coordinator, server, names, stage_timeout_s=WAIT)
            for thread in threads:
                thread.join(WAIT)
            for endpoint in endpoints:
                endpoint.close()
        finally:
            context.destroy(linger=0)
    single = [f for i, f in enumerate(frames) if i % 1000 != 1]
    multipart = FRAMES - len(single)
    assert len(accepted) == len(single) - refused(single, decode_from_client)
    assert all(name == "mallory" for name, _ in accepted)
    assert dropped_between_rounds == multipart + refused(single, decode_from_client)
    assert drops.count > dropped_between_rounds  # mallory's frames mid-round were dropped too
    assert server.included == [0, 1, 2]
    np.testing.assert_allclose(total, sum(inputs), atol=3 * params.codec.max_error_per_client)
    assert [o.get("end") for o in outcomes] == [RoundEnd(round_id=ROUND, included=[0, 1, 2])] * 4


def test_an_institution_survives_ten_thousand_hostile_frames_and_still_serves(tmp_path):
    generate_keys(tmp_path / "keys", RUNTIME_NAMES)
    config = write_config(tmp_path)
    name = RUNTIME_NAMES[0]
    institution = make_institution(config, name)
    layout = institution.learner.layout(institution.learner.local_state())
    keys = load_coordinator_keys(config.keys_dir)
    context = zmq.Context()
    fake = context.socket(zmq.ROUTER)  # a coordinator that sends what the real one never would
    fake.linger = 0
    fake.curve_server = True
    fake.curve_publickey, fake.curve_secretkey = keys.curve_public, keys.curve_secret
    fake.setsockopt(zmq.ROUTER_MANDATORY, 1)
    fake.bind(config.coordinator.bind.rsplit(":", 1)[0] + ":*")
    address = fake.last_endpoint.decode()
    config = write_config(tmp_path, bind=address)
    institution.config = config
    stop = threading.Event()
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            result["exit"] = institution.run(stop)
        except BaseException as exc:  # reported by the test
            result["exit"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    drops = DropCounter("clients.runtime.transport", "the coordinator").__enter__()
    thread.start()
    try:
        assert fake.poll(int(WAIT * 1000))
        route, first = fake.recv_multipart()
        assert decode_from_client(first) == Hello()
        params = config.secagg.round_params(ROUND, [0, 1, 2], os.urandom(32), layout.length("mask"))
        frames = hostile(server_corpus(params), FRAMES, seed=21)
        for frame in frames:
            fake.send_multipart([route, frame])

        legit = config.secagg.round_params(ROUND + 1, [0, 1, 2], os.urandom(32),
                                           layout.length("mask"))  # fmt: skip
        fake.send_multipart([route, encode(RoundStart(params=legit, client_id=0))])
        advertisement = None
        deadline = time.monotonic() + WAIT
        while advertisement is None and time.monotonic() < deadline:
            if not fake.poll(1000):
                continue
            _, data = fake.recv_multipart()
            message = decode_from_client(data, max_bytes=LIMIT)
            if isinstance(message, AdvertiseKeys) and message.round_id == legit.round_id:
                advertisement = message
        assert advertisement is not None, "no key advertisement for the legitimate round"
        roster = load_roster(config.keys_dir / ROSTER_FILE)
        SecAggServer(legit, identity_keys(config, roster)).receive(0, advertisement)  # signed
        fake.send_multipart([route, encode(Shutdown(reason="fuzz over"))])
        thread.join(WAIT)
    finally:
        stop.set()
        thread.join(WAIT)
        context.destroy(linger=0)
        drops.__exit__()
    assert result["exit"] == 0
    assert drops.count == refused(frames, decode_from_server)


def test_the_fuzzer_makes_the_frames_it_promises():
    frames = hostile(client_corpus(ROUND, 3), 2_000, seed=1)
    assert any(f.startswith(b"\x81\xa1a" * 500) for f in frames)  # nesting bombs
    assert any(len(f) > LIMIT for f in frames)
    assert any(f[:5] == b"\xdd\xff\xff\xff\xff" for f in frames)  # huge declared lengths
    assert 0 < refused(frames, decode_from_client) < len(frames)  # some still decode
    assert nesting_bomb(__import__("random").Random(0)).endswith(b"\xc0")


def test_the_receive_queue_per_peer_is_sized_from_the_byte_cap(curve_keys):
    assert receive_queue_depth(LIMIT, None) == SEND_HWM
    assert receive_queue_depth(LIMIT, 8 * LIMIT) == 4  # frames of up to 2 * LIMIT
    assert receive_queue_depth(LIMIT, LIMIT) == 1  # never zero: one message always fits
    with pytest.raises(ValueError, match="max_queued_bytes"):
        receive_queue_depth(LIMIT, 0)
    public, secret = curve_keys["coordinator"]
    roster = {"alice": curve_keys["alice"][0]}
    with CoordinatorEndpoint(
        "tcp://127.0.0.1:*", secret, public, roster, LIMIT, max_queued_bytes=8 * LIMIT
    ) as coordinator:
        assert coordinator._socket.getsockopt(zmq.RCVHWM) == 4
        assert coordinator._socket.getsockopt(zmq.MAXMSGSIZE) == 2 * LIMIT
        with InstitutionEndpoint(
            coordinator.address, curve_keys["alice"][1], curve_keys["alice"][0], public, LIMIT,
            max_queued_bytes=8 * LIMIT,
        ) as alice:  # fmt: skip
            alice.send(Hello())
            assert coordinator.recv(WAIT) == ("alice", Hello())  # the caps let traffic through
