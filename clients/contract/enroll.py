"""Enrollment across hosts without a trusted dealer: public cards, the roster, sealed CKKS shares.

Each party makes its own keys on its own host, in the same folder layout as ``sealmoe keys``
(``keys_dir/institutions/<name>/`` or ``keys_dir/coordinator/``), so every loader in
:mod:`clients.contract.keys` reads both layouts. What leaves a host:

- an institution's **card** (``<name>.card.json``): its name, CurveZMQ and Ed25519 public keys,
  signed by its own identity key; the coordinator builds the roster from the cards;
- the **roster** (public), from the coordinator to every institution;
- a **sealed CKKS share** (``ckks-share-<recipient>.json``): the shared CKKS secret context,
  encrypted to one recipient's CurveZMQ (X25519) public key from the roster with an ephemeral
  X25519 key, HKDF-SHA256 and AES-256-GCM, and signed by the creating institution's identity
  key. It may travel through any host (the coordinator's too): only the recipient can open it;
- the CKKS **public** context (``ckks.public``, no secret key) for the coordinator.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zmq.utils import z85

from clients.contract.durable import atomic_write
from clients.contract.keys import CKKS_PUBLIC_FILE
from clients.contract.keys import CKKS_SECRET_FILE
from clients.contract.keys import CURVE_PUBLIC_FILE
from clients.contract.keys import CURVE_SECRET_FILE
from clients.contract.keys import IDENTITY_FILE
from clients.contract.keys import IDENTITY_PUBLIC_FILE
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import ROSTER_VERSION
from clients.contract.keys import KeyMaterialError
from clients.contract.keys import KeysExistError
from clients.contract.keys import PartyKeys
from clients.contract.keys import PartyPublicKeys
from clients.contract.keys import Roster
from clients.contract.keys import _check_names
from clients.contract.keys import _new_party
from clients.contract.keys import _roster_toml
from clients.contract.keys import _write_party
from clients.contract.keys import coordinator_dir
from clients.contract.keys import institution_dir
from clients.contract.keys import load_coordinator_keys
from clients.contract.keys import load_institution_keys
from clients.contract.keys import load_roster
from secagg.ckks import CkksKeyHolder
from secagg.ckks import CkksParams
from secagg.errors import SecAggError

CARD_SUFFIX = ".card.json"

_CARD_DOMAIN = b"sealmoe/enroll/card/v1\x00"

_SHARE_DOMAIN = b"sealmoe/enroll/ckks-share/v1\x00"


class CardError(KeyMaterialError, ValueError):
    """A card is malformed, its self-signature fails, or its name is not in the config."""


class ShareError(KeyMaterialError, ValueError):
    """A sealed CKKS share is malformed, not for this institution, forged or tampered with."""


class Card(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An institution's public keys, signed by its own identity key (hex Ed25519 signature)."""

    keys: PartyPublicKeys
    signature: str


