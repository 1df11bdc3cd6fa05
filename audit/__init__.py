"""The privacy audit: signed hash-chained ledgers, their verification, reports, empirical audits.

Builds on ``privacy`` and ``secagg`` only (never on ``clients``): the institution runtime gets
a :class:`Ledger` injected by whoever starts it.
"""

from audit.entry import Entry
from audit.heads import (
    HeadFileError,
    HeadRefused,
    check_extends,
    head_path,
    head_to_json,
    read_head,
    read_heads,
)
from audit.ledger import LEDGER_FILE, Ledger, LedgerError, ledger_path
from audit.verify import LedgerTampered, VerifiedLedger, verify_ledger
from privacy.budget import Epsilons

__all__ = [
    "LEDGER_FILE",
    "Entry",
    "Epsilons",
    "HeadFileError",
    "HeadRefused",
    "Ledger",
    "LedgerError",
    "LedgerTampered",
    "VerifiedLedger",
    "check_extends",
    "head_path",
    "head_to_json",
    "ledger_path",
    "read_head",
    "read_heads",
    "verify_ledger",
]
