"""Crash-safe persistence of the federation: one checkpoint per finished round and a journal.

Every file is written to a temporary name, flushed to disk and renamed, so a ``kill -9`` at any
moment leaves either the old or the new version. The journal (JSON Lines, append + fsync) records
each attempt at a round when it starts and when it ends; a round counts as done only once its
"completed" (or "aborted") line is on disk, which happens after its checkpoint is. On restart the
coordinator resumes after the last done round, under a fresh attempt number, so every message of
the interrupted attempt is refused as a replay.

A checkpoint holds the global adapters as safetensors, or, with expert updates under CKKS, the
encrypted global state the coordinator cannot read (``.ckks``: a msgpack
:class:`~secagg.ckks.EncryptedBatch`); the plaintext never touches the coordinator's disk then.
A strategy's public aggregates (:attr:`~clients.contract.layout.GlobalState.extras`), if any, go
beside it as ``.extras`` (safetensors, see ``clients.contract.extras``), hashed in the journal with
the rest.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import msgspec
import numpy as np
import torch
from safetensors.torch import load
from safetensors.torch import save

from audit.context import context_path
from audit.heads import check_extends
from audit.heads import head_path
from audit.heads import head_to_json
from audit.heads import read_head
from clients.contract.durable import append_line
from clients.contract.durable import atomic_write
from clients.contract.durable import drop_torn_tail
from clients.contract.extras import ExtrasError
from clients.contract.extras import decode_extras
from clients.contract.extras import encode_extras
from privacy.errors import UserError
from privacy.head import LedgerHead
from secagg.ckks import EncryptedBatch

JOURNAL = "journal.jsonl"
CHECKPOINTS = "checkpoints"


class StoreError(UserError, RuntimeError):
    """The run directory is inconsistent (a checkpoint is missing or does not match its hash)."""


class RoutingRelay(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The summed routing statistics the coordinator relays: plain floats or a CKKS sum."""

    plain: bytes | None = None
    encrypted: EncryptedBatch | None = None


@dataclass(frozen=True)
class Resume:
    """Where a (re)started coordinator stands: state after ``last_round``, next attempt number.

    ``adapters`` is None before any checkpoint, an :class:`EncryptedBatch` for CKKS checkpoints;
    ``extras`` are the strategy's public aggregates of that checkpoint (empty if none).
    """

    last_round: int
    adapters: dict[str, torch.Tensor] | EncryptedBatch | None
    routing: RoutingRelay
    next_attempt: int
    extras: dict[str, np.ndarray] = field(default_factory=dict)


