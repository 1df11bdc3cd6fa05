"""An in-process driver that runs one whole round: for tests, benchmarks and quick experiments.

Every message really goes through the wire codec (encode on the sender, decode on the receiver),
so the byte counts and the validation are those of a networked run.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secagg.client import SecAggClient
from secagg.errors import ConfigError
from secagg.errors import TooFewSurvivors
from secagg.messages import Message
from secagg.messages import RoundParams
from secagg.messages import Stage
from secagg.messages import decode
from secagg.messages import encode
from secagg.server import SecAggServer

T = TypeVar("T")
_STAGES = [s.value for s in Stage]


@dataclass(frozen=True)
class LocalResult:
    """Outcome of :func:`run_local`.

    ``sum`` is the decoded float sum over ``included`` (the clients whose masked input the
    server accepted). Timings are wall-clock seconds spent inside each party's code (message
    encoding and decoding included); bytes are encoded message sizes.
    """

    sum: np.ndarray
    included: list[int]
    client_seconds: dict[int, float] = field(repr=False)
    server_seconds: float = field(repr=False)
    bytes_sent: dict[int, int] = field(repr=False)
    bytes_received: dict[int, int] = field(repr=False)


class _Clock:
    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.seconds: dict[int | None, float] = {}

    def run(self, who: int | None, fn: Callable[[], T]) -> T:
        start = self.now()
        try:
            return fn()
        finally:
            self.seconds[who] = self.seconds.get(who, 0.0) + self.now() - start


def local_graph_seed(seed: int) -> bytes:
    """The public neighbour-graph seed :func:`run_local` uses for a given ``seed``."""
    return hashlib.sha256(
        b"sealmoe/run_local/graph" + seed.to_bytes(16, "big", signed=True)
    ).digest()


def run_local(
    inputs: Sequence[np.ndarray],
    *,
    threshold: int,
    neighbours: int | None = None,
    dropouts: dict[int, str] | None = None,
    clip: float = 1.0,
    bits: int = 16,
    seed: int | None = None,
    modulus_bits: int = 32,
    check_survivors: bool = True,
    active_bound: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> LocalResult:
    """Securely sum ``inputs`` (one float array per client) in one process.

    ``neighbours`` is the SecAgg+ graph degree k (``None``: n - 1, classic SecAgg).
    ``dropouts`` maps a client index to the stage at which it vanishes: "advertise", "share",
    "masked_input", "consistency" or "unmask". ``seed`` fixes the public neighbour graph only;
    masks and keys always come from the operating system's CSPRNG. Raises
    :class:`~secagg.errors.TooFewSurvivors` when fewer than ``threshold`` clients remain.
    ``active_bound`` holds the clients to the active-adversary bound (see
    :class:`~secagg.client.SecAggClient`); off by default because an in-process run has no
    adversary and tests sum with small thresholds. ``clock`` times the parties (e.g.
    ``time.thread_time`` for CPU time on a busy machine).
    """
    n = len(inputs)
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}")
    shapes = {np.shape(x) for x in inputs}
    if len(shapes) != 1:
        raise ConfigError(f"all inputs must have one shape, got {sorted(shapes)}")
    shape = shapes.pop()
    dropouts = dict(dropouts or {})
    for client, stage in dropouts.items():
        if client not in range(n):
            raise ConfigError(f"dropouts names client {client}; clients are 0..{n - 1}")
        if stage not in _STAGES:
            raise ConfigError(f"dropout stage {stage!r} is not one of {_STAGES}")
    graph_seed = os.urandom(32) if seed is None else local_graph_seed(seed)
    params = RoundParams(
        round_id=1,
        client_ids=list(range(n)),
        threshold=threshold,
        neighbours=n - 1 if neighbours is None else neighbours,
        graph_seed=graph_seed,
        vector_length=int(np.prod(shape, dtype=np.int64)),
        clip=clip,
        bits=bits,
        modulus_bits=modulus_bits,
        check_survivors=check_survivors,
    )
    identity_keys = [Ed25519PrivateKey.generate() for _ in range(n)]
    identities = {i: k.public_key() for i, k in enumerate(identity_keys)}

    timer = _Clock(clock)
    sent = dict.fromkeys(range(n), 0)
    received = dict.fromkeys(range(n), 0)
    clients = {
        i: timer.run(
            i,
            lambda i=i: SecAggClient(
                params, i, inputs[i], identity_keys[i], identities, active_bound=active_bound
            ),
        )
        for i in range(n)
    }
    server = timer.run(None, lambda: SecAggServer(params, identities))

    def client_says(i: int, produce: Callable[[], Message]) -> None:
        wire = timer.run(i, lambda: encode(produce()))
        sent[i] += len(wire)
        timer.run(None, lambda: server.receive(i, decode(wire)))

    def alive(i: int, stage: Stage) -> bool:
        dropped_at = dropouts.get(i)
        return dropped_at is None or _STAGES.index(stage.value) < _STAGES.index(dropped_at)

    for i, client in clients.items():
        if alive(i, Stage.ADVERTISE):
            client_says(i, client.advertise)
    while server.stage is not None:
        outgoing = timer.run(None, server.advance)
        for i, message in outgoing.items():
            wire = timer.run(None, lambda m=message: encode(m))
            received[i] += len(wire)
            if not alive(i, server.stage):
                continue
            client = clients[i]
            try:
                client_says(i, lambda c=client, w=wire: c.handle(decode(w)))
            except TooFewSurvivors:
                continue  # this client gives up; the server counts it as dropped
    assert server.result is not None
    return LocalResult(
        sum=params.codec.decode(server.result).reshape(shape),
        included=server.included,
        client_seconds={i: timer.seconds.get(i, 0.0) for i in range(n)},
        server_seconds=timer.seconds.get(None, 0.0),
        bytes_sent=sent,
        bytes_received=received,
    )
