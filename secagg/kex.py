"""Key agreement, share encryption and identity signatures for one secure-aggregation round.

* X25519 for every pairwise secret, HKDF-SHA256 to turn it into a key. The HKDF ``info`` binds
  the protocol version, the purpose, the round id and both party ids, so a key from one round or
  one pair can never be reused for another.
* AES-256-GCM (keys from the "share encryption" agreement) for the Shamir shares the server
  relays; the associated data binds round, sender and recipient.
* Ed25519 long-term identity keys (registered at enrolment) sign each client's per-round public
  keys and the survivor set, so a server cannot substitute keys or lie about who survived.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.errors import BadSignature
from secagg.errors import DecryptionError
from secagg.errors import MalformedMessage

PROTOCOL_LABEL = b"sealmoe/secagg/v1"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_NONCE_BYTES = 12

MASK_PURPOSE = b"pairwise-mask"
SHARE_PURPOSE = b"share-encryption"


def _ids(round_id: int, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return struct.pack(">QII", round_id, lo, hi)


def raw_public(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key's public half."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_x25519(data: bytes) -> X25519PublicKey:
    """Parse a raw X25519 public key, raising :class:`MalformedMessage` on bad bytes."""
    if len(data) != PUBLIC_KEY_BYTES:
        raise MalformedMessage(
            f"X25519 public key must be {PUBLIC_KEY_BYTES} bytes, got {len(data)}"
        )
    return X25519PublicKey.from_public_bytes(data)


def load_ed25519(data: bytes) -> Ed25519PublicKey:
    """Parse a raw Ed25519 public key, raising :class:`MalformedMessage` on bad bytes."""
    if len(data) != PUBLIC_KEY_BYTES:
        raise MalformedMessage(
            f"Ed25519 public key must be {PUBLIC_KEY_BYTES} bytes, got {len(data)}"
        )
    return Ed25519PublicKey.from_public_bytes(data)


def check_public(data: bytes, *, who: int) -> None:
    """Refuse a low-order (or malformed) X25519 public key, which would fix the shared secret.

    A party that advertises such a key would agree the all-zero secret with everybody, so the
    check runs where keys are accepted, before any neighbour relies on them.
    """
    try:
        X25519PrivateKey.generate().exchange(load_x25519(data))
    except ValueError as exc:  # OpenSSL refuses low-order points (all-zero shared secret)
        raise MalformedMessage(f"party {who} advertised a low-order X25519 public key") from exc


def agree(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    purpose: bytes,
    round_id: int,
    me: int,
    peer: int,
) -> bytes:
    """A 32-byte key shared by ``me`` and ``peer`` for ``purpose`` in ``round_id``."""
    try:
        shared = private.exchange(load_x25519(peer_public))
    except ValueError as exc:  # OpenSSL refuses low-order points (all-zero shared secret)
        raise MalformedMessage(f"party {peer} sent a low-order X25519 public key") from exc
    info = PROTOCOL_LABEL + b"/" + purpose + b"/" + _ids(round_id, me, peer)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def encrypt_share(
    key: bytes, plaintext: bytes, *, round_id: int, sender: int, recipient: int
) -> bytes:
    """AES-256-GCM encrypt ``plaintext`` for ``recipient``; nonce is prepended."""
    nonce = os.urandom(_NONCE_BYTES)
    aad = PROTOCOL_LABEL + struct.pack(">QII", round_id, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt_share(key: bytes, blob: bytes, *, round_id: int, sender: int, recipient: int) -> bytes:
    """Inverse of :func:`encrypt_share`; :class:`DecryptionError` if tampered or misaddressed."""
    if len(blob) < _NONCE_BYTES + 16:
        raise MalformedMessage(f"encrypted share from {sender} is truncated ({len(blob)} bytes)")
    aad = PROTOCOL_LABEL + struct.pack(">QII", round_id, sender, recipient)
    try:
        return AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise DecryptionError(
            f"share from {sender} to {recipient} in round {round_id} failed authentication"
        ) from exc


def advertisement_payload(round_id: int, client_id: int, enc_pk: bytes, mask_pk: bytes) -> bytes:
    """The bytes a client signs to vouch for its per-round public keys."""
    return (
        PROTOCOL_LABEL + b"/advertise/" + struct.pack(">QI", round_id, client_id) + enc_pk + mask_pk
    )


def survivors_payload(round_id: int, survivors: list[int]) -> bytes:
    """The bytes a client signs to attest the set of clients whose masked input was accepted."""
    ids = sorted(survivors)
    return (
        PROTOCOL_LABEL
        + b"/survivors/"
        + struct.pack(">QI", round_id, len(ids))
        + struct.pack(f">{len(ids)}I", *ids)
    )


def verify(
    identity: Ed25519PublicKey, signature: bytes, payload: bytes, *, who: int, what: str
) -> None:
    """Raise :class:`BadSignature` naming the party and the object if the signature is wrong."""
    try:
        identity.verify(signature, payload)
    except InvalidSignature as exc:
        raise BadSignature(
            f"signature of client {who} on its {what} does not verify under its registered "
            f"identity key (substituted key or forged message)"
        ) from exc
