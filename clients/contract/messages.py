"""Round-control messages and the two direction-checked wire decoders.

The secure-aggregation messages of :mod:`secagg.messages` say nothing about how a round starts
or ends; these few Structs do (msgspec, msgpack on the wire, tagged by class name like the
secagg messages). Each direction has its own union, so a message that only the coordinator may
send is refused when it comes from an institution, and vice versa.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from privacy.head import LedgerHead
from secagg.ckks import EncryptedBatch
from secagg.messages import DEFAULT_MAX_MESSAGE_BYTES
from secagg.messages import AdvertiseKeys
from secagg.messages import ClientId
from secagg.messages import KeyRoster
from secagg.messages import MaskedInput
from secagg.messages import RelayedShares
from secagg.messages import RoundId
from secagg.messages import RoundParams
from secagg.messages import ShareKeys
from secagg.messages import SurvivorSetRequest
from secagg.messages import SurvivorSignature
from secagg.messages import UnmaskRequest
from secagg.messages import UnmaskShares
from secagg.messages import decode_with


class Hello(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """An institution announces that it is online, so the coordinator can route to it.

    It names nobody: the coordinator learns who sent it from the authenticated connection.
    """


class GlobalBroadcast(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The federation's model as the coordinator hands it to an institution.

    ``global_state`` is the global adapter state as safetensors bytes (empty when there is
    nothing new); the previous round's summed routing statistics come as little-endian float64
    bytes (``routing_plain``, masked channel) or as the CKKS sum the institutions decrypt
    themselves (``routing_encrypted``: a window of the CKKS sum, see
    :meth:`~secagg.ckks.EncryptedBatch.window`); both are ``None`` before the first round. With
    expert updates under CKKS, the adapters come encrypted instead (``global_encrypted``, one
    array per adapter tensor) once a round has completed; the coordinator cannot read them.
    ``extras`` are the strategy's public aggregates from the previous round's sums (named
    float64 arrays as safetensors bytes, empty when there are none; the institution checks them,
    see ``clients.contract.extras``).
    """

    global_state: bytes = b""
    routing_plain: bytes | None = None
    routing_encrypted: EncryptedBatch | None = None
    global_encrypted: EncryptedBatch | None = None
    extras: bytes = b""


class RoundStart(GlobalBroadcast, frozen=True, tag=True, forbid_unknown_fields=True):
    """The coordinator invites an institution into a round under ``client_id``, with the
    global state to start from. ``params.round_id`` is unique per attempt (see
    :func:`round_id`)."""

    params: RoundParams
    client_id: ClientId
    federation_round: Annotated[int, msgspec.Meta(ge=0)] = 0


class CkksInput(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """An institution's CKKS-encrypted segments, sent just before its masked input."""

    round_id: RoundId
    client_id: ClientId
    batch: EncryptedBatch


class AffinityScores(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """An institution's DP-noised release for a selection stage, charged to its ledger before
    it was sent: little-endian float64 bytes of the strategy's shape (FedAMoLE: its data
    embedding [modules, rank], which the coordinator scores against the averaged keys)."""

    round_id: RoundId
    client_id: ClientId
    scores: bytes


class Assignment(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """The coordinator's choice from the selection stage's scores (FedAMoLE: which institution
    holds which expert), sent to every institution of the round before it trains."""

    round_id: RoundId
    selection: bytes


class Decline(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """An institution will release nothing in this round (e.g. its privacy budget is spent)."""

    round_id: RoundId
    client_id: ClientId
    reason: Annotated[str, msgspec.Meta(max_length=1 << 12)]


class Shutdown(GlobalBroadcast, frozen=True, tag=True, forbid_unknown_fields=True):
    """The federation is over; the institution may exit. It carries the final global state
    with the last round's routing statistics and extras, so each institution can evaluate
    the model the federation produced."""

    reason: Annotated[str, msgspec.Meta(max_length=1 << 12)]


class RoundEnd(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """A round is over: ``included`` are the clients in the sum; ``error`` says why it aborted."""

    round_id: RoundId
    included: list[ClientId]
    error: Annotated[str, msgspec.Meta(max_length=1 << 12)] | None = None


FromClient = (
    Hello
    | LedgerHead
    | Decline
    | AffinityScores
    | CkksInput
    | AdvertiseKeys
    | ShareKeys
    | MaskedInput
    | SurvivorSignature
    | UnmaskShares
)


FromServer = (
    RoundStart
    | Assignment
    | RoundEnd
    | Shutdown
    | KeyRoster
    | RelayedShares
    | SurvivorSetRequest
    | UnmaskRequest
)


ATTEMPT_BITS = 16


def round_id(federation_round: int, attempt: int) -> int:
    """The secure-aggregation round id of one attempt at a federation round.

    A restarted coordinator retries a round under a new attempt number, so every message of an
    earlier attempt is refused as a replay.
    """
    if not 0 <= attempt < 1 << ATTEMPT_BITS:
        raise ValueError(f"attempt must be in [0, {1 << ATTEMPT_BITS}), got {attempt}")
    return federation_round << ATTEMPT_BITS | attempt


_from_client = msgspec.msgpack.Decoder(FromClient)


_from_server = msgspec.msgpack.Decoder(FromServer)


def decode_from_client(
    data: bytes | memoryview, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> FromClient:
    """Parse bytes an institution sent; raise :class:`MalformedMessage` on anything else."""
    return decode_with(_from_client, data, max_bytes, "message from an institution")


def decode_from_server(
    data: bytes | memoryview, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> FromServer:
    """Parse bytes the coordinator sent; raise :class:`MalformedMessage` on anything else."""
    return decode_with(_from_server, data, max_bytes, "message from the coordinator")
