"""The receive caps the coordinator computes from the round layout, over real CurveZMQ sockets.

A roster member (mallory) sends the coordinator a frame just above the computed cap, then one
above twice the cap, then floods it with frames just below the cap; the honest institutions
are served throughout, and the coordinator's receive queue for mallory holds at most
``max_queued_bytes`` (the queue depth actually set on the socket). The caps come from the real
tiny federation's config and layout (CKKS routing channel, real TenSEAL measurement). A real
institution's socket gets the cap it computes from the broadcasts it expects.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path

import pytest
import zmq
from safetensors.torch import save

import clients.runtime.institution as institution_module
from clients.contract.caps import MARGIN_BYTES
from clients.contract.caps import MIN_CAP_BYTES
from clients.contract.caps import QUEUED_MESSAGES
from clients.contract.caps import ckks_ciphertext_bytes
from clients.contract.caps import coordinator_caps
from clients.contract.config import load_config
from clients.contract.framing import receive_queue_depth
from clients.contract.layout import Segment
from clients.contract.layout import SubmissionLayout
from clients.contract.messages import Hello
from coordinator.app.wiring import make_institution
from coordinator.service import Coordinator
from coordinator.transport import CoordinatorEndpoint
from secagg.messages import encode
from tests.test_federation import write_config

WAIT = 30.0  # upper bound for things that should happen at once; reached only if broken
NAMES = ["alice", "bob", "mallory"]
HELLO = encode(Hello())
PEER_SNDHWM = 2


@pytest.fixture(scope="module")
def caps(tmp_path_factory):
    config = load_config(write_config(tmp_path_factory.mktemp("caps")))
    return config, Coordinator(config).caps()


@pytest.fixture
def endpoint(caps):
    _, computed = caps
    keys = {name: zmq.curve_keypair() for name in ["coordinator", *NAMES]}
    public, secret = keys["coordinator"]
    roster = {name: keys[name][0] for name in NAMES}
    context = zmq.Context()
    with CoordinatorEndpoint(
        "tcp://127.0.0.1:*", secret, public, roster, computed.max_message_bytes,
        max_queued_bytes=computed.max_queued_bytes,
    ) as coordinator:  # fmt: skip
        peers = {}
        for name in NAMES:
            socket = context.socket(zmq.DEALER)
            socket.linger = 0
            socket.sndhwm = PEER_SNDHWM  # a peer's own queue, small so the test sees back-pressure
            socket.curve_publickey, socket.curve_secretkey = keys[name]
            socket.curve_serverkey = public
            socket.connect(coordinator.address)
            peers[name] = socket
        try:
            yield coordinator, peers
        finally:
            for socket in peers.values():
                socket.close(linger=0)
            context.term()


def hello_from(coordinator: CoordinatorEndpoint, name: str) -> None:
    """The coordinator hands on ``name``'s Hello, skipping (dropped) frames of others."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        received = coordinator.recv(max(deadline - time.monotonic(), 0.0))
        if received == (name, Hello()):
            return
    raise AssertionError(f"the coordinator never handed on the Hello of {name}")


def test_the_caps_follow_the_layout_and_stay_under_the_config_maximum(caps):
    config, computed = caps
    params = config.aggregation.ckks.params()
    ciphertext = ckks_ciphertext_bytes(params)
    # two polynomials of 64-bit words per data prime, less what SEAL's compression saves
    raw = 2 * params.poly_modulus_degree * 8 * (len(params.coeff_mod_bit_sizes) - 1)
    assert 0.5 * raw < ciphertext < 1.1 * raw
    assert computed.largest >= ciphertext  # tiny: the routing channel is one ciphertext
    assert computed.largest < computed.max_message_bytes < config.coordinator.max_message_bytes
    assert computed.max_queued_bytes == QUEUED_MESSAGES * 2 * computed.max_message_bytes
    # A bigger masked channel raises the cap with it; the config's maximum stays the ceiling.
    big = SubmissionLayout((Segment("x", 1 << 20, "mask", 1.0),))
    assert coordinator_caps(config, big).largest >= (1 << 20) * config.secagg.modulus_bits // 8
    huge = SubmissionLayout((Segment("x", 1 << 30, "mask", 1.0),))
    assert coordinator_caps(config, huge).max_message_bytes == (
        config.coordinator.max_message_bytes
    )
    tiny = SubmissionLayout((Segment("x", 1, "mask", 1.0),))
    assert MIN_CAP_BYTES <= coordinator_caps(config, tiny).max_message_bytes <= 2 * MARGIN_BYTES


