"""`make run` as a user runs it: wall time (model loads included) and test perplexity before
and after, per institution, with the privacy each one spent.

    .venv/bin/python benchmarks/make_run.py [--config examples/shakespeare.toml]

Runs ``sealmoe run --fresh CONFIG`` in a subprocess, then reads each institution's local metrics
(the first and last test evaluation) and ledger total. Writes ``results/make_run.{json,md}``
with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.contract.config import load_config  # noqa: E402
from clients.runtime.institution import METRICS_FILE  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def institution_rows(config_path: Path) -> list[dict]:
    """Per institution: test perplexity before the first round and after the last, the drop,
    and epsilon spent (under the enforcing accountant) as its own metrics record them."""
    config = load_config(config_path)
    rows = []
    for name in config.institution_names:
        path = config.run_dir / "institutions" / name / METRICS_FILE
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        tests = [m for m in lines if m.get("test")]
        before, after = tests[0]["test"]["perplexity"], tests[-1]["test"]["perplexity"]
        rows.append(
            {
                "institution": name,
                "test_perplexity_before": before,
                "test_perplexity_after": after,
                "drop_percent": 100 * (1 - after / before),
                "epsilon_spent": tests[-1]["epsilon_spent"],
                "epsilon_budget": config.budget(name).target_epsilon,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "shakespeare.toml")
    parser.add_argument("--out", type=Path, default=RESULTS / "make_run")
    args = parser.parse_args()
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "coordinator.app.cli", "run", "--fresh", str(args.config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - start
    if run.returncode != 0:
        sys.exit(f"sealmoe run failed ({run.returncode}):\n{run.stdout[-3000:]}{run.stderr}")
    rows = institution_rows(args.config)
    result = {
        "benchmark": "make_run",
        "config": str(args.config.relative_to(ROOT)),
        "wall_seconds": wall,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "institutions": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"`sealmoe run --fresh {result['config']}`: {wall / 60:.1f} min wall time on "
        f"{os.cpu_count()} CPUs ({platform.platform()}).",
        "",
        "| institution | test ppl before | after | drop | ε spent (budget) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['institution']} | {r['test_perplexity_before']:.1f} | "
            f"{r['test_perplexity_after']:.1f} | {r['drop_percent']:.1f} % | "
            f"{r['epsilon_spent']:.2f} ({r['epsilon_budget']:g}) |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
