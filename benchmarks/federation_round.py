"""Round time of a whole federation on this machine, split into training, crypto and network.

Runs ``sealmoe run`` on each given config (in a scratch copy: own port, run and key folders),
then reads what the parties recorded: the coordinator's journal (wall time of each round) and
each institution's local metrics (its seconds in local training, in cryptography — masking,
key agreement, Shamir, CKKS — and waiting on the network, and its bytes sent per round).

    python benchmarks/federation_round.py examples/tiny.toml examples/shakespeare.toml
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.contract.config import load_config  # noqa: E402
from clients.runtime.institution import METRICS_FILE  # noqa: E402
from coordinator.store import JOURNAL  # noqa: E402


def scratch_copy(config_path: Path, scratch: Path) -> Path:
    """The config with a free port and its run and key folders inside ``scratch``."""
    config = load_config(config_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = config_path.read_text()
    text = text.replace(config.coordinator.bind, f"tcp://127.0.0.1:{port}")
    text = text.replace(f'"{config.federation.run_dir}"', f'"{scratch / "run"}"')
    text = text.replace(f'"{config.coordinator.keys_dir}"', f'"{scratch / "keys"}"')
    path = scratch / config_path.name
    path.write_text(text)
    return path


def measure(config_path: Path, console: Console) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = scratch_copy(config_path, Path(tmp))
        config = load_config(path)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "coordinator.app.cli", "run", str(path)],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - start
        if done.returncode != 0:
            console.print(done.stdout[-3000:], done.stderr[-3000:])
            raise SystemExit(f"sealmoe run {config_path} failed ({done.returncode})")
        journal = [json.loads(x) for x in (config.run_dir / JOURNAL).read_text().splitlines()]
        metrics = {
            name: [
                json.loads(x)
                for x in (config.run_dir / "institutions" / name / METRICS_FILE)
                .read_text()
                .splitlines()
            ]
            for name in config.institution_names
        }
    rounds = []
    for entry in (e for e in journal if e["event"] == "completed"):
        lines = [
            m
            for per in metrics.values()
            for m in per
            if m.get("event") == "round" and m.get("round") == entry["round"] and m["included"]
        ]
        rounds.append(
            {
                "round": entry["round"],
                "coordinator_round_s": entry["seconds"]["round"],
                "institutions": len(lines),
                "train_s": mean(m["seconds_training"] for m in lines),
                "crypto_s": mean(m["seconds_crypto"] for m in lines),
                "network_s": mean(m["seconds_network"] for m in lines),
                "bytes_sent": mean(m["bytes_sent"] for m in lines),
            }
        )
    return {"config": str(config_path), "model": config.model.name, "wall_s": wall,
            "rounds": rounds}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "configs",
        nargs="*",
        type=Path,
        default=[ROOT / "examples/tiny.toml", ROOT / "examples/shakespeare.toml"],
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args(argv)  # fmt: skip
    console = Console(width=120)
    results = [measure(path.resolve(), console) for path in args.configs]
    table = Table(title="federation rounds: mean per institution (seconds)")
    for column in ("config", "round", "coordinator round", "train", "crypto", "network",
                   "bytes sent", "whole run"):  # fmt: skip
        table.add_column(column, justify="left" if column == "config" else "right")
    for res in results:
        for r in res["rounds"]:
            table.add_row(
                Path(res["config"]).name, str(r["round"]), f"{r['coordinator_round_s']:.1f}",
                f"{r['train_s']:.1f}", f"{r['crypto_s']:.2f}", f"{r['network_s']:.1f}",
                f"{r['bytes_sent']:,.0f}", f"{res['wall_s']:.0f}",
            )  # fmt: skip
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"machine": platform.machine(), "processor": platform.processor(),
               "python": platform.python_version()}  # fmt: skip
    out = args.out / "federation_round.json"
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
