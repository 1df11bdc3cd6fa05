"""The strategies benchmark's zero-shot evaluation runs: an institution that never trained
picks valid experts from DDOME's trained gate, and is scored with the base and with FedAvg's
global adapters."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

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
    ddome = bench.simulate(trained_by, "ddome", private=True)
    fedavg = bench.simulate(trained_by, "fedavg", private=True)
    assert held_out not in trained_by.institution_names
    row = {
        "held_out": held_out,
        **bench.zero_shot_ddome(ddome, unseen, held_out),
        **bench.global_on_unseen(fedavg, unseen, held_out),
    }
    experts, k = trained_by.model.moe.num_experts, trained_by.model.moe.top_k
    for label in ("ddome_initial", "ddome_trained"):
        chosen = row[label]["experts"]
        assert len(set(chosen)) == k and all(0 <= e < experts for e in chosen)
        assert math.isfinite(row[label]["loss"])
    assert row["ddome_trained"]["loss"] != row["ddome_initial"]["loss"]  # trained state used
    assert row["fedavg"]["loss"] != row["base"]["loss"]  # FedAvg's global adapters were loaded
    table = bench.zero_shot_markdown([{**row, "seed": 0, "epsilon": 8.0}])
    assert held_out in table and f"{row['ddome_trained']['loss']:.3f}" in table


def synthetic_records(bench, shift: float, seed: int) -> dict:
    """Per institution 200 records of 10 targets with losses around 2, lowered by ``shift``."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in bench.TRAINING_INSTITUTIONS:
        loss = rng.uniform(1.0, 3.0, 200) * 10
        out[name] = {"loss": list(loss - 10 * shift), "tokens": [10] * 200}
    return out


def runs_and_records(bench, shift: float) -> tuple[list, dict]:
    runs, records = [], {}
    for seed in (0, 1):
        base = synthetic_records(bench, 0.0, seed)
        records[f"fedavg|8|{seed}"] = base
        records[f"fedmoe|8|{seed}"] = {
            n: {"loss": [x - 10 * shift for x in r["loss"]], "tokens": r["tokens"]}
            for n, r in base.items()
        }
        runs += [{"strategy": s, "epsilon": 8.0, "seed": seed} for s in ("fedavg", "fedmoe")]
    return runs, records


def test_paired_bootstrap_finds_a_shift_and_no_difference_where_there_is_none():
    bench = load_benchmark()
    rng = np.random.default_rng(1)
    runs, records = runs_and_records(bench, 0.05)
    better = bench.paired_difference(records, runs, "fedmoe", 8.0, rng)
    assert better["seeds"] == [0, 1]
    assert better["mean_difference"] == pytest.approx(-0.05)
    assert better["worst_difference"] == pytest.approx(-0.05)
    lo, hi = better["mean_interval"]
    assert lo <= -0.05 <= hi and hi < 0
    runs, records = runs_and_records(bench, 0.0)
    same = bench.paired_difference(records, runs, "fedmoe", 8.0, rng)
    assert same["mean_difference"] == 0 and same["mean_interval"] == [0.0, 0.0]
    assert bench.paired_difference(records, runs, "ddome", 8.0, rng) == {}  # never ran


def test_saved_results_read_back_with_their_epsilons():
    """--redraw rebuilds the tables from the JSON file: ε = ∞ and the n-gram rows' missing ε
    must come back as the floats the tables sort and label by."""
    bench = load_benchmark()
    document = {
        "runs": [{"epsilon": math.inf, "loss": 1.5}, {"epsilon": 8.0, "loss": 2.0}],
        "rows": [{"epsilon": math.nan, "model": "bigram"}],
        "settings": {"seeds": [0, 1]},
    }
    back = bench._loose(json.loads(json.dumps(bench._strict(document), allow_nan=False)))
    assert back["runs"] == document["runs"]
    assert math.isnan(back["rows"][0]["epsilon"]) and back["rows"][0]["model"] == "bigram"
    assert back["settings"] == {"seeds": [0, 1]}
