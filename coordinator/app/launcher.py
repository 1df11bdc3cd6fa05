"""``sealmoe run``: the whole federation on one machine, each party a separate process.

The coordinator and every institution run as their own ``sealmoe`` processes on loopback, each
with its own keys, exactly as they would on separate hosts. This process only watches: it reads
the coordinator's journal and the institutions' local metrics files (which a real deployment
would never gather in one place) and prints one table per round and a final before/after table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn
from rich.progress import MofNCompleteColumn
from rich.progress import Progress
from rich.progress import SpinnerColumn
from rich.progress import TextColumn
from rich.progress import TimeElapsedColumn
from rich.table import Table

from audit.context import ContextError
from clients.contract.config import FederationConfig
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import generate_keys
from clients.runtime.institution import METRICS_FILE
from clients.runtime.institution import PROGRESS_FILE
from clients.runtime.plan import privacy_plan
from clients.runtime.progress import read_step_progress
from coordinator.app.audit_commands import produce_report
from coordinator.app.plan_table import print_plan
from coordinator.store import JOURNAL

POLL_S = 0.5


METRICS_GRACE_S = 30.0


EXIT_GRACE_S = 120.0
"""How long the institutions may take to finish (final evaluation) after the coordinator."""


def run_federation(
    config_path: Path, config: FederationConfig, console: Console, *, fresh: bool = False
) -> int:
    """Start every party, print progress until the coordinator exits; its exit status.

    An existing run directory is resumed (the coordinator picks up after its last finished
    round) unless ``fresh``, which deletes it first.
    """
    if fresh and config.run_dir.exists():
        shutil.rmtree(config.run_dir)
    elif _rounds_done(config) >= config.federation.rounds:
        console.print(
            f"the run in {config.run_dir} already finished its {config.federation.rounds} "
            "rounds; its results follow (--fresh starts over)"
        )
        for entry in _ready_rounds(config, set(), wait=False):
            console.print(round_table(config, entry))
        console.print(before_after_table(config))
        return _print_report(config, console)
    elif (config.run_dir / JOURNAL).exists():
        console.print(f"resuming the run in {config.run_dir} (--fresh starts over)")
    with console.status("planning: tokenising each institution's data (no model weights)"):
        plans = privacy_plan(config)
    print_plan(console, config, plans)
    if not (config.keys_dir / ROSTER_FILE).exists():
        generate_keys(
            config.keys_dir, config.institution_names, ckks=config.aggregation.ckks.params()
        )
        console.print(f"created keys and roster under {config.keys_dir}")
    logs = config.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "coordinator.app.cli"]
    parties = {"coordinator": [*command, "coordinator", "--config", str(config_path)]}
    for name in config.institution_names:
        parties[name] = [*command, "client", "--config", str(config_path), "--institution", name]
    # One machine plays every party: share its cores instead of oversubscribing them.
    threads = max(1, (os.cpu_count() or 1) // len(config.institution_names))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads)}  # fmt: skip
    processes = {}
    for party, argv in parties.items():
        log_file = (logs / f"{party}.log").open("ab")
        processes[party] = subprocess.Popen(  # noqa: S603
            argv, stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
    console.print(
        f"federation {config.federation.name!r}: coordinator and {len(parties) - 1} institutions "
        f"started; logs in {logs}"
    )
    shown: set[int] = set()
    coordinator = processes["coordinator"]
    # A SIGTERM (kill, a CI timeout) must not orphan the parties: exit through ``finally``.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with _rounds_progress(console) as progress:
            bar = progress.add_task(_waiting(config, shown), total=config.federation.rounds)
            steps = StepBars(progress, config)
            while coordinator.poll() is None:
                for entry in _ready_rounds(config, shown, wait=True):
                    progress.console.print(round_table(config, entry))
                    shown.add(entry["round"])
                progress.update(bar, completed=len(shown), description=_waiting(config, shown))
                steps.update(max(shown, default=0) + 1)
                time.sleep(POLL_S)
        deadline = time.monotonic() + EXIT_GRACE_S
        for party, proc in processes.items():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                console.print(
                    f"[red]{party} did not exit {EXIT_GRACE_S:.0f} s after the coordinator; "
                    "stopping it[/red]"
                )
        for entry in _ready_rounds(config, shown, wait=False):
            console.print(round_table(config, entry))
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    console.print(before_after_table(config))
    report_status = _print_report(config, console)
    failed = {p: proc.returncode for p, proc in processes.items() if proc.returncode}
    for party, status in failed.items():
        console.print(
            f"[red]{party} failed (exit status {status}): {_last_words(logs / f'{party}.log')}"
            f"[/red]",
            highlight=False,
        )
    if failed:
        console.print(f"full logs: {logs}")
    return coordinator.returncode or (1 if failed else report_status)


def _print_report(config: FederationConfig, console: Console) -> int:
    """Write the run's privacy report and say where; 1 if it cannot be written."""
    try:
        written = produce_report(config.run_dir, config.keys_dir / ROSTER_FILE)
    except ContextError as exc:
        console.print(f"[red]no privacy report: {exc}[/red]")
        return 1
    signed = any(p.name.endswith(".sig") for p in written)
    console.print(
        f"privacy report: {written[0].parent / 'report.html'} (and .json, .md)"
        + ("; signed by the coordinator (.sig), check: sealmoe audit verify RUN_DIR"
           if signed else "; [yellow]unsigned: no coordinator key here[/yellow]")
    )  # fmt: skip
    return 0


