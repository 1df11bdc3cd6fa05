"""The ``sealmoe`` command line: one subcommand per job, each with ``--help``.

User errors (a bad config, existing keys, a missing file) print one line that says what to do
and exit with status 2; no traceback. Subcommands register a handler with
``set_defaults(handler=...)`` that returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from clients.contract.config import ConfigFileError, FederationConfig, load_config
from clients.contract.keys import ROSTER_FILE, KeyMaterialError, generate_keys
from coordinator.app.audit_commands import AuditUsageError, add_audit_parser

USER_ERROR = 2


_DESCRIPTION = """\
sealmoe: federated fine-tuning of Mixture-of-LoRA-Experts adapters with DP-SGD and secure
aggregation. Every command reads the federation config (a TOML file, see examples/)."""


def _cmd_keys(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    roster = generate_keys(
        config.keys_dir,
        config.institution_names,
        force=args.force,
        ckks=config.aggregation.ckks.params(),
    )
    console = Console()
    console.print(
        f"Wrote keys for the coordinator and {len(roster.institutions)} institutions under "
        f"{config.keys_dir}"
    )
    console.print(
        f"Roster: {config.keys_dir / ROSTER_FILE} (public; give it to every party). Give each "
        "institution only its own folder under institutions/."
    )
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    console = Console()
    console.print(summary_table(config))
    console.print(Text(f"OK: {args.config} is a valid federation config.", style="green"))
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.service import Coordinator

    config = load_config(args.config)
    _log_to_stderr(args.log_level)
    outcomes = Coordinator(config).run()
    aborted = [o.federation_round for o in outcomes if o.error]
    print(
        f"sealmoe coordinator: {len(outcomes)} rounds run, "
        f"{len(outcomes) - len(aborted)} completed, aborted: {aborted or 'none'}"
    )
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from coordinator.app.wiring import make_institution

    config = load_config(args.config)
    if args.institution not in config.institution_names:
        raise ConfigFileError(
            f"{args.config}: no institution {args.institution!r}; "
            f"choose one of {config.institution_names}"
        )
    _log_to_stderr(args.log_level)
    return make_institution(config, args.institution).run()


def _cmd_run(args: argparse.Namespace) -> int:
    from coordinator.app.launcher import run_federation

    config = load_config(args.config)
    console = Console()
    if not console.is_terminal:  # a log file or CI: wide enough for the round tables
        console = Console(width=max(console.width, 120))
    return run_federation(Path(args.config), config, console, fresh=args.fresh)


def _log_to_stderr(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # importing dp-accounting (absl) already put a handler on the root logger
    )


def summary_table(config: FederationConfig) -> Table:
    """A human-readable summary of a federation config (what ``check-config`` prints)."""
    from coordinator.strategies.registry import strategy_facts  # lazy: imports torch

    fed, moe, sec = config.federation, config.model.moe, config.secagg
    n = len(config.institutions)
    threshold, neighbours = sec.resolved(n)
    table = Table(title=f"federation {fed.name!r}", show_header=True)
    table.add_column("setting", style="bold")
    table.add_column("value")
    rows = [
        ("rounds / seed", f"{fed.rounds} / {fed.seed}"),
        ("run directory", str(config.run_dir)),
        (
            "coordinator",
            f"{config.coordinator.bind} (stage timeout {config.coordinator.stage_timeout_s:g} s"
            + (
                f", training {config.coordinator.training_timeout_s:g} s)"
                if config.coordinator.training_timeout_s is not None
                else ")"
            ),
        ),
        ("keys directory", str(config.keys_dir)),
        ("model", config.model.name),
        (
            "MoE-LoRA",
            f"{moe.num_experts} experts, top-{moe.top_k}, rank {moe.rank}, alpha {moe.alpha:g}, "
            f"mode {moe.mode}, targets {', '.join(moe.target_modules)}"
            + (", shared expert" if moe.shared_expert else ""),
        ),
        (
            "data",
            f"{config.data.source}, blocks of {config.data.block_len} tokens, "
            f"caps {config.data.max_blocks.as_dict() or 'none'}",
        ),
        (
            "local training",
            f"{config.training.local_steps} steps x batch {config.training.batch_size}, "
            f"lr {config.training.lr:g}, device {config.training.device}",
        ),
        (
            "DP-SGD",
            f"(eps={config.privacy.target_epsilon:g}, delta={config.privacy.target_delta:g}) "
            f"per institution, clip C={config.privacy.max_grad_norm:g}, "
            f"{config.privacy.accountant.upper()} accountant",
        ),
        (
            "secure aggregation",
            f"t={threshold} of {neighbours + 1} share holders, k={neighbours} neighbours, "
            f"clip {sec.clip:g}, {sec.bits}-bit values in Z_2^{sec.modulus_bits}"
            + (", signed survivor sets" if sec.check_survivors else ""),
        ),
        (
            "aggregation",
            f"{config.aggregation.strategy}; expert updates: {config.aggregation.expert_updates}; "
            + (
                "no routing statistics (own adapters)"
                if not strategy_facts(config.aggregation.strategy).releases_routing
                else f"routing statistics: {config.aggregation.routing_statistics}"
            ),
        ),
    ]
    for setting, value in rows:
        table.add_row(setting, Text(value))
    for inst in config.institutions:
        budget = config.budget(inst.name)
        own = " (own budget)" if inst.privacy is not None else ""
        table.add_row(
            f"institution {inst.name}",
            Text(
                f"dials {config.connect_address(inst.name)}; "
                f"eps={budget.target_epsilon:g}, delta={budget.target_delta:g}{own}"
            ),
        )
    return table


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sealmoe",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keys = commands.add_parser(
        "keys",
        help="create the coordinator's and every institution's keys and the roster",
        description=(
            "Create a CurveZMQ key pair (transport encryption and admission) and an Ed25519 "
            "identity key (signs secure-aggregation messages) for the coordinator and for each "
            "institution in the config, and the roster of their public keys, under the config's "
            "coordinator.keys_dir. Secret files get mode 0600. Existing keys are never replaced "
            "unless --force is given."
        ),
    )
    keys.add_argument("--config", required=True, metavar="F", help="federation config (TOML)")
    keys.add_argument(
        "--force", action="store_true", help="replace existing keys (old keys stop working)"
    )
    keys.set_defaults(handler=_cmd_keys)

    check = commands.add_parser(
        "check-config",
        help="validate a federation config and print a summary",
        description=(
            "Validate a federation config: every field's type and range, unknown fields, and "
            "the rules between fields (threshold vs institutions, unique names, ...). Prints a "
            "summary table, or one line naming the bad field."
        ),
    )
    check.add_argument("config", metavar="F", help="federation config (TOML)")
    check.set_defaults(handler=_cmd_check_config)

    coordinator = commands.add_parser(
        "coordinator",
        help="run the coordinator of a federation (one party)",
        description=(
            "Run the coordinator: bind coordinator.bind, admit only the institutions of the "
            "roster (CurveZMQ), run every round (secure aggregation with a timeout per stage), "
            "checkpoint each finished round under federation.run_dir. Run it again with the "
            "same config after a crash: it resumes after the last finished round."
        ),
    )
    coordinator.add_argument("--config", required=True, metavar="F", help="federation config")
    coordinator.set_defaults(handler=_cmd_coordinator)

    client = commands.add_parser(
        "client",
        help="run one institution of a federation (one party)",
        description=(
            "Run one institution: dial the coordinator with its own keys, train its adapters "
            "with DP-SGD each round and release the update only through secure aggregation, "
            "after charging it to its privacy budget (a round that would exceed the budget is "
            "declined). Metrics stay local, under federation.run_dir/institutions/NAME."
        ),
    )
    client.add_argument("--config", required=True, metavar="F", help="federation config")
    client.add_argument("--institution", required=True, metavar="NAME", help="who this is")
    client.set_defaults(handler=_cmd_client)

    run = commands.add_parser(
        "run",
        help="run a whole federation on this machine (every party its own process)",
        description=(
            "Start the coordinator and every institution of the config as separate processes "
            "on loopback (creating keys if there are none), print a table per round "
            "(loss/perplexity per institution, epsilon spent, bytes sent, time in training, "
            "cryptography and network) and the test perplexity before and after."
        ),
    )
    run.add_argument("config", metavar="F", help="federation config (TOML)")
    run.add_argument(
        "--fresh", action="store_true",
        help="delete the run directory first (default: resume the run it holds)",
    )  # fmt: skip
    run.set_defaults(handler=_cmd_run)

    add_audit_parser(commands)

    for sub in (coordinator, client):
        sub.add_argument(
            "--log-level", default="info", choices=["debug", "info", "warning", "error"],
            help="logging detail on stderr (default: info)",
        )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sealmoe`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else USER_ERROR
    # dp-accounting warns (through absl) each time a fractional RDP order does not converge and
    # is left out of the bound: expected, harmless, and hundreds of lines per calibration (every
    # command that prices a ledger, e.g. the report at the end of `sealmoe run`).
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return args.handler(args)
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"sealmoe {args.command}: error: {exc}", file=sys.stderr)
        return USER_ERROR


# Errors that mean "fix your setup", reported in one line. The heavy modules that define some of
# them are imported lazily by the subcommands, so they are looked up only if already loaded.
_LAZY_USER_ERRORS = (
    ("coordinator.service", "CoordinatorError"),
    ("clients.runtime.institution", "InstitutionError"),
    ("coordinator.store", "StoreError"),
    ("audit.ledger", "LedgerError"),
    ("audit.heads", "HeadFileError"),
    ("audit.context", "ContextError"),
    ("audit.empirical", "AuditError"),
)


def _user_errors() -> tuple[type[Exception], ...]:
    lazy = [
        getattr(sys.modules[module], name)
        for module, name in _LAZY_USER_ERRORS
        if module in sys.modules
    ]
    return (ConfigFileError, KeyMaterialError, AuditUsageError, *lazy)


if __name__ == "__main__":
    sys.exit(main())