class RunStore:
    """The run directory of one federation: ``journal.jsonl`` and ``checkpoints/``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        (self.run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        self.journal_path = self.run_dir / JOURNAL
        self._kept_heads: dict[str, LedgerHead | None] = {}  # last accepted, read once

    def entries(self) -> list[dict]:
        """Every complete journal line (a torn last line from a crash is ignored)."""
        if not self.journal_path.exists():
            return []
        out = []
        for line in self.journal_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # only the last line can be torn: it was never acknowledged
        return out

    def resume(self) -> Resume:
        """The state after the last done round (``adapters`` None before any checkpoint)."""
        entries = self.entries()
        done = [e for e in entries if e["event"] in ("completed", "aborted")]
        last_round = max((e["round"] for e in done), default=0)
        started = [e for e in entries if e["event"] == "started" and e["round"] == last_round + 1]
        completed = [e for e in done if e["event"] == "completed"]
        if not completed:
            return Resume(last_round, None, RoutingRelay(), len(started))
        latest = max(completed, key=lambda e: e["round"])
        adapters, routing, extras = self._load_checkpoint(latest)
        return Resume(last_round, adapters, routing, len(started), extras)

    def started(self, federation_round: int, attempt: int, round_id: int, names: list[str]) -> None:
        self._append(
            event="started", round=federation_round, attempt=attempt, round_id=round_id,
            institutions=names,
        )  # fmt: skip

    def completed(
        self,
        federation_round: int,
        attempt: int,
        adapters: dict[str, torch.Tensor] | EncryptedBatch,
        routing: RoutingRelay,
        included: list[str],
        seconds: dict[str, float],
        extras: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write the round's checkpoint (with ``extras``, if any), then acknowledge it in the
        journal."""
        stem = f"round-{federation_round:04d}"
        if isinstance(adapters, EncryptedBatch):
            suffix, state_bytes = ".ckks", msgspec.msgpack.encode(adapters)
        else:
            suffix = ".safetensors"
            state_bytes = save({k: v.detach().cpu().contiguous() for k, v in adapters.items()})
        routing_bytes = msgspec.msgpack.encode(routing)
        extras_bytes = encode_extras(extras or {})
        atomic_write(self.run_dir / CHECKPOINTS / f"{stem}{suffix}", state_bytes)
        atomic_write(self.run_dir / CHECKPOINTS / f"{stem}.routing", routing_bytes)
        parts = [state_bytes, routing_bytes]
        if extras_bytes:
            atomic_write(self.run_dir / CHECKPOINTS / f"{stem}.extras", extras_bytes)
            parts.append(extras_bytes)
        self._append(
            event="completed", round=federation_round, attempt=attempt, included=included,
            checkpoint=f"{CHECKPOINTS}/{stem}", state=suffix[1:], extras=bool(extras_bytes),
            sha256=_digest(*parts), seconds=seconds,
        )  # fmt: skip

    def write_context(self, data: bytes) -> None:
        """Write the run's audit context (what its privacy report cites), atomically."""
        atomic_write(context_path(self.run_dir), data)

    def save_head(self, head: LedgerHead) -> bool:
        """Keep ``head`` (its signature already verified) if it provably extends the last head
        kept for its institution (:func:`audit.heads.check_extends`); whether it was new.

        Every accepted head is appended, with fsync, to the institution's heads file, so
        ``verify`` checks its ledger against all of them. A head that states the kept one again
        is not appended. Raises :class:`audit.heads.HeadRefused` for a head that does not
        extend the kept one (a rolled-back, forked or rewritten ledger, or a bad proof), and
        :class:`audit.heads.HeadFileError` if the heads file no longer reads (only outside
        tampering can do that; no head is accepted then, so none can paper over it).
        """
        path = head_path(self.run_dir, head.institution)
        if head.institution not in self._kept_heads:
            self._kept_heads[head.institution] = read_head(path)
        if not check_extends(self._kept_heads[head.institution], head):
            return False
        drop_torn_tail(path)
        append_line(path, head_to_json(head).decode("ascii"))
        self._kept_heads[head.institution] = msgspec.structs.replace(head, proof=())
        return True

    def aborted(self, federation_round: int, attempt: int, reason: str) -> None:
        self._append(event="aborted", round=federation_round, attempt=attempt, reason=reason)

    def _load_checkpoint(
        self, entry: dict
    ) -> tuple[dict[str, torch.Tensor] | EncryptedBatch, RoutingRelay, dict[str, np.ndarray]]:
        base = self.run_dir / entry["checkpoint"]
        kind = entry.get("state", "safetensors")
        try:
            parts = [base.with_suffix(f".{kind}").read_bytes()]
            parts.append(base.with_suffix(".routing").read_bytes())
            if entry.get("extras", False):
                parts.append(base.with_suffix(".extras").read_bytes())
        except OSError as exc:
            raise StoreError(f"checkpoint of round {entry['round']} is missing: {exc}") from None
        if _digest(*parts) != entry["sha256"]:
            raise StoreError(f"checkpoint of round {entry['round']} does not match the journal")
        state_bytes, routing_bytes = parts[0], parts[1]
        try:
            extras = decode_extras(parts[2]) if len(parts) > 2 else {}
        except ExtrasError as exc:
            raise StoreError(f"checkpoint of round {entry['round']}: {exc}") from None
        routing = msgspec.msgpack.decode(routing_bytes, type=RoutingRelay)
        if kind == "ckks":
            return msgspec.msgpack.decode(state_bytes, type=EncryptedBatch), routing, extras
        return load(state_bytes), routing, extras

    def _append(self, **entry: object) -> None:
        entry["time"] = time.time()
        append_line(self.journal_path, json.dumps(entry, sort_keys=True))


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()