def _rounds_done(config: FederationConfig) -> int:
    """The last round the run's journal records as completed or aborted (0: none)."""
    done = [e["round"] for e in _journal(config) if e["event"] in ("completed", "aborted")]
    return max(done, default=0)


def _rounds_progress(console: Console) -> Progress:
    """A bar of finished rounds under what the federation is doing now (transient)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def step_progress(config: FederationConfig) -> dict[str, dict]:
    """Each institution's local-step progress as it last wrote it (``progress.json``)."""
    out = {}
    for name in config.institution_names:
        line = read_step_progress(config.run_dir / "institutions" / name / PROGRESS_FILE)
        if line is not None:
            out[name] = line
    return out


class StepBars:
    """One bar per institution under the round bar: its local DP-SGD steps in the round now
    running (hidden until it trains for that round). Drawn in place: no line per step."""

    def __init__(self, progress: Progress, config: FederationConfig) -> None:
        self.progress = progress
        self.config = config
        self.tasks = {
            name: progress.add_task(
                f"  {name[:24]}: local steps", total=config.training.local_steps, visible=False
            )
            for name in config.institution_names
        }
        self.rounds: dict[str, int] = {}

    def update(self, current_round: int) -> None:
        """Show each institution's steps for ``current_round``; hide older progress."""
        lines = step_progress(self.config)
        for name, task in self.tasks.items():
            line = lines.get(name)
            if line is None or line["round"] != current_round:
                self.progress.update(task, visible=False)
                continue
            total, done = max(line["steps"], 1), min(line["step"], line["steps"])
            if self.rounds.get(name) != current_round:  # a new round: restart its clock
                self.progress.reset(task, total=total, completed=done, visible=True)
                self.rounds[name] = current_round
            else:
                self.progress.update(task, total=total, completed=done, visible=True)


def _waiting(config: FederationConfig, shown: set[int]) -> str:
    """What the federation is doing now, for the status line."""
    rounds = config.federation.rounds
    if not shown:
        names = config.institution_names
        ready = sum(
            any(m.get("event") == "initial" for m in _metrics_lines(config, n)) for n in names
        )
        return f"round 1: {ready} of {len(names)} institutions loaded and scored the model"
    last = max(shown)
    if last >= rounds:
        return "all rounds done: final evaluation at the institutions"
    return f"round {last + 1} of {rounds}: local DP-SGD, then the secure sum"


