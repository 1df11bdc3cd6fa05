"""The signed head of an institution's privacy ledger, as it travels to the coordinator.

The audit package signs and verifies it; the institution sends it after every charge or
refusal; the coordinator keeps the latest one. It lives here, below both, because it states a
privacy ledger's length and is no part of the secure-aggregation protocol.
"""

from __future__ import annotations

from typing import Annotated

import msgspec


class LedgerHead(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """An institution's signed statement of its privacy ledger: ``entries`` lines, the last one
    hashing to ``last_hash`` (all zeros when empty).

    Sent after every charge or refusal, before the release it covers. The coordinator checks
    ``signature`` (Ed25519, identity key of the roster; see ``audit.entry``) and keeps the
    latest head of each institution, so a ledger later cut short is detected by ``verify``.
    """

    institution: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    entries: Annotated[int, msgspec.Meta(ge=0)]
    last_hash: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
