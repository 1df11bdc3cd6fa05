"""One ledger line: its fields, canonical bytes, hash chain and Ed25519 signatures.

A line is the canonical JSON (sorted keys, no spaces, ASCII) of an :class:`Entry`.
``signature`` is Ed25519 by the institution's identity key over :data:`ENTRY_DOMAIN` plus the
canonical JSON of every other field (``prev`` included), so editing any field, or moving an
entry, breaks the signature or the chain.

The chain (format 2). An entry's *digest* is SHA-256 over :data:`DIGEST_DOMAIN` and the
canonical JSON of every field but ``prev`` (the signature included); its *hash* is SHA-256 over
:data:`CHAIN_DOMAIN`, the previous entry's hash (:data:`GENESIS` before the first) and its
digest. The next entry's ``prev`` is that hash. Splitting the hash this way lets a party that
holds an old hash check that a new hash extends it from the digests of the entries in between,
without seeing the entries (:func:`chain_hash`; the coordinator does this for every ledger
head). Format 1 hashed the whole line, ``prev`` inside, which allowed no such check.

A ledger head (:class:`privacy.head.LedgerHead`) is a signed statement of the number of entries
and the last entry's hash, with the digests that prove it extends the head before it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Annotated
from typing import Any
from typing import Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy.budget import Epsilons
from privacy.head import LedgerHead

FORMAT_VERSION = 2
GENESIS = "0" * 64
ENTRY_DOMAIN = b"sealmoe privacy ledger entry v1\n"  # the signed body carries its version
DIGEST_DOMAIN = b"sealmoe privacy ledger entry digest v2\n"
CHAIN_DOMAIN = b"sealmoe privacy ledger chain v2\n"
HEAD_DOMAIN = b"sealmoe privacy ledger head v2\n"

Hex32 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Hex64 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{128}$")]
Count = Annotated[int, msgspec.Meta(ge=0)]


class Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One release (``kind="release"``) or one refused batch of releases (``"refusal"``).

    ``epsilon`` is cumulative at ``delta`` under both accountants: after this release, or, for a
    refusal, what the refused releases would have brought it to. ``event`` is the JSON of the
    dp-accounting event (:mod:`audit.events`); a refusal of several releases records their
    ``ComposedDpEvent`` and joins their ``what`` with ``+``. ``reason`` says why a refusal was
    made (``None`` for a release). ``time`` is seconds since the epoch.
    """

    version: Literal[2]
    seq: Count
    prev: Hex32
    institution: str
    kind: Literal["release", "refusal"]
    federation_round: Count
    round_id: Count
    what: str
    event: dict[str, Any]
    parameters: dict[str, Any]
    delta: float
    budget_epsilon: float
    accountant: Literal["rdp", "pld"]
    epsilon: Epsilons
    reason: str | None
    time: float
    signature: Hex64 = "0" * 128


def canonical(value: Any) -> bytes:
    """Canonical JSON bytes of a JSON-able value (sorted keys, no spaces, ASCII, no NaN)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def body_bytes(entry: Entry) -> bytes:
    """What the signature covers: every field but the signature."""
    body = msgspec.to_builtins(entry)
    del body["signature"]
    return ENTRY_DOMAIN + canonical(body)


def line_bytes(entry: Entry) -> bytes:
    """The entry's line in the file (without the newline)."""
    return canonical(msgspec.to_builtins(entry))


def entry_digest(entry: Entry) -> bytes:
    """The entry's digest: SHA-256 of every field but ``prev`` (what a head's proof carries)."""
    body = msgspec.to_builtins(entry)
    del body["prev"]
    return hashlib.sha256(DIGEST_DOMAIN + canonical(body)).digest()


def chain_hash(prev: str, digest: bytes) -> str:
    """The chain hash (hex) of an entry with digest ``digest`` after the hash ``prev`` (hex)."""
    return hashlib.sha256(CHAIN_DOMAIN + bytes.fromhex(prev) + digest).hexdigest()


def entry_hash(entry: Entry) -> str:
    """The chain hash of ``entry`` (what the next entry's ``prev`` and a head's hash state)."""
    return chain_hash(entry.prev, entry_digest(entry))


def line_hash(line: bytes) -> str:
    """The chain hash of one line's bytes (a well-formed entry; ValueError if not)."""
    try:
        return entry_hash(msgspec.json.decode(line, type=Entry, strict=True))
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a ledger entry: {exc}") from None


def sign_entry(entry: Entry, identity: Ed25519PrivateKey) -> Entry:
    """``entry`` with its signature filled in."""
    signature = identity.sign(body_bytes(entry)).hex()
    return msgspec.structs.replace(entry, signature=signature)


def entry_signature_ok(entry: Entry, public_key: Ed25519PublicKey) -> bool:
    """Whether ``entry``'s signature is valid under ``public_key``."""
    try:
        public_key.verify(bytes.fromhex(entry.signature), body_bytes(entry))
    except InvalidSignature:
        return False
    return True


def _head_message(institution: str, entries: int, last_hash: bytes) -> bytes:
    statement = {"entries": entries, "institution": institution, "last_hash": last_hash.hex()}
    return HEAD_DOMAIN + canonical(statement)


def sign_head(
    institution: str,
    entries: int,
    last_hash: str,
    identity: Ed25519PrivateKey,
    proof: Sequence[bytes] = (),
) -> LedgerHead:
    """A signed head: the ledger of ``institution`` has ``entries`` entries, the last hashing to
    ``last_hash`` (:data:`GENESIS` when empty); ``proof`` are the digests of its last entries."""
    digest = bytes.fromhex(last_hash)
    signature = identity.sign(_head_message(institution, entries, digest))
    return LedgerHead(
        institution=institution, entries=entries, last_hash=digest, signature=signature,
        proof=tuple(proof),
    )  # fmt: skip


def head_signature_ok(head: LedgerHead, public_key: Ed25519PublicKey) -> bool:
    """Whether ``head`` was signed by ``public_key``."""
    try:
        public_key.verify(
            head.signature, _head_message(head.institution, head.entries, head.last_hash)
        )
    except InvalidSignature:
        return False
    return True
