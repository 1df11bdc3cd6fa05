"""Key material of a federation: CurveZMQ transport keys, Ed25519 identity keys and the roster.

Layout under ``keys_dir`` (``sealmoe keys`` writes all of it on one host, for ``sealmoe run``;
across hosts each party's ``sealmoe enroll``/``roster`` writes only its own folder, see
:mod:`clients.contract.enroll`; the loaders read both)::

    roster.toml                          public: every party's CurveZMQ and Ed25519 public key
    coordinator/curve.key                CurveZMQ public certificate (ZPL, as pyzmq writes it)
    coordinator/curve.key_secret         CurveZMQ key pair (mode 0600)
    coordinator/identity.pem             Ed25519 private key, PKCS#8 PEM (mode 0600)
    institutions/<name>/...              the same four files for each institution

The CurveZMQ key encrypts and authenticates the connection (the coordinator's ZAP handler admits
only roster keys); the Ed25519 key signs the secure-aggregation messages, so a coordinator cannot
substitute an institution's round keys; the coordinator's signs the privacy report (a
detached signature that ``sealmoe audit verify`` checks against the roster). Secret files are
written atomically with mode 0600 and never overwritten unless asked (``force``); loaders
refuse secret files others can read. An institution's SecAgg client id is its index in
``[[institutions]]`` (:func:`client_id`).

"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import Annotated
from typing import Any

import msgspec
import zmq
import zmq.auth
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from zmq.utils import z85

from clients.contract.config import NAME_PATTERN
from clients.contract.config import FederationConfig
from clients.contract.durable import atomic_write
from privacy.errors import UserError
from secagg.ckks import CkksKeyHolder
from secagg.ckks import CkksParams
from secagg.errors import SecAggError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


ROSTER_FILE = "roster.toml"


CURVE_PUBLIC_FILE = "curve.key"


CURVE_SECRET_FILE = "curve.key_secret"  # noqa: S105 - a file name, not a secret


IDENTITY_FILE = "identity.pem"


IDENTITY_PUBLIC_FILE = "identity.pub.pem"


CKKS_SECRET_FILE = "ckks.secret"  # noqa: S105 - a file name, not a secret


CKKS_PUBLIC_FILE = "ckks.public"


ROSTER_VERSION = 1


Z85Key = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")]


HexKey = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class KeyMaterialError(UserError):
    """Base class of the errors about keys and rosters."""


class KeysExistError(KeyMaterialError, FileExistsError):
    """Key files already exist; overwriting them would lock out the parties holding the old ones."""


class KeyFileError(KeyMaterialError, ValueError):
    """A key file is missing, malformed or readable by others."""


class RosterError(KeyMaterialError, ValueError):
    """A roster file is missing or invalid; the message names the bad entry."""


class PartyPublicKeys(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One party's public keys as the roster lists them.

    ``curve_public``: CurveZMQ public key, Z85 (40 characters); ``identity_public``: Ed25519
    public key, 32 bytes as lowercase hex.
    """

    name: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
    curve_public: Z85Key
    identity_public: HexKey

    @property
    def identity_key(self) -> Ed25519PublicKey:
        """The Ed25519 public key object (for ``secagg`` signature checks)."""
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.identity_public))


