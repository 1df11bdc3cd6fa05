"""The in-process federation: every strategy runs end to end with real DP-SGD, SecAgg+ and CKKS,
spends the planned budget, and a newly registered strategy plugs in by name."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from clients.config import parse_config
from clients.moe_lora import adapter_state
from clients.setup import CLIENT_STRATEGIES, build_model, fedavg_config
from clients.strategy import FedAvgClient
from coordinator.registry import COORDINATOR_STRATEGIES
from coordinator.simulation import simulate, strategy_names
from coordinator.strategy import FedAvgCoordinator

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"


@pytest.fixture(scope="module")
def config():
    raw = tomllib.loads(TINY.read_text())
    raw["training"]["local_steps"] = 2
    raw["data"]["max_blocks"] = {"train": 32, "validation": 4, "test": 4}
    raw["aggregation"]["fedmoe"] = {"warmup_rounds": 1, "memory_fraction": 0.5}
    return parse_config(raw, "/x/fed.toml")


@pytest.mark.parametrize("strategy", ["local", "fedalign", "fedmoe"])
def test_strategy_runs_end_to_end_and_spends_the_planned_budget(config, strategy):
    result = simulate(config, strategy)
    names = config.institution_names
    assert set(result.final) == set(names) == set(result.epsilon)
    for name in names:
        target = config.budget(name).target_epsilon
        assert target * 0.98 <= result.epsilon[name] <= target * 1.001
        assert result.final[name].tokens == result.initial[name].tokens > 0
    start = adapter_state(build_model(config)[0])  # the seeded initial adapters
    moved = any(not torch.equal(result.state.adapters[n], start[n]) for n in start)
    assert moved == (strategy != "local")
    assert all(r.applied for r in result.rounds) == (strategy != "local")


def test_a_registered_strategy_plugs_in_by_name(config, monkeypatch):
    monkeypatch.setitem(
        CLIENT_STRATEGIES, "fedavg-copy", lambda c, n: FedAvgClient(fedavg_config(c))
    )
    monkeypatch.setitem(
        COORDINATOR_STRATEGIES, "fedavg-copy", lambda c: FedAvgCoordinator(fedavg_config(c))
    )
    assert "fedavg-copy" in strategy_names()
    result = simulate(copy.deepcopy(config), "fedavg-copy", private=False)
    assert result.strategy == "fedavg-copy" and set(result.epsilon.values()) == {None}
    with pytest.raises(KeyError, match="unknown strategy"):
        simulate(config, "fedprox")
