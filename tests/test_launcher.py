"""``sealmoe run``, the README's main command, as a user runs it: one process per party."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from clients.contract.config import load_config
from clients.runtime.institution import METRICS_FILE
from clients.runtime.institution import PROGRESS_FILE
from clients.runtime.progress import StepProgressFile
from clients.runtime.progress import read_step_progress
from coordinator.app.launcher import StepBars
from coordinator.app.launcher import _last_words
from coordinator.app.launcher import _rounds_progress
from coordinator.app.launcher import _waiting
from coordinator.app.launcher import round_table
from coordinator.app.launcher import step_progress
from tests.test_federation import NAMES
from tests.test_federation import ROOT
from tests.test_federation import write_config


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _sealmoe(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator.app.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_run_prints_every_round_and_writes_a_verified_report(tmp_path):
    path = write_config(tmp_path, rounds=2, stage_timeout_s=60.0)
    config = load_config(path)
    proc = _sealmoe("run", "--fresh", str(path))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert "round 1 of 2" in output and "round 2 of 2" in output
    assert "ABORTED" not in output
    assert "failed to converge" not in output  # accountant chatter stays out of the console
    assert all(name in output for name in NAMES)
    assert "privacy report:" in output
    report = config.run_dir / "report.json"
    for suffix in ("html", "json", "md"):
        assert (config.run_dir / f"report.{suffix}").stat().st_size > 0
    ledgers = [str(config.run_dir / "institutions" / n / "ledger.jsonl") for n in NAMES]
    verify = _sealmoe("audit", "verify", "--config", str(path), *ledgers)
    verified, _ = verify.communicate(timeout=120)
    assert verify.returncode == 0, verified
    institutions = json.loads(report.read_text())["institutions"]
    assert sorted(i["name"] for i in institutions) == sorted(NAMES)
    for inst in institutions:  # the report checked each ledger against the coordinator's head
        assert inst["verification"]["status"] == "verified"
        assert [r["round"] for r in inst["rounds"]] == [1, 2]
        assert 0 < inst["spent"]["pld"] <= inst["budget"]["epsilon"] + 1e-9
    for name in NAMES:  # each institution told the launcher its local steps, round by round
        line = read_step_progress(config.run_dir / "institutions" / name / PROGRESS_FILE)
        assert (line["round"], line["step"]) == (2, config.training.local_steps)
    report_check = _sealmoe("audit", "verify", str(config.run_dir))  # ledgers and signature
    checked, _ = report_check.communicate(timeout=120)
    assert report_check.returncode == 0 and "signed by the roster's coordinator key" in checked

    # Running it again without --fresh starts no party: it shows the finished run's results.
    coordinator_log = config.run_dir / "logs" / "coordinator.log"
    logged = coordinator_log.stat().st_size
    again = _sealmoe("run", str(path))
    output, _ = again.communicate(timeout=120)
    assert again.returncode == 0, output[-3000:]
    assert "already finished its 2 rounds" in output and "round 2 of 2: completed" in output
    assert "privacy report:" in output
    assert coordinator_log.stat().st_size == logged


def test_sigterm_stops_every_party(tmp_path):
    path = write_config(tmp_path, rounds=2, stage_timeout_s=60.0)
    proc = _sealmoe("run", "--fresh", str(path))
    deadline = time.monotonic() + 120
    while len(_children(proc.pid)) < 1 + len(NAMES):
        assert time.monotonic() < deadline, "the parties did not start"
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    parties = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in parties):
        assert time.monotonic() < deadline, "a party outlived sealmoe run"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _console() -> Console:
    return Console(width=80, record=True, force_terminal=False)


def test_the_round_table_fits_80_columns_with_whole_names(tmp_path):
    config = load_config(write_config(tmp_path, rounds=2))
    line = {"event": "round", "round": 2, "included": True, "train": {"loss": 4.123},
            "validation": {"loss": 4.6, "perplexity": 102.3}, "epsilon_spent": 5.43,
            "bytes_sent": 25_165_824, "seconds_training": 123.4, "seconds_crypto": 12.3,
            "seconds_network": 3.2}  # fmt: skip
    metrics = config.run_dir / "institutions" / NAMES[0] / METRICS_FILE
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps(line) + "\n")
    console = _console()
    console.print(round_table(config, {"round": 2, "event": "completed"}))
    text = console.export_text()
    assert max(len(row) for row in text.splitlines()) <= 80
    assert all(name in text for name in NAMES)
    assert "102" in text and "25.2" in text  # perplexity, megabytes


def test_the_status_line_says_why_it_waits_and_never_passes_the_last_round(tmp_path):
    config = load_config(write_config(tmp_path, rounds=2))
    assert "0 of 3 institutions loaded and scored the model" in _waiting(config, set())
    assert _waiting(config, {1}).startswith("round 2 of 2")
    assert "final evaluation" in _waiting(config, {1, 2})


def test_a_failed_party_is_shown_with_the_last_line_of_its_log(tmp_path):
    log = tmp_path / "comedies.log"
    log.write_text("Traceback (most recent call last):\n  File x\nValueError: bad shard\n\n")
    assert _last_words(log) == "ValueError: bad shard"
    assert _last_words(tmp_path / "none.log") == "no log"


# ------------------------------------------------------------------ local-step progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_institution_writes_step_progress_throttled(tmp_path):
    clock = FakeClock()
    path = tmp_path / PROGRESS_FILE
    writer = StepProgressFile(path, interval_s=1.0, clock=clock)
    writer.round = 2
    writer(0, 10)  # the first step is always written
    assert read_step_progress(path)["step"] == 0
    clock.now = 0.5
    writer(1, 10)  # within the interval: not written (no file write per step)
    assert read_step_progress(path)["step"] == 0
    clock.now = 1.2
    writer(2, 10)
    line = read_step_progress(path)
    assert (line["round"], line["step"], line["steps"]) == (2, 2, 10)
    clock.now = 1.3
    writer(10, 10)  # the last step is always written
    assert read_step_progress(path)["step"] == 10
    path.write_text("{torn")
    assert read_step_progress(path) is None
    assert read_step_progress(tmp_path / "missing.json") is None


def test_the_launcher_draws_the_steps_of_the_current_round_only(tmp_path):
    config = load_config(write_config(tmp_path, rounds=3))
    for name, round_, step in ((NAMES[0], 2, 1), (NAMES[1], 1, 3)):  # NAMES[2]: nothing yet
        writer = StepProgressFile(config.run_dir / "institutions" / name / PROGRESS_FILE)
        writer.round = round_
        writer(step, 3)
    assert set(step_progress(config)) == {NAMES[0], NAMES[1]}
    progress = _rounds_progress(Console(width=80, file=io.StringIO(), force_terminal=True))
    bars = StepBars(progress, config)
    bars.update(2)
    tasks = {t.id: t for t in progress.tasks}
    shown = {name: tasks[bars.tasks[name]] for name in NAMES}
    assert shown[NAMES[0]].visible and (shown[NAMES[0]].completed, shown[NAMES[0]].total) == (1, 3)
    assert not shown[NAMES[1]].visible  # its progress is of the round before
    assert not shown[NAMES[2]].visible
    with progress:  # drawn in place at 80 columns: one line per bar, none wider
        progress.refresh()
    lines = [line for line in progress.console.file.getvalue().splitlines() if line.strip()]
    assert lines and all(len(_plain(line)) <= 80 for line in lines)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