class Roster(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Who may join: the coordinator's and every institution's public keys."""

    version: int
    coordinator: PartyPublicKeys
    institutions: list[PartyPublicKeys]

    def institution(self, name: str) -> PartyPublicKeys:
        """The entry of institution ``name``; RosterError if it is not listed."""
        for entry in self.institutions:
            if entry.name == name:
                return entry
        known = [e.name for e in self.institutions]
        raise RosterError(f"institution {name!r} is not in the roster; listed: {known}")

    def by_curve_key(self, curve_public: str | bytes) -> PartyPublicKeys | None:
        """The institution whose CurveZMQ public key (Z85 text or 32 raw bytes) this is."""
        if isinstance(curve_public, bytes):
            curve_public = (
                z85.encode(curve_public).decode()
                if len(curve_public) == 32
                else curve_public.decode()
            )
        return next((e for e in self.institutions if e.curve_public == curve_public), None)


class PartyKeys(msgspec.Struct, frozen=True):
    """One party's own key material, as loaded from its folder.

    ``curve_public``/``curve_secret`` are Z85 bytes as pyzmq's ``curve_*key`` options take them.
    """

    name: str
    curve_public: bytes
    curve_secret: bytes
    identity: Ed25519PrivateKey

    def public_entry(self) -> PartyPublicKeys:
        """The roster entry for these keys."""
        raw = self.identity.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PartyPublicKeys(
            name=self.name, curve_public=self.curve_public.decode(), identity_public=raw.hex()
        )


def coordinator_dir(keys_dir: str | Path) -> Path:
    """Folder of the coordinator's keys."""
    return Path(keys_dir) / "coordinator"


def institution_dir(keys_dir: str | Path, name: str) -> Path:
    """Folder of institution ``name``'s keys."""
    return Path(keys_dir) / "institutions" / name


def generate_keys(
    keys_dir: str | Path,
    institutions: list[str],
    *,
    force: bool = False,
    ckks: CkksParams | None = None,
) -> Roster:
    """Create fresh keys for the coordinator and each institution, and write the roster.

    Also one CKKS key shared by the institutions (shared-key model): each institution folder
    gets the secret context, the coordinator's folder only the key-free evaluation context.
    Refuses (KeysExistError, nothing written) when any target file exists, unless ``force``.
    """
    keys_dir = Path(keys_dir)
    names = list(institutions)
    _check_names(names)
    folders = {"coordinator": coordinator_dir(keys_dir)}
    folders.update({name: institution_dir(keys_dir, name) for name in names})
    targets = [keys_dir / ROSTER_FILE] + [
        folder / f
        for folder in folders.values()
        for f in (CURVE_PUBLIC_FILE, CURVE_SECRET_FILE, IDENTITY_FILE, IDENTITY_PUBLIC_FILE)
    ]
    targets += [coordinator_dir(keys_dir) / CKKS_PUBLIC_FILE]
    targets += [institution_dir(keys_dir, name) / CKKS_SECRET_FILE for name in names]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise KeysExistError(
            f"{len(existing)} key file(s) already exist (first: {existing[0]}); parties holding "
            "them would be locked out. Use another keys_dir, or force to replace them all"
        )
    parties = {party: _new_party(party) for party in folders}
    for party, keys in parties.items():
        _write_party(folders[party], keys)
    holder = CkksKeyHolder.generate(ckks)
    atomic_write(coordinator_dir(keys_dir) / CKKS_PUBLIC_FILE, holder.public_context(), mode=0o644)
    secret_context = holder.to_bytes()
    for name in names:
        atomic_write(institution_dir(keys_dir, name) / CKKS_SECRET_FILE, secret_context, mode=0o600)
    roster = Roster(
        version=ROSTER_VERSION,
        coordinator=parties["coordinator"].public_entry(),
        institutions=[parties[name].public_entry() for name in names],
    )
    atomic_write(keys_dir / ROSTER_FILE, _roster_toml(roster).encode(), mode=0o644)
    return roster


def load_roster(path: str | Path) -> Roster:
    """Read and validate a roster file (unique names and keys, keys that decode)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RosterError(f"{path}: no such roster; create it with `sealmoe keys`") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RosterError(f"{path}: cannot read the roster ({exc})") from None
    try:
        roster = msgspec.convert(raw, Roster)
    except msgspec.ValidationError as exc:
        raise RosterError(f"{path}: {_entry_hint(raw, str(exc))}") from None
    if roster.version != ROSTER_VERSION:
        raise RosterError(f"{path}: roster version {roster.version} is not {ROSTER_VERSION}")
    _check_roster(roster, path)
    return roster


def load_party_keys(folder: str | Path, name: str) -> PartyKeys:
    """Load one party's CurveZMQ key pair and Ed25519 identity key from ``folder``."""
    folder = Path(folder)
    secret_file = folder / CURVE_SECRET_FILE
    identity_file = folder / IDENTITY_FILE
    for file in (secret_file, identity_file):
        _check_private(file)
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{secret_file}: not a CurveZMQ secret certificate ({exc})") from None
    if secret is None or not _is_z85_key(public) or not _is_z85_key(secret):
        raise KeyFileError(f"{secret_file}: needs a Z85 public-key and secret-key of 40 chars")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{secret_file}: the public key does not belong to the secret key")
    identity = load_identity_key(identity_file)
    return PartyKeys(name=name, curve_public=public, curve_secret=secret, identity=identity)


def load_identity_key(identity_file: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 identity key from its PKCS#8 PEM file (mode 0600, else KeyFileError)."""
    identity_file = Path(identity_file)
    _check_private(identity_file)
    try:
        identity = serialization.load_pem_private_key(identity_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{identity_file}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(identity, Ed25519PrivateKey):
        raise KeyFileError(f"{identity_file}: holds a {type(identity).__name__}, not Ed25519")
    return identity


def load_coordinator_identity(keys_dir: str | Path) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 identity key (made by ``sealmoe keys`` or ``sealmoe roster``
    from the OS CSPRNG): it signs the privacy report; its public half is the roster's
    ``[coordinator] identity_public`` (and ``coordinator/identity.pub.pem``), where
    institutions and privacy officers find it."""
    return load_identity_key(coordinator_dir(keys_dir) / IDENTITY_FILE)


def load_coordinator_keys(keys_dir: str | Path) -> PartyKeys:
    """The coordinator's own keys from ``keys_dir``."""
    return load_party_keys(coordinator_dir(keys_dir), "coordinator")


def load_institution_keys(keys_dir: str | Path, name: str) -> PartyKeys:
    """Institution ``name``'s own keys from ``keys_dir``."""
    return load_party_keys(institution_dir(keys_dir, name), name)


def load_ckks_key_holder(keys_dir: str | Path, name: str) -> CkksKeyHolder:
    """Institution ``name``'s copy of the shared CKKS secret key."""
    path = institution_dir(keys_dir, name) / CKKS_SECRET_FILE
    _check_private(path)
    try:
        return CkksKeyHolder.from_bytes(path.read_bytes())
    except (OSError, SecAggError) as exc:
        raise KeyFileError(f"{path}: not a CKKS secret context ({exc})") from None


def load_ckks_public_context(keys_dir: str | Path) -> bytes:
    """The coordinator's CKKS evaluation context (no key material).

    ``keys_dir/coordinator/ckks.public`` (``sealmoe keys``) or ``keys_dir/ckks.public`` (the
    copy an institution's ``sealmoe ckks-share`` wrote, handed to the coordinator's host).
    """
    path = coordinator_dir(keys_dir) / CKKS_PUBLIC_FILE
    if not path.exists() and (Path(keys_dir) / CKKS_PUBLIC_FILE).exists():
        path = Path(keys_dir) / CKKS_PUBLIC_FILE
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"{path}: cannot read the CKKS context ({exc}); run `sealmoe keys`, or copy the "
            "ckks.public that `sealmoe ckks-share` wrote into the keys folder"
        ) from None


def _check_names(names: list[str]) -> None:
    for name in names:
        if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name) is None:
            raise KeyFileError(
                f"institution name {name!r} is not usable as a folder name: use letters, digits "
                "and _.- (at most 64 characters)"
            )
    if "coordinator" in names:
        raise KeyFileError("'coordinator' is reserved; rename that institution")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise KeyFileError(f"duplicate institution names {duplicates}; names must be unique")


def _new_party(name: str) -> PartyKeys:
    public, secret = zmq.curve_keypair()
    return PartyKeys(
        name=name, curve_public=public, curve_secret=secret, identity=Ed25519PrivateKey.generate()
    )


def _certificate(keys: PartyKeys, *, secret: bool) -> str:
    """ZPL certificate text in the layout ``zmq.auth.load_certificate`` reads."""
    kind = "Secret" if secret else "Public"
    lines = [
        f"#   ZeroMQ CURVE {kind} Certificate of {keys.name} (sealmoe)",
        "#   Keep this file private." if secret else "#   May be shared.",
        "",
        "metadata",
        f"    name = {keys.name}",
        "curve",
        f'    public-key = "{keys.curve_public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{keys.curve_secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_party(folder: Path, keys: PartyKeys) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    identity_pem = keys.identity.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    identity_pub = keys.identity.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write(folder / CURVE_SECRET_FILE, _certificate(keys, secret=True).encode(), mode=0o600)
    atomic_write(folder / IDENTITY_FILE, identity_pem, mode=0o600)
    atomic_write(folder / CURVE_PUBLIC_FILE, _certificate(keys, secret=False).encode(), mode=0o644)
    atomic_write(folder / IDENTITY_PUBLIC_FILE, identity_pub, mode=0o644)


def _check_private(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(
            f"{path}: missing; create keys with `sealmoe keys` (one host) or `sealmoe enroll`"
        ) from None
    if os.name == "posix" and mode & 0o077:
        raise KeyFileError(
            f"{path}: readable by other users (mode {mode & 0o777:o}); run chmod 600 on it"
        )


def _is_z85_key(value: bytes) -> bool:
    try:
        return len(value) == 40 and len(z85.decode(value)) == 32
    except (ValueError, KeyError, IndexError, struct.error):
        return False


def _toml_string(value: str) -> str:
    return json.dumps(value)  # the JSON escapes it may produce are valid TOML basic strings


def _party_table(entry: PartyPublicKeys) -> list[str]:
    return [
        f"name = {_toml_string(entry.name)}",
        f"curve_public = {_toml_string(entry.curve_public)}",
        f"identity_public = {_toml_string(entry.identity_public)}",
    ]


def _roster_toml(roster: Roster) -> str:
    lines = [
        "# sealmoe roster: the public keys of every party. Share it with every party;",
        "# the coordinator admits only the CurveZMQ keys listed here.",
        f"version = {roster.version}",
        "",
        "[coordinator]",
        *_party_table(roster.coordinator),
    ]
    for entry in roster.institutions:
        lines += ["", "[[institutions]]", *_party_table(entry)]
    return "\n".join(lines) + "\n"


def _entry_hint(raw: Any, message: str) -> str:
    """Add the institution's name to a validation message that points into ``institutions``."""
    marker = "$.institutions["
    if marker in message:
        index = int(message.split(marker, 1)[1].split("]", 1)[0])
        entries = raw.get("institutions") if isinstance(raw, dict) else None
        if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], dict):
            message += f" (institution {entries[index].get('name')!r})"
    return message


def _check_roster(roster: Roster, path: Path) -> None:
    parties = [("$.coordinator", roster.coordinator)] + [
        (f"$.institutions[{i}]", e) for i, e in enumerate(roster.institutions)
    ]
    names: dict[str, str] = {}
    curve: dict[str, str] = {}
    identity: dict[str, str] = {}
    for where, entry in parties:
        label = f"{where} ({entry.name!r})"
        for table, value, what in (
            (names, entry.name, "name"),
            (curve, entry.curve_public, "curve_public"),
            (identity, entry.identity_public, "identity_public"),
        ):
            if value in table:
                raise RosterError(f"{path}: {label}.{what} repeats that of {table[value]}")
            table[value] = label
        if not _is_z85_key(entry.curve_public.encode()):
            raise RosterError(f"{path}: {label}.curve_public is not a 32-byte Z85 key")


def client_id(config: FederationConfig, name: str) -> int:
    """Institution ``name``'s SecAgg client id: its index in ``[[institutions]]``."""
    names = config.institution_names
    if name not in names:
        raise KeyError(f"no institution {name!r} in the config; known: {names}")
    return names.index(name)


def identity_keys(config: FederationConfig, roster: Roster) -> dict[int, Ed25519PublicKey]:
    """Client id -> registered Ed25519 identity key of every institution of the config."""
    return {
        client_id(config, name): roster.institution(name).identity_key
        for name in config.institution_names
    }
