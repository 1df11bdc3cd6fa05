"""The ``sealmoe`` command line: one subcommand per job, each with ``--help``.

User errors (a bad config, existing keys, a missing file) print one line that says what to do
and exit with status 2; no traceback. Subcommands register a handler with
``set_defaults(handler=...)`` that returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from clients.contract.config import ConfigFileError
from clients.contract.config import FederationConfig
from clients.contract.config import delta_warnings
from clients.contract.config import load_config
from clients.contract.config import missing_data_files
from clients.contract.enroll import accept_ckks_share
from clients.contract.enroll import build_roster
from clients.contract.enroll import create_ckks_shares
from clients.contract.enroll import enroll_institution
from clients.contract.enroll import read_card
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import generate_keys
from clients.models.locate import PEFT_FILES
from clients.models.locate import AssetMissingError
from clients.models.locate import ModelNotFoundError
from clients.models.locate import locate_model
from coordinator.app.audit_commands import add_audit_parser
from coordinator.app.commands import CONFIG
from coordinator.app.commands import add_command
from coordinator.app.commands import arg
from coordinator.app.commands import config_path
from privacy.errors import UserError

USER_ERROR = 2


_DESCRIPTION = """\
sealmoe: federated fine-tuning of Mixture-of-LoRA-Experts adapters with DP-SGD and secure
aggregation. Every command reads the federation config (a TOML file, see examples/)."""


def _cmd_keys(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
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


def _cmd_enroll(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    card = enroll_institution(
        config.keys_dir, args.institution, config.institution_names, force=args.force
    )
    print(
        f"Wrote {args.institution}'s secret keys under {config.keys_dir / 'institutions'} "
        f"(mode 0600; they never leave this host) and its public card {card}: send the card "
        "to the coordinator's operator. Read them this fingerprint out of band (phone), so "
        f"they can check the card: {read_card(card, config.institution_names).identity_public}"
    )
    return 0


def _cmd_roster(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    roster = build_roster(config.keys_dir, config.institution_names, args.cards, force=args.force)
    for entry in roster.institutions:
        print(f"  {entry.name}: fingerprint {entry.identity_public} (check it with {entry.name})")
    print(
        f"Verified {len(roster.institutions)} cards; wrote {config.keys_dir / ROSTER_FILE} "
        "(public): copy it into every institution's keys folder."
    )
    return 0


def _cmd_ckks_share(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    shares = create_ckks_shares(
        config.keys_dir, args.institution, config.aggregation.ckks.params(), force=args.force
    )
    print(
        f"Created the shared CKKS key; kept it in {args.institution}'s folder. Send each sealed "
        f"share to its institution: {', '.join(str(p) for p in shares) or '(none)'}. Give the "
        f"coordinator only {config.keys_dir / 'ckks.public'} (no secret key)."
    )
    return 0


def _cmd_ckks_accept(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    target = accept_ckks_share(config.keys_dir, args.institution, args.share, force=args.force)
    print(f"Verified the share's signature and wrote {target} (mode 0600).")
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    path = config_path(args)
    config = load_config(path)
    try:
        locate_model(config.model.name, config.model.revision)
    except (ModelNotFoundError, AssetMissingError) as exc:
        raise ConfigFileError(path, str(exc), "$.model.name") from None
    init = config.model.init_adapter
    if init is not None and not all((Path(init) / f).is_file() for f in PEFT_FILES):
        raise ConfigFileError(
            path, f"{init} lacks {' or '.join(PEFT_FILES)}", "$.model.init_adapter"
        )
    missing = missing_data_files(config)
    if missing:
        listed = "; ".join(f"{field}: {file}" for field, file in missing)
        raise ConfigFileError(path, f"no such data file(s): {listed}", missing[0][0])
    console = Console()
    console.print(summary_table(config))
    for warning in delta_warnings(config):
        console.print(Text(f"warning: {warning}", style="yellow"))
    console.print(Text(f"OK: {config_path(args)} is a valid federation config.", style="green"))
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.service import Coordinator

    config = load_config(config_path(args))
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

    config = load_config(config_path(args))
    if args.institution not in config.institution_names:
        raise ConfigFileError(
            config_path(args),
            f"no institution {args.institution!r}; choose one of {config.institution_names}",
            field="--institution",
        )
    _log_to_stderr(args.log_level)
    return make_institution(config, args.institution).run()


def _cmd_run(args: argparse.Namespace) -> int:
    from coordinator.app.launcher import run_federation

    config = load_config(config_path(args))
    console = Console()
    if not console.is_terminal:  # a log file or CI: wide enough for the round tables
        console = Console(width=max(console.width, 120))
    return run_federation(Path(config_path(args)), config, console, fresh=args.fresh)


def _cmd_plan(args: argparse.Namespace) -> int:
    from coordinator.app.plan_table import print_plan

    config = load_config(config_path(args))
    console = Console()
    with console.status("planning: tokenising each institution's data (no model weights)"):
        from clients.runtime.plan import privacy_plan

        plans = privacy_plan(config)
    return print_plan(console, config, plans)


def _cmd_export(args: argparse.Namespace) -> int:
    from clients.runtime.trained_model import MODEL_DIR
    from clients.runtime.trained_model import export_model

    kept = Path(args.run_dir) / "institutions" / args.institution / MODEL_DIR
    out, kind = export_model(kept, args.out)
    how = (
        "load it with peft.PeftModel.from_pretrained(base_model, DIR)"
        if kind == "peft"
        else "load it with clients.runtime.trained_model.from_pretrained(DIR)"
    )
    print(f"wrote {out} ({kind} format); {how}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from clients.runtime.trained_model import generate

    print(args.prompt + generate(args.model, args.prompt, args.max_new_tokens))
    return 0


def _log_to_stderr(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # importing dp-accounting (absl) already put a handler on the root logger
    )


def summary_table(config: FederationConfig) -> Table:
    """A human-readable summary of a federation config (what ``check-config`` prints)."""
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
            f"{config.data.source}, one example per record of up to {config.data.block_len} "
            "tokens, "
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
            + (", signed survivor sets" if sec.check_survivors else "")
            + f", at least {sec.minimum_participants(n)} institutions per round",
        ),
        (
            "aggregation",
            f"{config.aggregation.strategy}; expert updates: {config.aggregation.expert_updates}; "
            + (
                f"routing statistics: {config.aggregation.routing_statistics}"
                if config.aggregation.section.releases_routing
                else "no routing statistics (own adapters)"
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


LOG_LEVEL = arg(
    "--log-level",
    default="info",
    choices=["debug", "info", "warning", "error"],
    help="logging detail on stderr (default: info)",
)


def _version() -> str:
    try:
        return importlib.metadata.version("sealmoe")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sealmoe",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add_command(
        commands,
        "keys",
        _cmd_keys,
        "create the coordinator's and every institution's keys and the roster",
        (
            "Create a CurveZMQ key pair (transport encryption and admission) and an Ed25519 "
            "identity key (signs secure-aggregation messages) for the coordinator and for each "
            "institution in the config, and the roster of their public keys, under the config's "
            "coordinator.keys_dir. Secret files get mode 0600. Existing keys are never replaced "
            "unless --force is given."
        ),
        *CONFIG,
        arg("--force", action="store_true", help="replace existing keys (old keys stop working)"),
    )

    add_command(
        commands,
        "enroll",
        _cmd_enroll,
        "make one institution's own keys on its host and its public card",
        (
            "On the institution's own host: create its CurveZMQ key pair and Ed25519 identity "
            "key under coordinator.keys_dir/institutions/NAME (mode 0600, never copied), and "
            "write NAME.card.json (its public keys, signed by its identity key) for the "
            "coordinator's operator. See README 'Deploying across hosts'."
        ),
        *CONFIG,
        arg("--institution", required=True, metavar="NAME", help="this host's institution"),
        arg("--force", action="store_true", help="replace existing keys (re-issue the card)"),
    )

    add_command(
        commands,
        "roster",
        _cmd_roster,
        "build the roster from the institutions' cards (coordinator's host)",
        (
            "On the coordinator's host: check each card's self-signature and that its name is "
            "an institution of the config, create the coordinator's own keys if absent, and "
            "write the roster (public) under coordinator.keys_dir."
        ),
        *CONFIG,
        arg("cards", nargs="+", metavar="CARD", help="NAME.card.json from each institution"),
        arg("--force", action="store_true", help="replace an existing roster"),
    )

    add_command(
        commands,
        "ckks-share",
        _cmd_ckks_share,
        "create the shared CKKS key on one institution and seal it to the others",
        (
            "On one institution's host, after the roster is in its keys folder: create the "
            "shared CKKS secret key, keep it, write ckks.public (no secret key; for the "
            "coordinator) and ckks-share-NAME.json for every other institution: encrypted to "
            "NAME's public key (X25519 + HKDF + AES-GCM) and signed by this institution."
        ),
        *CONFIG,
        arg("--institution", required=True, metavar="NAME", help="this host's institution"),
        arg("--force", action="store_true", help="replace an existing CKKS key"),
    )

    add_command(
        commands,
        "ckks-accept",
        _cmd_ckks_accept,
        "verify and open this institution's sealed CKKS share",
        (
            "On an institution's host: check the share's signature against the roster, decrypt "
            "it with this institution's own key and store the CKKS secret (mode 0600)."
        ),
        *CONFIG,
        arg("--institution", required=True, metavar="NAME", help="this host's institution"),
        arg("--share", required=True, metavar="FILE", help="ckks-share-NAME.json sent to you"),
        arg("--force", action="store_true", help="replace a different CKKS key already here"),
    )

    add_command(
        commands,
        "check-config",
        _cmd_check_config,
        "validate a federation config and print a summary",
        (
            "Validate a federation config: every field's type and range, unknown fields, the "
            "rules between fields (threshold vs institutions, unique names, ...), and that the "
            "base model's files are on this machine (without loading them). Prints a summary "
            "table, or one line naming the bad field. Warns (without refusing) when an "
            "institution's delta is not below 1/records as [data.max_blocks] train caps them."
        ),
        *CONFIG,
    )

    add_command(
        commands,
        "coordinator",
        _cmd_coordinator,
        "run the coordinator of a federation (one party)",
        (
            "Run the coordinator: bind coordinator.bind, admit only the institutions of the "
            "roster (CurveZMQ), run every round (secure aggregation with a timeout per stage), "
            "checkpoint each finished round under federation.run_dir. Run it again with the "
            "same config after a crash: it resumes after the last finished round."
        ),
        *CONFIG,
        LOG_LEVEL,
    )

    add_command(
        commands,
        "client",
        _cmd_client,
        "run one institution of a federation (one party)",
        (
            "Run one institution: dial the coordinator with its own keys, train its adapters "
            "with DP-SGD each round and release the update only through secure aggregation, "
            "after charging it to its privacy budget (a round that would exceed the budget is "
            "declined). Metrics stay local, under federation.run_dir/institutions/NAME."
        ),
        *CONFIG,
        arg("--institution", required=True, metavar="NAME", help="who this is"),
        LOG_LEVEL,
    )

    add_command(
        commands,
        "run",
        _cmd_run,
        "run a whole federation on this machine (every party its own process)",
        (
            "Start the coordinator and every institution of the config as separate processes "
            "on loopback (creating keys if there are none), print a table per round "
            "(loss/perplexity per institution, epsilon spent, bytes sent, time in training, "
            "cryptography and network) and the test perplexity before and after."
        ),
        *CONFIG,
        arg(
            "--fresh",
            action="store_true",
            help="delete the run directory first (default: resume the run it holds)",
        ),
    )

    add_command(
        commands,
        "plan",
        _cmd_plan,
        "show each institution's privacy plan and whether it can learn, before any training",
        (
            "Without loading model weights: per institution its training records, Poisson "
            "sampling rate, DP-SGD steps of the whole plan (spare rounds included), the noise "
            "multiplier that spends its budget, epsilon under PLD and RDP, and the expected "
            "noise-to-signal ratio of an averaged gradient, with suggestions when the plan "
            "cannot learn. Exit status 0, or 1 when some institution's plan cannot learn."
        ),
        *CONFIG,
    )

    add_command(
        commands,
        "export",
        _cmd_export,
        "write an institution's trained adapters as a self-describing directory",
        (
            "Write the adapters an institution ended a federation with (kept under "
            "RUN_DIR/institutions/NAME/model, decrypted there under CKKS) to OUT: "
            "adapter_config.json (base model named and hashed, federation config) and "
            "adapter_model.safetensors. A run whose adapters are plain LoRA (one expert, top-1, "
            "no shared expert) is written in PEFT's own format instead."
        ),
        arg("run_dir", metavar="RUN_DIR", help="a federation's run directory"),
        arg("--institution", required=True, metavar="NAME", help="whose model"),
        arg("--out", required=True, metavar="DIR", help="where to write it"),
    )

    add_command(
        commands,
        "generate",
        _cmd_generate,
        "continue a prompt with a trained model (a quick look)",
        (
            "Load a kept or exported sealmoe model directory onto its base model (the base "
            "model's files must hash as recorded) and print a greedy continuation of PROMPT."
        ),
        arg("model", metavar="DIR", help="RUN_DIR/institutions/NAME/model or an export"),
        arg("--prompt", required=True, help="text to continue"),
        arg("--max-new-tokens", type=int, default=40, metavar="N", help="(default: 40)"),
    )

    add_audit_parser(commands)
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
    except UserError as exc:
        print(f"sealmoe {args.command}: error: {exc}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