def _last_words(log: Path) -> str:
    """The last non-empty line of a party's log: its error, for a party that failed."""
    if not log.exists():
        return "no log"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "empty log")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _ready_rounds(config: FederationConfig, shown: set[int], *, wait: bool) -> list[dict]:
    """Finished rounds not shown yet; with ``wait``, only once every institution of the round
    has written its metrics for it (or ``METRICS_GRACE_S`` passed)."""
    started: dict[int, list[str]] = {}
    out = []
    for entry in _journal(config):
        if entry["event"] == "started":
            started[entry["round"]] = entry["institutions"]
        elif entry["event"] in ("completed", "aborted") and entry["round"] not in shown:
            names = started.get(entry["round"], [])
            reported = all(_round_line(config, n, entry["round"]) for n in names)
            late = time.time() - entry["time"] > METRICS_GRACE_S
            if not wait or reported or late:
                out.append(entry)
    return out


def _json_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a file another process appends to (a torn one is skipped)."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


def _journal(config: FederationConfig) -> list[dict]:
    return _json_lines(config.run_dir / JOURNAL)


def _metrics_lines(config: FederationConfig, name: str) -> list[dict]:
    return _json_lines(config.run_dir / "institutions" / name / METRICS_FILE)


def _round_line(config: FederationConfig, name: str, federation_round: int) -> dict | None:
    return next(
        (m for m in reversed(_metrics_lines(config, name))
         if m.get("event") == "round" and m.get("round") == federation_round),
        None,
    )  # fmt: skip


def round_table(config: FederationConfig, entry: dict) -> Table:
    """One round, fitting 80 columns: per institution whether its update is in the sum, its
    training loss, validation perplexity, epsilon so far, megabytes sent, and seconds in
    training, cryptography and the network."""
    r = entry["round"]
    status = "completed" if entry["event"] == "completed" else f"ABORTED: {entry['reason']}"
    table = Table(title=f"round {r} of {config.federation.rounds}: {status}", box=box.SIMPLE_HEAD)
    table.add_column("institution", no_wrap=True)
    for column in ("in sum", "train\nloss", "val\nppl", "ε\nspent", "MB\nsent", "train\ns",
                   "crypto\ns", "net\ns"):  # fmt: skip
        table.add_column(column, justify="right")
    for name in config.institution_names:
        line = _round_line(config, name, r)
        if line is None:
            table.add_row(name, "—", *["" for _ in range(7)])
            continue
        train, val = line.get("train") or {}, line.get("validation") or {}
        table.add_row(
            name,
            "declined" if line.get("declined") else ("yes" if line.get("included") else "no"),
            _num(train.get("loss")), _num(val.get("perplexity")), _num(line.get("epsilon_spent")),
            f"{line.get('bytes_sent', 0) / 1e6:.1f}", _num(line.get("seconds_training")),
            _num(line.get("seconds_crypto")), _num(line.get("seconds_network")),
        )  # fmt: skip
    return table


def before_after_table(config: FederationConfig) -> Table:
    """Test perplexity of each institution before the first round and after the last."""
    table = Table(title="test perplexity per institution", box=box.SIMPLE_HEAD)
    for column in ("institution", "before", "after", "ε spent", "ε budget"):
        table.add_column(column, justify="right" if column != "institution" else "left")
    for name in config.institution_names:
        tests = [m for m in _metrics_lines(config, name) if m.get("test")]
        before = tests[0]["test"]["perplexity"] if tests else None
        after = tests[-1]["test"]["perplexity"] if len(tests) > 1 else None
        spent = tests[-1].get("epsilon_spent") if tests else None
        budget = config.budget(name).target_epsilon
        table.add_row(name, _num(before), _num(after), _num(spent), _num(budget))
    return table


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
