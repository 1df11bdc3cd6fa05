"""Institutions pin the round settings from their own config (clients.runtime.pinned).

A scripted malicious coordinator (holding the coordinator's CurveZMQ keys, on a real loopback
socket) sends a real institution RoundStarts with weakened settings. The assertion is on what the
adversary receives: a Decline that names the setting, nothing derived from the institution's
data (no ledger head, key advertisement, shares or masked input), and a log line; the institution
then serves an honest round. The coordinator side never starts a round below the minimum.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import msgspec
import pytest
import zmq

from clients.contract.config import FederationConfig
from clients.contract.keys import generate_keys
from clients.contract.keys import load_coordinator_keys
from clients.contract.messages import Decline
from clients.contract.messages import Hello
from clients.contract.messages import RoundStart
from clients.contract.messages import Shutdown
from clients.contract.messages import decode_from_client
from clients.contract.messages import round_id
from clients.runtime.pinned import pinned_settings
from clients.runtime.pinned import round_differences
from coordinator.app.wiring import make_institution
from coordinator.service import Coordinator
from coordinator.store import RoutingRelay
from secagg.messages import AdvertiseKeys
from secagg.messages import RoundParams
from secagg.messages import encode
from tests.test_runtime import NAMES
from tests.test_runtime import write_config

WAIT = 60.0  # upper bound for things that should happen at once; reached only if broken


def honest_params(config: FederationConfig, rid: int, length: int) -> RoundParams:
    return config.secagg.round_params(rid, list(range(len(NAMES))), os.urandom(32), length)


# (what the adversary changes, the settings the institution must name)
ATTACKS: list[tuple[dict, dict, set[str]]] = [
    ({"neighbours": 2, "threshold": 2}, {}, {"neighbours", "threshold"}),
    ({"check_survivors": False}, {}, {"check_survivors"}),
    ({"bits": 8}, {}, {"bits"}),
    ({"clip": 10.0}, {}, {"clip"}),
    ({"modulus_bits": 64}, {}, {"modulus_bits"}),
    # two participants: below the minimum (3), and t = 2 of 2 is not the config's t = 3
    ({"client_ids": [0, 1], "neighbours": 1, "threshold": 2}, {}, {"participants", "threshold"}),
    ({}, {"routing_plain": bytes(8)}, {"routing_statistics"}),  # config: routing under CKKS
]


def weakened(params: RoundParams, rid: int, changes: dict, fields: dict) -> RoundStart:
    return RoundStart(
        params=msgspec.structs.replace(params, round_id=rid, **changes),
        client_id=0,
        federation_round=1,
        **fields,
    )


def test_the_differences_name_every_weakened_setting(tmp_path):
    config = write_config(tmp_path)
    pinned = pinned_settings(config)
    honest = honest_params(config, 1, 16)
    assert round_differences(pinned, RoundStart(params=honest, client_id=0)) == []
    for changes, fields, named in ATTACKS:
        found = round_differences(pinned, weakened(honest, 2, changes, fields))
        assert {d.field for d in found} == named, changes
    (participants,) = [
        d
        for d in round_differences(pinned, weakened(honest, 2, *ATTACKS[5][:2]))
        if d.field == "participants"
    ]
    assert (participants.got, participants.expected) == (2, ">= 3")
    assert "clip: the coordinator sent 10.0, the config says 1.0" in str(
        round_differences(pinned, weakened(honest, 2, {"clip": 10.0}, {}))[0]
    )
    # not in the round it is invited to
    assert [d.field for d in round_differences(
        pinned, RoundStart(params=honest, client_id=9))] == ["client_id"]  # fmt: skip


def test_a_coordinator_that_weakens_the_settings_receives_only_declines(tmp_path, caplog):
    generate_keys(tmp_path / "keys", NAMES)
    config = write_config(tmp_path)
    institution = make_institution(config, NAMES[0])
    length = institution.learner.layout(institution.learner.local_state()).length("mask")
    keys = load_coordinator_keys(config.keys_dir)
    context = zmq.Context()
    fake = context.socket(zmq.ROUTER)  # the adversary: the coordinator's keys, its own script
    fake.linger = 0
    fake.curve_server = True
    fake.curve_publickey, fake.curve_secretkey = keys.curve_public, keys.curve_secret
    fake.setsockopt(zmq.ROUTER_MANDATORY, 1)
    fake.bind("tcp://127.0.0.1:*")
    institution.config = write_config(tmp_path, bind=fake.last_endpoint.decode())
    stop = threading.Event()
    result: dict[str, object] = {}
    received: list[msgspec.Struct] = []

    def serve() -> None:
        try:
            result["exit"] = institution.run(stop)
        except BaseException as exc:  # reported by the test
            result["exit"] = exc

    def next_message(route: bytes | None = None) -> tuple[bytes, msgspec.Struct]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if fake.poll(500):
                sender, data = fake.recv_multipart()
                message = decode_from_client(data)
                received.append(message)
                if not isinstance(message, Hello):
                    return sender, message
        raise AssertionError("the institution sent nothing")

    thread = threading.Thread(target=serve, daemon=True)
    caplog.set_level(logging.WARNING, logger="clients.runtime.rounds")
    thread.start()
    try:
        assert fake.poll(int(WAIT * 1000))
        route, first = fake.recv_multipart()
        assert decode_from_client(first) == Hello()
        honest = honest_params(config, round_id(1, 0), length)
        for attempt, (changes, fields, named) in enumerate(ATTACKS, start=1):
            rid = round_id(1, attempt)
            fake.send_multipart([route, encode(weakened(honest, rid, changes, fields))])
            _, reply = next_message()
            assert isinstance(reply, Decline) and reply.round_id == rid, reply
            assert all(field in reply.reason for field in named), reply.reason
        # Nothing derived from the data: only Hellos and Declines came back, and no budget spent
        assert {type(m) for m in received} <= {Hello, Decline}
        assert institution.ledger.head().entries == 0
        logged = [r.getMessage() for r in caplog.records]
        assert any("settings differ from the config: check_survivors: the coordinator sent "
                   "False, the config says True" in m for m in logged)  # fmt: skip
        assert any("participants: the coordinator sent 2" in m for m in logged)
        # ... and it keeps serving: the honest settings get a key advertisement
        legit = RoundStart(params=honest, client_id=0, federation_round=1)
        fake.send_multipart([route, encode(legit)])
        _, reply = next_message()
        assert isinstance(reply, AdvertiseKeys) and reply.round_id == honest.round_id, reply
        fake.send_multipart([route, encode(Shutdown(reason="over"))])
        thread.join(WAIT)
    finally:
        stop.set()
        thread.join(WAIT)
        context.destroy(linger=0)
    assert result["exit"] == 0


def test_the_coordinator_starts_no_round_below_the_minimum(tmp_path):
    generate_keys(tmp_path / "keys", NAMES)
    config = write_config(tmp_path)
    assert config.secagg.minimum_participants(len(NAMES)) == 3
    coordinator = Coordinator(config)
    state = coordinator.initial_state()
    no_endpoint: Any = None  # the round fails before it would touch the endpoint
    outcome, *_ = coordinator._round(no_endpoint, state, None, RoutingRelay(), 1, 0, NAMES[:2])
    assert outcome.error is not None and "at least 3" in outcome.error
    assert "min_participants" in outcome.error


@pytest.mark.parametrize("institutions", [3, 4])
def test_pinned_minimum_follows_the_config(tmp_path, institutions):
    config = write_config(tmp_path)
    pinned = pinned_settings(config)
    assert pinned.min_participants == 3
    assert (pinned.expert_updates, pinned.routing_statistics) == ("mask", "ckks")
    honest = config.secagg.round_params(1, list(range(institutions)), bytes(32), 4)
    assert round_differences(pinned, RoundStart(params=honest, client_id=0)) == []
