"""``sealmoe run``, the README's main command, as a user runs it: one process per party."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from clients.contract.config import load_config
from clients.runtime.institution import METRICS_FILE
from coordinator.app.launcher import _last_words, _waiting, round_table
from tests.test_federation import NAMES, ROOT, write_config


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
