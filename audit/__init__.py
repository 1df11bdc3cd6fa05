"""The privacy audit: signed hash-chained ledgers, their verification, reports, empirical audits.

Builds on ``privacy`` and ``secagg`` only (never on ``clients``): the institution runtime gets
a :class:`Ledger` injected by whoever starts it.
"""

from audit.entry import Entry
from audit.heads import HeadFileError
from audit.heads import HeadRefused
from audit.heads import check_extends
from audit.heads import head_path
from audit.heads import head_to_json
from audit.heads import read_head
from audit.heads import read_heads
from audit.ledger import LEDGER_FILE
from audit.ledger import Ledger
from audit.ledger import LedgerError
from audit.ledger import ledger_path
from audit.verify import LedgerTampered
from audit.verify import VerifiedLedger
from audit.verify import verify_ledger
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
