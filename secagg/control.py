"""Round-control messages and the two direction-checked wire decoders.

The secure-aggregation messages of :mod:`secagg.messages` say nothing about how a round starts
or ends; these few Structs do (msgspec, msgpack on the wire, tagged by class name like the
secagg messages). Each direction has its own union, so a message that only the coordinator may
send is refused when it comes from an institution, and vice versa.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from secagg.errors import MalformedMessage
from secagg.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AdvertiseKeys,
    ClientId,
    KeyRoster,
    MaskedInput,
    RelayedShares,
    RoundId,
    RoundParams,
    ShareKeys,
    SurvivorSetRequest,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
)


class Hello(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """An institution announces that it is online, so the coordinator can route to it.

    It names nobody: the coordinator learns who sent it from the authenticated connection.
    """


class RoundStart(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """The coordinator invites an institution into a round under ``client_id``."""

    params: RoundParams
    client_id: ClientId


class RoundEnd(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """A round is over: ``included`` are the clients in the sum; ``error`` says why it aborted."""

    round_id: RoundId
    included: list[ClientId]
    error: Annotated[str, msgspec.Meta(max_length=1 << 12)] | None = None


FromClient = Hello | AdvertiseKeys | ShareKeys | MaskedInput | SurvivorSignature | UnmaskShares
FromServer = RoundStart | RoundEnd | KeyRoster | RelayedShares | SurvivorSetRequest | UnmaskRequest

_from_client = msgspec.msgpack.Decoder(FromClient)
_from_server = msgspec.msgpack.Decoder(FromServer)


def decode_from_client(
    data: bytes | memoryview, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> FromClient:
    """Parse bytes an institution sent; raise :class:`MalformedMessage` on anything else."""
    return _decode(_from_client, data, max_bytes, "an institution")


def decode_from_server(
    data: bytes | memoryview, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> FromServer:
    """Parse bytes the coordinator sent; raise :class:`MalformedMessage` on anything else."""
    return _decode(_from_server, data, max_bytes, "the coordinator")


def _decode(
    decoder: msgspec.msgpack.Decoder, data: bytes | memoryview, max_bytes: int, sender: str
) -> FromClient | FromServer:
    if len(data) > max_bytes:
        raise MalformedMessage(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(f"not a valid message from {sender}: {exc}") from exc
