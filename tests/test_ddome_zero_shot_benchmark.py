"""The strategies benchmark's DDOME zero-shot evaluation runs: an institution that never
trained picks valid experts from the trained gate and gets a finite loss."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

from clients.contract.config import parse_config

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny.toml"


def load_benchmark():
    """benchmarks/strategies.py as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "strategies", ROOT / "benchmarks" / "strategies.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("strategies", module)
    spec.loader.exec_module(module)
    return module


def test_zero_shot_selection_of_an_institution_that_never_trained_is_evaluated():
    bench = load_benchmark()
    raw = tomllib.loads(TINY.read_text())
    raw["training"]["local_steps"] = 2
    raw["data"]["max_blocks"] = {"train": 16, "validation": 4, "test": 4}
    raw["aggregation"]["ddome"] = {"anchors": 1, "gate_hidden": 8}
    # two trainers, min_count 2: with top_k = num_experts every expert has both and moves
    raw["model"]["moe"]["num_experts"] = raw["model"]["moe"]["top_k"]
    held_out = raw["institutions"][-1]["name"]
    unseen = parse_config(raw, "/x/fed.toml")
    raw["institutions"] = raw["institutions"][:-1]
    raw["secagg"]["threshold"] = 2  # both trainers: the bound for 2 share holders
    trained_by = parse_config(raw, "/x/fed.toml")
    row = bench.zero_shot_ddome(trained_by, unseen, held_out, private=True)
    assert row["held_out"] == held_out and held_out not in trained_by.institution_names
    experts, k = trained_by.model.moe.num_experts, trained_by.model.moe.top_k
    for label in ("initial", "trained"):
        chosen = row[label]["experts"]
        assert len(set(chosen)) == k and all(0 <= e < experts for e in chosen)
        assert math.isfinite(row[label]["loss"])
        assert row[label]["perplexity"] == math.exp(row[label]["loss"])
    assert row["trained"]["loss"] != row["initial"]["loss"]  # the trained state was evaluated
    table = bench.zero_shot_markdown([{**row, "seed": 0}])
    assert held_out in table and f"{row['trained']['perplexity']:.2f}" in table
