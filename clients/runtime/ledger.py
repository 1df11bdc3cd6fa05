"""What the institution runtime needs from a privacy ledger; the ``audit`` package provides it.

``clients`` and ``audit`` may not import each other, so the runtime states its needs as a
Protocol and whoever starts an institution injects a ledger (``audit.Ledger``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from privacy import Release
from privacy.head import LedgerHead


class PrivacyLedger(Protocol):
    """Write-ahead charging of releases against one institution's budget.

    ``check`` and ``charge`` raise :class:`privacy.ReleaseRefused` (after recording the
    refusal) when the releases may not leave; ``charge`` returns only once the charge is on
    disk, so the caller sends the releases after it.
    """

    budget_epsilon: float
    delta: float

    def check(self, releases: Sequence[Release]) -> None: ...

    def charge(self, releases: Sequence[Release]) -> object: ...

    def spent(self) -> float: ...

    def head(self) -> LedgerHead: ...
