"""Detached Ed25519 signatures of the report files, by the coordinator's identity key.

The coordinator signs ``report.html`` (and ``report.json``, ``report.md``) so that a privacy
officer who receives the files can check they are the ones the coordinator wrote: each file
``F`` gets ``F.sig``, a small JSON document holding the SHA-256 of ``F``'s bytes and an Ed25519
signature over ``DOMAIN || sha256(bytes)``. The domain prefix keeps the signature from being
read as anything else the same key signs (SecAgg+ messages, enrolment cards). The signer's
public key is named in the file for the reader's convenience only: :func:`verify_file` checks
against the key it is given (the roster's coordinator entry), never the one in the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

DOMAIN = b"sealmoe report signature v1\x00"
SIG_SUFFIX = ".sig"
SIGNED_FILES = ("report.html", "report.json", "report.md")
"""The report files the coordinator signs (``report.html`` first: the one an officer reads)."""


class SignatureInvalid(Exception):
    """A report file's signature is missing, malformed or does not verify (names the file)."""


def signature_path(path: str | Path) -> Path:
    """Where the detached signature of ``path`` lives."""
    path = Path(path)
    return path.with_name(path.name + SIG_SUFFIX)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _raw(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign_file(path: str | Path, key: Ed25519PrivateKey) -> Path:
    """Write ``path``'s detached signature beside it; the signature file."""
    path = Path(path)
    digest = _digest(path.read_bytes())
    document = {
        "algorithm": "Ed25519 over the domain prefix and the SHA-256 of the file's bytes",
        "domain": DOMAIN.decode("ascii").rstrip("\x00"),
        "file": path.name,
        "sha256": digest.hex(),
        "signer_public_key": _raw(key.public_key()),
        "signature": key.sign(DOMAIN + digest).hex(),
    }
    out = signature_path(path)
    out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return out


def verify_file(path: str | Path, key: Ed25519PublicKey) -> None:
    """Check ``path`` against its detached signature under ``key``; SignatureInvalid if not."""
    path = Path(path)
    sig = signature_path(path)
    try:
        document = json.loads(sig.read_text(encoding="utf-8"))
        signature = bytes.fromhex(document["signature"])
    except FileNotFoundError:
        raise SignatureInvalid(f"{path}: no signature ({sig.name} is missing)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SignatureInvalid(f"{path}: {sig.name} is not a signature file ({exc})") from None
    digest = _digest(path.read_bytes())
    if document.get("sha256") != digest.hex():
        raise SignatureInvalid(f"{path}: the file was changed after it was signed (SHA-256)")
    try:
        key.verify(signature, DOMAIN + digest)
    except InvalidSignature:
        raise SignatureInvalid(
            f"{path}: the signature in {sig.name} is not the coordinator's (roster key "
            f"{_raw(key)[:16]}…)"
        ) from None


def sign_report(run_dir: str | Path, key: Ed25519PrivateKey) -> list[Path]:
    """Sign every report file of ``run_dir`` that exists; the signature files written."""
    return [
        sign_file(Path(run_dir) / name, key)
        for name in SIGNED_FILES
        if (Path(run_dir) / name).exists()
    ]


def remove_signatures(run_dir: str | Path) -> None:
    """Delete the report's signatures (a report rewritten without the key must not keep a
    signature of its previous contents)."""
    for name in SIGNED_FILES:
        signature_path(Path(run_dir) / name).unlink(missing_ok=True)
