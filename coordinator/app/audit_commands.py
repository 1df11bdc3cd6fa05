"""``sealmoe audit verify|report|empirical``: the privacy officer's commands.

The ``audit`` package works on keys and files it is handed; this module finds them (the roster
for identity keys, the coordinator's heads in the run directory) and prints the outcome.
``verify`` exits 0 when every ledger verifies (and, given a run directory holding a report, the
report's signature by the coordinator), 1 when any does not (one line per ledger or report file
naming file, line and problem), 2 for a setup error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from clients.contract.config import ConfigFileError
from clients.contract.config import load_config
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import KeyMaterialError
from clients.contract.keys import Roster
from clients.contract.keys import load_coordinator_identity
from clients.contract.keys import load_roster
from coordinator.app.commands import add_command
from coordinator.app.commands import arg
from privacy.errors import UserError

if TYPE_CHECKING:
    from audit import VerifiedLedger


TAMPERED = 1


class AuditUsageError(UserError, ValueError):
    """The arguments do not say what to audit (the message says what to pass)."""


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 120))


LEDGER_FILE = "ledger.jsonl"  # audit.LEDGER_FILE; audit loads lazily (dp-accounting: ~1 s)


def run_dir_of(ledger: Path) -> Path | None:
    """The run directory of a ledger at ``RUN_DIR/institutions/NAME/ledger.jsonl``, if so."""
    ledger = ledger.resolve()
    if ledger.name == LEDGER_FILE and ledger.parent.parent.name == "institutions":
        return ledger.parents[2]
    return None


def find_roster(args: argparse.Namespace, run_dir: Path | None = None) -> Roster:
    """The roster named by ``--roster``, else the one of ``--config``, else the one the audit
    context of ``run_dir`` names."""
    if args.roster is not None:
        return load_roster(args.roster)
    if args.config is not None:
        return load_roster(load_config(args.config).keys_dir / ROSTER_FILE)
    if run_dir is not None:
        from audit.context import ContextError
        from audit.context import read_context

        try:
            return load_roster(read_context(run_dir).roster)
        except ContextError:
            pass
    raise AuditUsageError(
        "no roster to take the identity keys from: pass --roster ROSTER.toml "
        "or --config FEDERATION.toml",
    )


def verify_report_signatures(run_dir: Path, roster: Roster) -> list[str]:
    """Check every report file of ``run_dir`` against the coordinator's roster key; one line
    per file that is unsigned, changed or signed by another key (empty: all good or none)."""
    from audit.signature import SIGNED_FILES
    from audit.signature import SignatureInvalid
    from audit.signature import verify_file

    problems = []
    for name in SIGNED_FILES:
        path = run_dir / name
        if not path.exists():
            continue
        try:
            verify_file(path, roster.coordinator.identity_key)
        except SignatureInvalid as exc:
            problems.append(str(exc))
    return problems


def verify_one(
    path: Path, roster: Roster, institution: str | None, run_dir: Path | None
) -> VerifiedLedger:
    """Verify one ledger against every head the coordinator kept for it: whose it is comes from
    ``institution`` or its folder name. A missing ledger with heads on file, or heads that do not
    read, raise :class:`audit.LedgerTampered` naming the institution."""
    from audit import HeadFileError
    from audit import LedgerTampered
    from audit import head_path
    from audit import read_heads
    from audit import verify_ledger

    name = institution or path.resolve().parent.name
    public_key = roster.institution(name).identity_key
    run_dir = run_dir or run_dir_of(path)
    heads = []
    if run_dir is not None:
        try:
            heads = read_heads(head_path(run_dir, name))
        except HeadFileError as exc:
            raise LedgerTampered(path, 0, f"{name}: the coordinator's heads: {exc}") from None
    return verify_ledger(path, public_key, institution=name, heads=heads)


def ledgers_of_run(run_dir: Path) -> list[Path]:
    """The ledger of every institution of ``run_dir`` with a ledger folder or heads on file
    (the ledger path even where the file is gone: a deleted ledger must fail, not be skipped)."""
    from audit import ledger_path
    from audit.heads import HEADS_DIR

    names = {p.parent.name for p in (run_dir / "institutions").glob(f"*/{LEDGER_FILE}")}
    names |= {p.stem for p in (run_dir / HEADS_DIR).glob("*.jsonl")}
    return [ledger_path(run_dir, name) for name in sorted(names)]


def cmd_verify(args: argparse.Namespace) -> int:
    from audit import LedgerTampered
    from audit.signature import SIGNED_FILES

    run_dir = Path(args.run_dir) if args.run_dir else None
    given_dirs = [Path(raw) for raw in args.ledgers if Path(raw).is_dir()]
    if len(given_dirs) > 1:
        raise AuditUsageError("give one run directory at a time (or ledger files)")
    ledgers = [Path(raw) for raw in args.ledgers if not Path(raw).is_dir()]
    if given_dirs:
        run_dir = run_dir or given_dirs[0]
        ledgers += ledgers_of_run(given_dirs[0])
    if run_dir is None and args.config is not None:
        run_dir = load_config(args.config).run_dir
    if not ledgers:
        if run_dir is None:
            raise AuditUsageError(
                "pass a RUN_DIR or LEDGER files, or --run-dir DIR (or --config) to verify all"
            )
        if args.institution is not None:
            raise AuditUsageError("--institution needs one LEDGER file")
        ledgers = ledgers_of_run(run_dir)
    roster = find_roster(args, given_dirs[0] if given_dirs else None)
    console = _console()
    table = Table(title="privacy ledgers")
    for column in ("ledger", "institution", "entries", "refusals", "ε RDP", "ε PLD", "heads"):
        table.add_column(column, justify="left" if column in ("ledger", "institution") else "right")
    failed = 0
    for path in ledgers:
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
            f"{verified.heads_checked} checked" if verified.head_checked
            else "none (a cut tail goes unnoticed)",
        )  # fmt: skip
    if table.rows:
        console.print(table)
    bad_report = []
    if given_dirs:
        bad_report = verify_report_signatures(given_dirs[0], roster)
        for problem in bad_report:
            print(f"sealmoe audit verify: FAILED: {problem}", file=sys.stderr)
    if failed or bad_report:
        if failed:
            print(
                f"sealmoe audit verify: {failed} of {len(ledgers)} ledgers do not verify",
                file=sys.stderr,
            )
        return TAMPERED
    console.print(f"OK: {len(ledgers)} ledgers verify (chain, signatures, every epsilon)")
    if given_dirs:
        signed = [n for n in SIGNED_FILES if (given_dirs[0] / n).exists()]
        console.print(
            f"OK: {', '.join(signed)} signed by the roster's coordinator key"
            if signed
            else "no report in the run directory: no report signature to check"
        )
    return 0


def produce_report(run_dir: Path, roster_path: Path | None = None) -> list[Path]:
    """Build, write and sign the privacy report of ``run_dir``; the files written (the report
    files first, then their signatures).

    Ledgers are verified with the identity keys of ``roster_path`` (default: the roster the
    run's audit context names), when it exists. The report is signed with the coordinator's
    identity key from the roster's keys folder, when this host holds it and it is the roster's
    coordinator key; otherwise the report is written unsigned (and any old signature removed),
    which ``sealmoe audit verify RUN_DIR`` reports as a failure.
    """
    import msgspec

    from audit.context import read_context
    from audit.render import write_report
    from audit.report import build_report

    facts = read_context(run_dir)
    if facts.strategy_facts is None:  # a context written before strategies stated their facts
        from coordinator.strategies.registry import strategy_facts  # lazy: imports torch

        facts = msgspec.structs.replace(facts, strategy_facts=strategy_facts(facts.strategy))
    path = roster_path or Path(facts.roster)
    keys = None
    roster = None
    if roster_path is not None or path.exists():
        roster = load_roster(path)
        keys = {e.name: e.identity_key for e in roster.institutions}
    written = write_report(run_dir, build_report(run_dir, facts, keys))
    return written + sign_report_files(run_dir, path.parent, roster)


def sign_report_files(run_dir: Path, keys_dir: Path, roster: Roster | None) -> list[Path]:
    """Sign the report files of ``run_dir`` with the coordinator's key under ``keys_dir``; the
    signature files (none, after removing stale ones, when the key is not here or not the
    roster's coordinator key)."""
    from cryptography.hazmat.primitives import serialization

    from audit.signature import remove_signatures
    from audit.signature import sign_report

    remove_signatures(run_dir)
    if roster is None:
        return []
    try:
        key = load_coordinator_identity(keys_dir)
    except KeyMaterialError:
        return []
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if raw.hex() != roster.coordinator.identity_public:
        return []
    return sign_report(run_dir, key)


def _unsigned_note(written: list[Path]) -> str | None:
    if any(p.name.endswith(".sig") for p in written):
        return None
    return (
        "the report is NOT signed: the coordinator's identity key (keys_dir/coordinator/"
        "identity.pem, matching the roster) is not on this host; run `sealmoe audit report` "
        "on the coordinator's host"
    )


def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    written = produce_report(run_dir, Path(args.roster) if args.roster else None)
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    console = _console()
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
    note = _unsigned_note(written)
    if note:
        console.print(f"[yellow]{note}[/yellow]")
    return 0


def training_of(run_dir: Path, name: str) -> tuple[float, float, int, float]:
    """(noise multiplier, sampling rate, total steps, delta) of ``name``'s charged DP-SGD."""
    from audit import ledger_path
    from audit.verify import parse_entry

    path = ledger_path(run_dir, name)
    if not path.exists():
        raise ConfigFileError(str(path), "no ledger: did this institution take part?")
    updates = [
        e for e in (parse_entry(line) for line in path.read_text().splitlines())
        if e.kind == "release" and e.what == "adapter-update"
    ]  # fmt: skip
    if not updates:
        raise ConfigFileError(str(path), "no adapter update was released: nothing to audit")
    settings = {(e.parameters["noise_multiplier"], e.parameters["sample_rate"]) for e in updates}
    if len(settings) != 1:
        raise ConfigFileError(str(path), f"the rounds used different DP-SGD settings {settings}")
    (sigma, rate) = settings.pop()
    return sigma, rate, sum(int(e.parameters["steps"]) for e in updates), updates[0].delta


def cmd_empirical(args: argparse.Namespace) -> int:
    from audit.context import context_path
    from audit.empirical import canary_audit
    from audit.report import EMPIRICAL_DIR

    console = _console()
    if args.run_dir is not None:
        if args.institution is None:
            raise AuditUsageError("with RUN_DIR, pass --institution NAME")
        run_dir = Path(args.run_dir)
        sigma, rate, steps, delta = training_of(run_dir, args.institution)
        label = f"DP-SGD of {args.institution}, all rounds"
    else:
        given = (args.noise_multiplier, args.sample_rate, args.steps)
        if None in given:
            raise AuditUsageError(
                "pass RUN_DIR --institution NAME, or --noise-multiplier, --sample-rate and --steps"
            )
        sigma, rate, steps = given
        delta, run_dir = args.delta, None
        label = "DP-SGD"
    with console.status(f"training with {args.canaries} canaries ({steps} DP-SGD steps)"):
        result = canary_audit(sigma, rate, steps, delta=delta, canaries=args.canaries,
                              confidence=args.confidence, label=label)  # fmt: skip
    table = Table(title=f"empirical privacy audit: {label}")
    columns = ("noise multiplier", "q", "steps", "canaries", "guesses", "correct",
               "ε lower bound", f"ε upper bound (RDP, δ={delta:g})")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(
        f"{sigma:.4g}", f"{result.sample_rate:.4g}", str(steps), str(result.canaries),
        str(result.guesses), str(result.correct), _eps(result.epsilon_lower_bound),
        _eps(result.epsilon_upper_bound),
    )  # fmt: skip
    console.print(table)
    console.print(
        f"at {result.confidence:.0%} confidence the training is not (ε, δ)-DP for any ε below "
        f"{result.epsilon_lower_bound:.3g}; the accountant proves "
        f"ε ≤ {result.epsilon_upper_bound:.3g}"
    )
    out = Path(args.out) if args.out else None
    if run_dir is not None:
        out = out or run_dir / EMPIRICAL_DIR / f"{args.institution}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.as_dict(), indent=1, sort_keys=True) + "\n")
        console.print(f"wrote {out}")
    if run_dir is not None and context_path(run_dir).exists():
        produce_report(run_dir)
        console.print(f"updated {run_dir / 'report.html'}")
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
    add_command(
        sub,
        "verify",
        cmd_verify,
        "recompute ledgers' hash chains, signatures and epsilons",
        (
            "Verify institutions' privacy ledgers: the hash chain (an edited, deleted, inserted "
            "or reordered entry), every Ed25519 signature against the roster's identity key, and "
            "every epsilon recomputed from the recorded dp-accounting events. Each ledger is "
            "also checked against every signed head the coordinator accepted (found in the run "
            "directory), so a ledger whose last entries were deleted, whose history was "
            "rewritten and signed again, or that was deleted while heads of it are on file, "
            "fails. Given a RUN_DIR (or, without LEDGER files, --run-dir or --config's run "
            "directory), every ledger of the run is checked; given a RUN_DIR, so is the "
            "report's detached signature (report.html.sig, ...) against the coordinator's "
            "identity key in the roster (default: the run's roster): a report that was changed "
            "after signing, is unsigned or was signed by another key fails. Exit status 0: all "
            "verify; 1: some do not (one line each, naming file, institution, line or head, "
            "and problem); 2: a setup error."
        ),
        arg(
            "ledgers",
            nargs="*",
            metavar="RUN_DIR|LEDGER",
            help="a run directory (every ledger, deleted ones with heads on file included, and "
            "the signed report) or ledger.jsonl files",
        ),
        arg("--roster", metavar="F", help="roster with the identity keys"),
        arg("--config", metavar="F", help="federation config (roster and run dir)"),
        arg(
            "--run-dir",
            metavar="DIR",
            help="run directory holding the coordinator's ledger heads (default: the ledger's own)",
        ),
        arg("--institution", metavar="NAME", help="whose ledger (default: its folder's name)"),
    )

    add_command(
        sub,
        "report",
        cmd_report,
        "write report.html, report.json and report.md for a run directory",
        (
            "Write the privacy report of a run: report.html (plots of epsilon over rounds per "
            "institution against its budget, remaining budget, tables of releases; opens "
            "offline), report.json (every number) and report.md, into RUN_DIR. Ledgers are "
            "verified with the roster's identity keys (default: the run's roster)."
        ),
        arg("run_dir", metavar="RUN_DIR", help="a federation's run directory"),
        arg("--roster", metavar="F", help="roster with the identity keys"),
    )

    add_command(
        sub,
        "empirical",
        cmd_empirical,
        "lower-bound epsilon empirically with canaries in one DP-SGD training run",
        (
            "Empirical privacy audit (Steinke, Nasr and Jagielski 2023, one training run): "
            "train with the real DP-SGD path at an institution's settings (from its ledger in "
            "RUN_DIR) or at the given ones, with canaries each included with probability 1/2, "
            "and turn the auditor's correct guesses into a lower bound on epsilon, printed next "
            "to the accountant's upper bound. With RUN_DIR the result goes to "
            "RUN_DIR/empirical/NAME.json and into the run's report."
        ),
        arg("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory"),
        arg("--institution", metavar="NAME", help="whose training to audit"),
        arg(
            "--noise-multiplier",
            type=float,
            metavar="S",
            help="DP-SGD noise multiplier (without RUN_DIR; with it: from the ledger)",
        ),
        arg(
            "--sample-rate",
            type=float,
            metavar="Q",
            help="Poisson rate of a record per step (without RUN_DIR)",
        ),
        arg("--steps", type=int, metavar="T", help="DP-SGD steps (without RUN_DIR)"),
        arg("--delta", type=float, default=1e-5, metavar="D", help="delta (default: 1e-5)"),
        arg(
            "--canaries",
            type=int,
            default=1000,
            metavar="M",
            help="canaries, each included with probability 1/2 (default: 1000)",
        ),
        arg(
            "--confidence",
            type=float,
            default=0.95,
            metavar="C",
            help="confidence of the lower bound (default: 0.95)",
        ),
        arg("--out", metavar="F", help="also write the result as JSON here"),
    )