class SealedShare(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The shared CKKS secret context encrypted to one recipient and signed by its sender."""

    sender: str
    recipient: str
    ephemeral_public: bytes
    nonce: bytes
    ciphertext: bytes
    signature: bytes = b""


def card_path(keys_dir: str | Path, name: str) -> Path:
    """Where ``enroll`` writes institution ``name``'s card."""
    return Path(keys_dir) / f"{name}{CARD_SUFFIX}"


def share_path(keys_dir: str | Path, recipient: str) -> Path:
    """Where ``ckks-share`` writes the sealed share for ``recipient``."""
    return Path(keys_dir) / f"ckks-share-{recipient}.json"


def enroll_party(name: str, folder: Path, *, force: bool = False) -> PartyKeys:
    """Make fresh keys for one party in ``folder`` (secret files 0600); refuse to overwrite."""
    files = (CURVE_PUBLIC_FILE, CURVE_SECRET_FILE, IDENTITY_FILE, IDENTITY_PUBLIC_FILE)
    existing = [str(folder / f) for f in files if (folder / f).exists()]
    if existing and not force:
        raise KeysExistError(
            f"{existing[0]} already exists; this party is enrolled. Reuse its card, or pass "
            "--force to make new keys (then re-issue the card and the roster)"
        )
    keys = _new_party(name)
    _write_party(folder, keys)
    return keys


def enroll_institution(
    keys_dir: str | Path, name: str, institutions: list[str], *, force: bool = False
) -> Path:
    """Make institution ``name``'s own keys under ``keys_dir`` and write its signed card."""
    if name not in institutions:
        raise CardError(f"institution {name!r} is not in the config; listed: {institutions}")
    keys = enroll_party(name, institution_dir(keys_dir, name), force=force)
    entry = keys.public_entry()
    card = Card(keys=entry, signature=keys.identity.sign(_card_message(entry)).hex())
    path = card_path(keys_dir, name)
    atomic_write(path, msgspec.json.format(msgspec.json.encode(card)) + b"\n", mode=0o644)
    return path


def read_card(path: str | Path, institutions: list[str]) -> PartyPublicKeys:
    """A card's public keys, after checking its self-signature and that its name is configured."""
    path = Path(path)
    try:
        card = msgspec.json.decode(path.read_bytes(), type=Card)
        signature = bytes.fromhex(card.signature)
    except OSError as exc:
        raise CardError(f"{path}: cannot read the card ({exc})") from None
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        raise CardError(f"{path}: not a sealmoe card ({exc}); ask for a fresh one") from None
    if card.keys.name not in institutions:
        raise CardError(
            f"{path}: card of {card.keys.name!r}, which is not an institution of the config "
            f"(listed: {institutions}); fix the config or drop the card"
        )
    try:
        card.keys.identity_key.verify(signature, _card_message(card.keys))
    except (InvalidSignature, ValueError):
        raise CardError(
            f"{path}: the card's signature does not match its keys (altered in transit?); "
            f"ask {card.keys.name!r} to send its card again"
        ) from None
    return card.keys


def build_roster(
    keys_dir: str | Path, institutions: list[str], cards: list[str | Path], *, force: bool = False
) -> Roster:
    """Make the coordinator's keys (if absent) and write the roster from verified cards."""
    keys_dir = Path(keys_dir)
    _check_names(list(institutions))
    entries = {}
    for card in cards:
        entry = read_card(card, institutions)
        if entry.name in entries:
            raise CardError(f"{card}: a second card for {entry.name!r}; pass one per institution")
        entries[entry.name] = entry
    missing = [n for n in institutions if n not in entries]
    if missing:
        raise CardError(f"no card for {missing}; collect every institution's card first")
    roster_file = keys_dir / ROSTER_FILE
    if roster_file.exists() and not force:
        raise KeysExistError(f"{roster_file} exists; pass --force to replace it")
    folder = coordinator_dir(keys_dir)
    if (folder / CURVE_SECRET_FILE).exists():
        coordinator = load_coordinator_keys(keys_dir)
    else:
        coordinator = enroll_party("coordinator", folder)
    roster = Roster(
        version=ROSTER_VERSION,
        coordinator=coordinator.public_entry(),
        institutions=[entries[n] for n in institutions],
    )
    atomic_write(roster_file, _roster_toml(roster).encode(), mode=0o644)
    load_roster(roster_file)  # the same checks every party runs (unique keys, ...)
    return roster


def create_ckks_shares(
    keys_dir: str | Path, sender: str, params: CkksParams | None = None, *, force: bool = False
) -> list[Path]:
    """Create the shared CKKS key on ``sender``'s host: keep it, seal it to every other one.

    Writes ``sender``'s ``ckks.secret`` (0600), ``ckks.public`` (for the coordinator) and one
    sealed share per other institution of the roster under ``keys_dir``.
    """
    keys_dir = Path(keys_dir)
    roster = load_roster(keys_dir / ROSTER_FILE)
    roster.institution(sender)
    keys = load_institution_keys(keys_dir, sender)
    _check_registered(keys, roster)
    secret_file = institution_dir(keys_dir, sender) / CKKS_SECRET_FILE
    if secret_file.exists() and not force:
        raise KeysExistError(f"{secret_file} exists; pass --force to create a new CKKS key")
    holder = CkksKeyHolder.generate(params)
    secret = holder.to_bytes()
    atomic_write(secret_file, secret, mode=0o600)
    atomic_write(keys_dir / CKKS_PUBLIC_FILE, holder.public_context(), mode=0o644)
    written = []
    for entry in roster.institutions:
        if entry.name != sender:
            share = seal_share(secret, keys, entry)
            path = share_path(keys_dir, entry.name)
            atomic_write(path, msgspec.json.encode(share), mode=0o644)
            written.append(path)
    return written


def accept_ckks_share(
    keys_dir: str | Path, recipient: str, path: str | Path, force: bool = False
) -> Path:
    """Verify and open a sealed share on ``recipient``'s host; write its ``ckks.secret`` (0600).

    A different CKKS key already there is kept unless ``force``: replacing it silently would
    leave this institution unable to read what the federation encrypted under the old one."""
    keys_dir = Path(keys_dir)
    roster = load_roster(keys_dir / ROSTER_FILE)
    keys = load_institution_keys(keys_dir, recipient)
    _check_registered(keys, roster)
    try:
        share = msgspec.json.decode(Path(path).read_bytes(), type=SealedShare)
    except OSError as exc:
        raise ShareError(f"{path}: cannot read the share ({exc})") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ShareError(f"{path}: not a sealed CKKS share ({exc})") from None
    secret = open_share(share, keys, roster)
    try:
        CkksKeyHolder.from_bytes(secret)
    except SecAggError as exc:
        raise ShareError(f"{path}: opened, but holds no CKKS secret context ({exc})") from None
    target = institution_dir(keys_dir, recipient) / CKKS_SECRET_FILE
    if not force and target.exists() and target.read_bytes() != secret:
        raise ShareError(
            f"{target} already holds another CKKS secret key; pass --force to replace it"
        )
    atomic_write(target, secret, mode=0o600)
    return target


def seal_share(secret: bytes, sender: PartyKeys, recipient: PartyPublicKeys) -> SealedShare:
    """Encrypt ``secret`` to ``recipient``'s CurveZMQ public key and sign it as ``sender``."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    shared = ephemeral.exchange(
        X25519PublicKey.from_public_bytes(z85.decode(recipient.curve_public))
    )
    nonce = os.urandom(12)
    unsigned = SealedShare(
        sender=sender.name,
        recipient=recipient.name,
        ephemeral_public=ephemeral_public,
        nonce=nonce,
        ciphertext=b"",
    )
    key = _share_key(shared, unsigned)
    ciphertext = AESGCM(key).encrypt(nonce, secret, _share_header(unsigned))
    sealed = msgspec.structs.replace(unsigned, ciphertext=ciphertext)
    return msgspec.structs.replace(sealed, signature=sender.identity.sign(_share_message(sealed)))


def open_share(share: SealedShare, recipient: PartyKeys, roster: Roster) -> bytes:
    """The CKKS secret in ``share``, after checking the sender's signature against the roster."""
    if share.recipient != recipient.name:
        raise ShareError(
            f"this share is sealed to {share.recipient!r}, not {recipient.name!r}; "
            f"ask {share.sender!r} for the share made for {recipient.name!r}"
        )
    try:
        sender = roster.institution(share.sender)
    except KeyMaterialError:
        raise ShareError(f"share from {share.sender!r}, who is not in the roster") from None
    try:
        sender.identity_key.verify(share.signature, _share_message(share))
    except (InvalidSignature, ValueError):
        raise ShareError(
            f"the share's signature is not {share.sender!r}'s (forged or altered); "
            f"ask {share.sender!r} to run `sealmoe ckks-share` again"
        ) from None
    try:
        own = X25519PrivateKey.from_private_bytes(z85.decode(recipient.curve_secret))
        shared = own.exchange(X25519PublicKey.from_public_bytes(share.ephemeral_public))
        key = _share_key(shared, share)
        return AESGCM(key).decrypt(share.nonce, share.ciphertext, _share_header(share))
    except (InvalidTag, ValueError):
        raise ShareError(
            f"the share does not open with {recipient.name!r}'s key (sealed to other keys, or "
            "altered); ask the sender for a share made with the current roster"
        ) from None


def _check_registered(keys: PartyKeys, roster: Roster) -> None:
    if roster.institution(keys.name) != keys.public_entry():
        raise KeyMaterialError(
            f"{keys.name!r}'s keys on this host are not the ones in the roster; ask the "
            "coordinator for the roster built from this host's current card"
        )


def _card_message(entry: PartyPublicKeys) -> bytes:
    return _CARD_DOMAIN + msgspec.msgpack.encode(entry)


def _share_header(share: SealedShare) -> bytes:
    return msgspec.msgpack.encode([share.sender, share.recipient, share.ephemeral_public])


def _share_message(share: SealedShare) -> bytes:
    return _SHARE_DOMAIN + msgspec.msgpack.encode(
        [share.sender, share.recipient, share.ephemeral_public, share.nonce, share.ciphertext]
    )


def _share_key(shared: bytes, share: SealedShare) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=_SHARE_DOMAIN + _share_header(share)
    ).derive(shared)
