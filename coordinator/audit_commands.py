"""``sealmoe audit verify|report|empirical``: the privacy officer's commands.

The ``audit`` package works on keys and files it is handed; this module finds them (the roster
for identity keys, the coordinator's heads in the run directory) and prints the outcome.
``verify`` exits 0 when every ledger verifies, 1 when any does not (one line per ledger naming
file, line and problem), 2 for a setup error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from clients.config import ConfigFileError, load_config
from clients.keys import ROSTER_FILE, Roster, load_roster

if TYPE_CHECKING:
    from audit import VerifiedLedger

TAMPERED = 1
LEDGER_FILE = "ledger.jsonl"  # audit.LEDGER_FILE; audit is imported lazily (it pulls in torch)


def run_dir_of(ledger: Path) -> Path | None:
    """The run directory of a ledger at ``RUN_DIR/institutions/NAME/ledger.jsonl``, if so."""
    ledger = ledger.resolve()
    if ledger.name == LEDGER_FILE and ledger.parent.parent.name == "institutions":
        return ledger.parents[2]
    return None


def find_roster(args: argparse.Namespace) -> Roster:
    """The roster named by ``--roster``, else the one of ``--config``."""
    if args.roster is not None:
        return load_roster(args.roster)
    if args.config is not None:
        return load_roster(load_config(args.config).keys_dir / ROSTER_FILE)
    raise ConfigFileError(
        "sealmoe audit verify",
        "no roster to take the institutions' identity keys from: pass --roster ROSTER.toml "
        "or --config FEDERATION.toml",
    )


def verify_one(
    path: Path, roster: Roster, institution: str | None, run_dir: Path | None
) -> VerifiedLedger:
    """Verify one ledger: whose it is comes from ``institution`` or its folder name."""
    from audit import head_path, read_head, verify_ledger

    name = institution or path.resolve().parent.name
    public_key = roster.institution(name).identity_key
    run_dir = run_dir or run_dir_of(path)
    head = None
    if run_dir is not None and head_path(run_dir, name).exists():
        head = read_head(head_path(run_dir, name))
    return verify_ledger(path, public_key, institution=name, head=head)


def cmd_verify(args: argparse.Namespace) -> int:
    from audit import LedgerTampered

    roster = find_roster(args)
    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is None and args.config is not None:
        run_dir = load_config(args.config).run_dir
    console = Console()
    table = Table(title="privacy ledgers")
    for column in ("ledger", "institution", "entries", "refusals", "ε RDP", "ε PLD", "head"):
        table.add_column(column, justify="left" if column in ("ledger", "institution") else "right")
    failed = 0
    for raw in args.ledgers:
        path = Path(raw)
        try:
            verified = verify_one(path, roster, args.institution, run_dir)
        except LedgerTampered as exc:
            print(f"sealmoe audit verify: FAILED: {exc}", file=sys.stderr)
            failed += 1
            continue
        spent = verified.spent
        refusals = sum(1 for e in verified.entries if e.kind == "refusal")
        table.add_row(
            str(path), verified.institution or "(empty)", str(len(verified.entries)),
            str(refusals), _eps(spent.rdp), _eps(spent.pld),
            "checked" if verified.head_checked else "none (a cut tail goes unnoticed)",
        )  # fmt: skip
    if table.rows:
        console.print(table)
    if failed:
        print(
            f"sealmoe audit verify: {failed} of {len(args.ledgers)} ledgers do not verify",
            file=sys.stderr,
        )
        return TAMPERED
    console.print(f"OK: {len(args.ledgers)} ledgers verify (chain, signatures, every epsilon)")
    return 0


def produce_report(run_dir: Path, roster_path: Path | None = None) -> list[Path]:
    """Build and write the privacy report of ``run_dir``; the files written.

    Ledgers are verified with the identity keys of ``roster_path`` (default: the roster the
    run's audit context names), when it exists.
    """
    from audit.context import read_context
    from audit.render import write_report
    from audit.report import build_report

    facts = read_context(run_dir)
    path = roster_path or Path(facts.roster)
    keys = None
    if roster_path is not None or path.exists():
        keys = {e.name: e.identity_key for e in load_roster(path).institutions}
    return write_report(run_dir, build_report(run_dir, facts, keys))


def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    written = produce_report(run_dir, Path(args.roster) if args.roster else None)
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    console = Console()
    table = Table(title=report["title"])
    for column in ("institution", "budget ε", "spent ε RDP", "spent ε PLD", "remaining", "ledger"):
        table.add_column(column)
    for inst in report["institutions"]:
        table.add_row(
            inst["name"], f"{inst['budget']['epsilon']:g}", _eps(inst["spent"].get("rdp")),
            _eps(inst["spent"].get("pld")), _eps(inst["remaining_epsilon"]),
            inst["verification"]["status"],
        )  # fmt: skip
    console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _eps(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.4g}"


def add_audit_parser(commands: argparse._SubParsersAction) -> None:
    """``sealmoe audit`` and its subcommands."""
    audit = commands.add_parser(
        "audit",
        help="verify privacy ledgers, write privacy reports, run an empirical privacy audit",
        description="The privacy officer's commands: verify, report, empirical.",
    )
    sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    verify = sub.add_parser(
        "verify",
        help="recompute ledgers' hash chains, signatures and epsilons",
        description=(
            "Verify institutions' privacy ledgers: the hash chain (an edited, deleted, inserted "
            "or reordered entry), every Ed25519 signature against the roster's identity key, and "
            "every epsilon recomputed from the recorded dp-accounting events. With the "
            "coordinator's signed heads (found in the run directory) a ledger whose last "
            "entries were deleted is detected too. Exit status 0: all verify; 1: some do not "
            "(one line each, naming file, line and problem); 2: a setup error."
        ),
    )
    verify.add_argument("ledgers", nargs="+", metavar="LEDGER", help="ledger.jsonl files")
    verify.add_argument("--roster", metavar="F", help="roster with the identity keys")
    verify.add_argument("--config", metavar="F", help="federation config (roster and run dir)")
    verify.add_argument(
        "--run-dir", metavar="DIR",
        help="run directory holding the coordinator's ledger heads (default: the ledger's own)",
    )  # fmt: skip
    verify.add_argument(
        "--institution", metavar="NAME", help="whose ledger (default: its folder's name)"
    )
    verify.set_defaults(handler=cmd_verify)

    report = sub.add_parser(
        "report",
        help="write report.html, report.json and report.md for a run directory",
        description=(
            "Write the privacy report of a run: report.html (plots of epsilon over rounds per "
            "institution against its budget, remaining budget, tables of releases; opens "
            "offline), report.json (every number) and report.md, into RUN_DIR. Ledgers are "
            "verified with the roster's identity keys (default: the run's roster)."
        ),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a federation's run directory")
    report.add_argument("--roster", metavar="F", help="roster with the identity keys")
    report.set_defaults(handler=cmd_report)
