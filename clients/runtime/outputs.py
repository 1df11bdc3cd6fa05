"""What the institution's round logic asks its loop to do, in order.

:class:`~clients.runtime.rounds.InstitutionRounds` does no I/O: each message it handles yields a
list of these records, and the loop (:class:`~clients.runtime.institution.Institution`) carries
them out one after the other. The order is part of the contract (privacy properties depend on
it): strategy memory is on disk before the next message goes out, and the ledger head is sent
before the releases it accounts for.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Any

import msgspec
import numpy as np


@dataclass(frozen=True)
class Send:
    """Send ``message`` to the coordinator."""

    message: msgspec.Struct


@dataclass(frozen=True)
class PersistMemory:
    """Keep the strategy's memory (safetensors bytes) on disk, durably, before carrying out
    anything after this record, so a restarted institution goes on from this round. If it
    cannot be kept, the loop tells the round logic (``local_failure``) instead of going on."""

    data: bytes


@dataclass(frozen=True)
class AppendMetrics:
    """Append one metrics line (private: computed on local data, it never leaves)."""

    line: dict[str, Any]


@dataclass(frozen=True)
class Finished:
    """The federation is over: the loop keeps the trained model (the learner's adapters, its
    memory and the public ``extras`` of the final state) and stops serving."""

    extras: dict[str, np.ndarray] = field(default_factory=dict)


Output = Send | PersistMemory | AppendMetrics | Finished
