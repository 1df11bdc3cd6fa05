"""Wire messages of one secure-aggregation round (msgspec Structs, msgpack on the wire).

Every message names its round; clients identify themselves by ``client_id`` (the transport must
also bind that id to the authenticated connection). :func:`decode` is the only way bytes from
the network become messages: it enforces the schema, the size limit and the value ranges, and
raises :class:`~secagg.errors.MalformedMessage` on anything else.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import msgspec

from secagg.codec import FixedPointCodec
from secagg.errors import ConfigError
from secagg.errors import MalformedMessage

MAX_CLIENTS = 1 << 16
RoundId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
ClientId = Annotated[int, msgspec.Meta(ge=0, lt=MAX_CLIENTS)]
Key32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Signature = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
Blob = Annotated[bytes, msgspec.Meta(max_length=1 << 12)]

DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
MAX_ACCUSED = 1 << 10  # wire bound; the server also holds it to the sender's neighbours
MAX_SEEDS = 1 << 10  # wire bound on revealed seeds; the server holds them to the dropped neighbours


class Stage(str, Enum):
    """The stages of a round, in order; clients may vanish before any of them."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"


class RoundParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Public parameters every party of a round agrees on (sent by the coordinator).

    ``neighbours`` is k, the degree of the SecAgg+ graph (k = n - 1 is classic SecAgg);
    ``threshold`` is t, the shares needed to rebuild a secret of any client; each client's
    secrets are shared among itself and its k neighbours. ``check_survivors`` turns on the
    signed-survivor-set stage that defends against a malicious server.
    """

    round_id: RoundId
    client_ids: list[ClientId]
    threshold: Annotated[int, msgspec.Meta(ge=1)]
    neighbours: Annotated[int, msgspec.Meta(ge=1)]
    graph_seed: Key32
    vector_length: Annotated[int, msgspec.Meta(ge=1, le=1 << 31)]
    clip: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    bits: Annotated[int, msgspec.Meta(ge=2, le=63)] = 16
    modulus_bits: int = 32
    check_survivors: bool = True

    def __post_init__(self) -> None:
        n = len(self.client_ids)
        if len(set(self.client_ids)) != n:
            raise ConfigError("client_ids contains duplicates; every client needs its own id")
        if n < 2:
            raise ConfigError(f"a round needs at least 2 clients, got {n}")
        if self.neighbours > n - 1:
            raise ConfigError(f"neighbours={self.neighbours} exceeds n-1={n - 1}; lower neighbours")
        holders = self.neighbours + 1
        if not holders // 2 < self.threshold <= holders:
            raise ConfigError(
                f"threshold={self.threshold} must be a strict majority of the {holders} share "
                f"holders (self + neighbours): choose threshold in "
                f"[{holders // 2 + 1}, {holders}] or change neighbours"
            )
        _ = self.codec  # validates clip, bits and modulus_bits against n

    @property
    def codec(self) -> FixedPointCodec:
        """The fixed-point codec every party of this round uses."""
        return FixedPointCodec(self.clip, self.bits, self.modulus_bits, len(self.client_ids))


class _Message(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    round_id: RoundId


# ----------------------------------------------------------------------------- client -> server


class AdvertiseKeys(_Message):
    """Stage 0: a client's two fresh X25519 public keys, signed with its identity key."""

    client_id: ClientId
    enc_pk: Key32
    mask_pk: Key32
    signature: Signature


class EncryptedShare(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One AES-GCM ciphertext holding a sender's two Shamir shares for one peer."""

    peer: ClientId
    ciphertext: Blob


class ShareKeys(_Message):
    """Stage 1: a client's encrypted shares, one per neighbour (``peer`` = recipient)."""

    client_id: ClientId
    shares: list[EncryptedShare]


class MaskedInput(_Message):
    """Stage 2: the masked input vector, little-endian ring elements.

    A memoryview so that decoding does not copy a vector that may be gigabytes long.
    ``accused`` names the neighbours whose relayed share did not decrypt or parse: the server
    excludes each of them (drops it and cancels its pairwise masks at unmasking), while the
    sender still masked with them, so its vector matches the server's view either way.
    """

    client_id: ClientId
    vector: memoryview
    accused: Annotated[list[ClientId], msgspec.Meta(max_length=MAX_ACCUSED)] = []


class SurvivorSignature(_Message):
    """Stage 3: a client's signature on the survivor set it was shown."""

    client_id: ClientId
    signature: Signature


class RevealedSeed(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A survivor's pairwise mask seed with ``peer``, a neighbour listed as dropped."""

    peer: ClientId
    seed: Key32


class UnmaskShares(_Message):
    """Stage 4: decrypted shares, keyed by the client the secret belongs to.

    ``mask_seeds`` are the sender's own pairwise mask seeds with its dropped neighbours, so the
    server can cancel those masks even when too few valid shares of a dropped mask key exist
    (an accused party's victims hold none). At most one per peer; the server accepts them only
    for the sender's neighbours in the dropped set (docs/security.md, 2.7).
    """

    client_id: ClientId
    self_mask_shares: dict[ClientId, Blob]
    mask_key_shares: dict[ClientId, Blob]
    mask_seeds: Annotated[list[RevealedSeed], msgspec.Meta(max_length=MAX_SEEDS)] = []

    def __post_init__(self) -> None:
        peers = [item.peer for item in self.mask_seeds]
        if len(set(peers)) != len(peers):
            raise MalformedMessage(f"client {self.client_id} reveals two seeds with one peer")


# ----------------------------------------------------------------------------- server -> client


class KeyRoster(_Message):
    """The signed advertisements of the recipient's neighbours (and its own)."""

    keys: list[AdvertiseKeys]


class RelayedShares(_Message):
    """Ciphertexts addressed to the recipient (``peer`` = sender)."""

    shares: list[EncryptedShare]


class SurvivorSetRequest(_Message):
    """The clients whose masked input the server accepted; survivors sign it."""

    survivors: list[ClientId]


class UnmaskRequest(_Message):
    """Which secrets to reveal: self-mask shares of survivors, mask-key shares of the dropped."""

    survivors: list[ClientId]
    dropped: list[ClientId]
    signatures: list[SurvivorSignature]


Message = (
    AdvertiseKeys
    | ShareKeys
    | MaskedInput
    | SurvivorSignature
    | UnmaskShares
    | KeyRoster
    | RelayedShares
    | SurvivorSetRequest
    | UnmaskRequest
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message | RoundParams) -> bytes:
    """Serialise a message for the wire."""
    return _encoder.encode(message)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate bytes from the network into a message."""
    return decode_with(_decoder, data, max_bytes, "secagg message")


def decode_with(
    decoder: msgspec.msgpack.Decoder, data: bytes | memoryview, max_bytes: int, what: str
) -> msgspec.Struct:
    """``decoder.decode(data)`` under a size limit; :class:`MalformedMessage` on anything else.

    Every failure becomes :class:`MalformedMessage`, not only msgspec's own errors: a nesting
    bomb (~1000 nested maps, 3 KB) raises ``RecursionError``, a declared length the process
    cannot allocate ``MemoryError``, and a ``__post_init__`` may raise whatever it checks with.
    Bytes from the network must never raise anything a receive loop does not expect.
    """
    if len(data) > max_bytes:
        raise MalformedMessage(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(f"not a valid {what}: {exc}") from exc
    except Exception as exc:  # RecursionError, MemoryError, ...: the peer's fault, not ours
        raise MalformedMessage(f"not a valid {what}: {type(exc).__name__}: {exc}") from exc
