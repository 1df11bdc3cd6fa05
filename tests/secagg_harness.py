"""A step-by-step driver for one SecAgg round, so tests can tamper between stages."""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secagg.client import SecAggClient
from secagg.messages import Message
from secagg.messages import RoundParams
from secagg.messages import decode
from secagg.messages import encode
from secagg.server import SecAggServer


class ManualRound:
    """Clients and server of one round; every hop goes through the wire codec."""

    def __init__(
        self, n: int = 5, *, threshold: int = 4, neighbours: int | None = None, d: int = 8,
        round_id: int = 7, seed: int = 0, active_bound: bool = True,
    ) -> None:  # fmt: skip
        rng = np.random.default_rng(seed)
        self.inputs = [rng.uniform(-1, 1, d) for _ in range(n)]
        self.params = RoundParams(
            round_id=round_id,
            client_ids=list(range(n)),
            threshold=threshold,
            neighbours=n - 1 if neighbours is None else neighbours,
            graph_seed=os.urandom(32),
            vector_length=d,
        )
        self.keys = [Ed25519PrivateKey.generate() for _ in range(n)]
        self.identities = {i: k.public_key() for i, k in enumerate(self.keys)}
        self.clients = [
            SecAggClient(
                self.params,
                i,
                self.inputs[i],
                self.keys[i],
                self.identities,
                active_bound=active_bound,
            )
            for i in range(n)
        ]
        self.server = SecAggServer(self.params, self.identities)
        self.outgoing: dict[int, Message] = {}

    def send(self, sender: int, message: Message) -> None:
        self.server.receive(sender, decode(encode(message)))

    def advertise(self, who: list[int] | None = None) -> dict[int, Message]:
        for i in self._who(who):
            self.send(i, self.clients[i].advertise())
        return self.advance()

    def respond(self, who: list[int] | None = None) -> dict[int, Message]:
        """Every listed client answers the message the server sent it, then the stage closes."""
        for i in self._who(who):
            if i in self.outgoing:
                reply = self.clients[i].handle(decode(encode(self.outgoing[i])))
                self.send(i, reply)
        return self.advance()

    def advance(self) -> dict[int, Message]:
        self.outgoing = self.server.advance()
        return self.outgoing

    def _who(self, who: list[int] | None) -> list[int]:
        return list(range(len(self.clients))) if who is None else who
