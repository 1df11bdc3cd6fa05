"""The signed head of an institution's privacy ledger, as it travels to the coordinator.

The audit package signs and verifies it; the institution sends it after every charge or
refusal; the coordinator keeps every head it accepted (see ``audit.heads``). It lives here,
below both, because it states a privacy ledger's length and is no part of the
secure-aggregation protocol.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

MAX_PROOF = 1024
"""Most entry digests a head carries (32 KiB): the coordinator can check a new head against its
kept one only if at most this many entries were added in between."""

Digest = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class LedgerHead(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """An institution's signed statement of its privacy ledger: ``entries`` lines, the last one
    hashing to ``last_hash`` (all zeros when empty), with the proof that it extends the past.

    ``proof`` holds the body digests (``audit.entry.entry_digest``) of the ledger's last
    ``len(proof)`` entries, oldest first (the last :data:`MAX_PROOF` at most). An entry's chain
    hash is SHA-256 over the previous hash and its digest, so from the kept head's hash at ``k``
    entries the coordinator recomputes the hash at ``entries`` from the digests of entries
    ``k+1..entries`` and accepts the head only if it comes out as ``last_hash``. Digests are
    hashes of signed entries: they reveal nothing of the entries (epsilons, DP-SGD parameters)
    to the coordinator. ``signature`` (Ed25519, identity key of the roster) covers
    ``institution``, ``entries`` and ``last_hash``; the proof needs no signature, it is checked
    by hashing. Sent after every charge or refusal, before the release it covers.
    """

    institution: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    entries: Annotated[int, msgspec.Meta(ge=0)]
    last_hash: Digest
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
    proof: Annotated[tuple[Digest, ...], msgspec.Meta(max_length=MAX_PROOF)] = ()
