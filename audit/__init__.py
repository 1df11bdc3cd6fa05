"""The privacy audit: signed hash-chained ledgers, their verification, reports, empirical audits.

Builds on ``privacy`` and ``secagg`` only (never on ``clients``): the institution runtime gets
a :class:`Ledger` injected by whoever starts it.
"""

from audit.entry import Entry
from audit.heads import HeadFileError, head_path, head_to_json, read_head
from audit.ledger import LEDGER_FILE, Ledger, LedgerError, ledger_path
from audit.verify import LedgerTampered, VerifiedLedger, verify_ledger
from privacy.budget import Epsilons

__all__ = [
    "LEDGER_FILE",
    "Entry",
    "Epsilons",
    "HeadFileError",
    "Ledger",
    "LedgerError",
    "LedgerTampered",
    "VerifiedLedger",
    "head_path",
    "head_to_json",
    "ledger_path",
    "read_head",
    "verify_ledger",
]