def test_a_frame_just_above_the_cap_is_refused_and_logged_and_honest_peers_are_served(
    caps, endpoint, caplog
):
    _, computed = caps
    coordinator, peers = endpoint
    cap = computed.max_message_bytes
    assert coordinator._socket.getsockopt(zmq.MAXMSGSIZE) == 2 * cap
    for name in ("alice", "bob"):
        peers[name].send(HELLO)
        hello_from(coordinator, name)
    with caplog.at_level(logging.WARNING, logger="coordinator.transport"):
        peers["mallory"].send(os.urandom(cap + 1))
        peers["alice"].send(HELLO)
        hello_from(coordinator, "alice")  # served despite mallory's frame
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and not any(
            "mallory" in r.getMessage() for r in caplog.records
        ):
            coordinator.recv(0.1)
    dropped = [r.getMessage() for r in caplog.records if "dropped a frame" in r.getMessage()]
    assert dropped == [
        f"dropped a frame from mallory: frame of {cap + 1} bytes exceeds the {cap}-byte limit"
    ]
    # Over twice the cap libzmq cuts mallory's connection unread; the others go on.
    peers["mallory"].send(os.urandom(2 * cap + 1))
    peers["bob"].send(HELLO)
    hello_from(coordinator, "bob")


def _kernel_buffer_bytes() -> int:
    """The most the kernel may buffer on one loopback TCP connection (both ends)."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            total += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, IndexError, ValueError):
            total += 16 << 20
    return total


def test_a_flood_of_just_below_cap_frames_is_held_to_the_queue_cap(caps, endpoint, caplog):
    _, computed = caps
    coordinator, peers = endpoint
    cap = computed.max_message_bytes
    depth = receive_queue_depth(cap, computed.max_queued_bytes)
    assert depth == QUEUED_MESSAGES
    assert coordinator._socket.getsockopt(zmq.RCVHWM) == depth  # at most max_queued_bytes
    assert depth * 2 * cap <= computed.max_queued_bytes
    for name in NAMES:
        peers[name].send(HELLO)
        hello_from(coordinator, name)
    mallory = peers["mallory"]
    frame = os.urandom(cap - 1)
    # The coordinator does not read: mallory's frames pile up until back-pressure stops her.
    sent, idle_since = 0, time.monotonic()
    while time.monotonic() - idle_since < 2.0 and sent < 1000:
        try:
            mallory.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(0.01)
            continue
        sent += 1
        idle_since = time.monotonic()
    # Held by the coordinator's queue (depth), the one frame libzmq is reading, mallory's own
    # queue and the kernel's socket buffers; without the cap the queue alone would take 1000.
    bound = depth + 1 + PEER_SNDHWM + 1 + math.ceil(_kernel_buffer_bytes() / cap)
    assert 0 < sent <= bound, (sent, bound)
    # The coordinator keeps serving the honest institutions while mallory's queue is full.
    with caplog.at_level(logging.WARNING, logger="coordinator.transport"):
        peers["alice"].send(HELLO)
        hello_from(coordinator, "alice")
        peers["bob"].send(HELLO)
        hello_from(coordinator, "bob")
    refused = [
        r for r in caplog.records if r.getMessage().startswith("dropped a frame from mallory")
    ]
    assert refused and len(refused) <= sent  # her frames are read and refused, one line each


def test_an_institution_sizes_its_socket_from_the_broadcasts_it_expects(caps, monkeypatch):
    """The institution's cap covers the global state it will receive and reaches the socket."""
    config, _ = caps
    inst = make_institution(config, config.institution_names[0])
    computed = inst.caps()
    adapters = save({k: v.contiguous() for k, v in inst.learner.adapters().items()})
    assert len(adapters) < computed.largest
    assert computed.largest < computed.max_message_bytes < config.coordinator.max_message_bytes
    opened = []
    original = institution_module.InstitutionEndpoint

    def endpoint(*args, **kwargs):
        opened.append(original(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(institution_module, "InstitutionEndpoint", endpoint)
    stop = threading.Event()
    stop.set()  # no coordinator: open the endpoint, say hello, stop
    sockets = []
    original_close = original.close

    def close(self):
        sockets.append(
            (self._socket.getsockopt(zmq.MAXMSGSIZE), self._socket.getsockopt(zmq.RCVHWM))
        )
        original_close(self)

    monkeypatch.setattr(original, "close", close)
    assert inst.run(stop) == 0
    [endpoint_used] = opened
    assert endpoint_used.max_message_bytes == computed.max_message_bytes
    assert sockets == [(2 * computed.max_message_bytes, QUEUED_MESSAGES)]
