"""The in-process federation: every strategy runs end to end with real DP-SGD, SecAgg+ and CKKS,
charges every release (DP-SGD, routing statistics, FedAMoLE's scores and keys), composes epsilon
over exactly those charges within the budget, and a newly registered strategy plugs in by name."""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch

import coordinator.simulation
from clients.contract.config import parse_config
from clients.models.build import build_model
from clients.models.build import build_model_with
from clients.models.ddome_lora import attach_ddome
from clients.models.ddome_lora import ddome_state
from clients.models.fedamole_lora import amole_state
from clients.models.fedamole_lora import attach_amole
from clients.models.moe_lora import adapter_state
from clients.strategies.ddome import EXPERT_COUNTS
from clients.strategies.ddome import ddome_config
from clients.strategies.fedamole import KEY_COUNTS
from clients.strategies.fedamole import fedamole_config
from clients.strategies.fedavg import FedAvgClient
from clients.strategies.fedavg import fedavg_config
from clients.strategies.fedavg import moe_lora_half
from clients.strategies.registry import CLIENT_HALVES
from coordinator.simulation import simulate
from coordinator.simulation import strategy_names
from coordinator.strategies.base import ServerHalf
from coordinator.strategies.fedavg import FedAvgCoordinator
from coordinator.strategies.registry import SERVER_HALVES
from privacy import BudgetExceeded
from privacy import Release
from privacy import epsilon as composed_epsilon

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
    raw["aggregation"]["fedamole"] = {"affinity_blocks": 4}
    raw["aggregation"]["ddome"] = {"anchors": 1, "gate_hidden": 8}
    return parse_config(raw, "/x/fed.toml")


def whats(result, name: str) -> list[str]:
    return [what for what, _ in result.charged[name]]


def events(result, name: str) -> list[dp_accounting.DpEvent]:
    return [event for _, event in result.charged[name]]


def check_epsilon_composes_the_charges(config, result, unspent) -> None:
    """Reported epsilon = composition of the charged events, within the budget; with the
    planned but unspent releases ``unspent(name)`` (spare rounds) it reaches the budget."""
    for name in config.institution_names:
        budget = config.budget(name)
        charged = events(result, name)
        assert result.epsilon[name] == pytest.approx(
            composed_epsilon(charged, budget.target_delta, config.privacy.accountant)
        )
        assert result.epsilon[name] <= budget.target_epsilon
        planned = composed_epsilon(
            [*charged, *unspent(name)], budget.target_delta, config.privacy.accountant
        )
        assert budget.target_epsilon * 0.98 <= planned <= budget.target_epsilon * 1.001


@pytest.mark.parametrize("strategy", ["local", "fedalign", "fedmoe"])
def test_strategy_runs_end_to_end_and_spends_the_planned_budget(config, strategy):
    result = simulate(config, strategy)
    names = config.institution_names
    assert set(result.final) == set(names) == set(result.epsilon)
    rounds, spare = config.federation.rounds, config.privacy.spare_rounds
    # every round's routing statistics (and FedMoE's validation signal) beside its update
    per_round = ("adapter-update", "routing-statistics")
    per_round += ("validation-signal",) if strategy == "fedmoe" else ()
    for name in names:
        kinds = whats(result, name)
        if strategy == "local":  # nothing leaves but the (DP) adapters
            assert kinds == [f"adapter-update, round {r}" for r in range(rounds)]
        else:
            assert kinds == [f"{what}, round {r}" for r in range(rounds) for what in per_round]
        assert result.final[name].tokens == result.initial[name].tokens > 0
    spares = 0 if strategy == "local" else spare
    check_epsilon_composes_the_charges(
        config, result, lambda name: events(result, name)[-len(per_round) :] * spares
    )
    start = adapter_state(build_model(config)[0])  # the seeded initial adapters
    moved = any(not torch.equal(result.state.adapters[n], start[n]) for n in start)
    assert moved == (strategy != "local")
    assert all(r.applied for r in result.rounds) == (strategy != "local")


def test_a_registered_strategy_plugs_in_by_name(config, monkeypatch):
    monkeypatch.setitem(
        CLIENT_HALVES, "fedavg-copy", moe_lora_half(lambda c, name: FedAvgClient(fedavg_config(c)))
    )
    monkeypatch.setitem(
        SERVER_HALVES,
        "fedavg-copy",
        ServerHalf(lambda c: FedAvgCoordinator(fedavg_config(c)), SERVER_HALVES["fedavg"].facts),
    )
    assert "fedavg-copy" in strategy_names()
    result = simulate(copy.deepcopy(config), "fedavg-copy", private=False)
    assert result.strategy == "fedavg-copy" and set(result.epsilon.values()) == {None}
    with pytest.raises(KeyError, match="unknown strategy"):
        simulate(config, "fedprox")


def test_fedamole_charges_its_scores_keys_and_updates_within_the_budget(config):
    result = simulate(config, "fedamole")
    for name in config.institution_names:
        kinds = whats(result, name)
        assert len(kinds) == 5  # round 0: update, keys; round 1: scores, update, keys
        assert kinds[2] == "affinity-scores, round 1"  # charged before anything else of round 1
        assert sum("expert-keys" in k for k in kinds) == 2
        assert sum("adapter-update" in k for k in kinds) == 2
    # planned: scores and keys in every round, and a spare round of everything
    score = events(result, config.institution_names[0])[2]
    check_epsilon_composes_the_charges(
        config, result, lambda name: [score, *events(result, name)[2:]]
    )
    model, _ = build_model_with(config, lambda m: attach_amole(m, fedamole_config(config).adapter))
    start = amole_state(model)
    assert any(not torch.equal(result.state.adapters[n], start[n]) for n in start)
    assert len(result.rounds) == 2 and all(r.applied for r in result.rounds)
    assert np.all(result.state.extras[KEY_COUNTS] >= 1)


CHOICE_THEN_UPDATE = ("expert-choice", "adapter-update")
"""A DDOME round's releases: the noised expert choice first, then the DP-SGD update."""


def test_ddome_charges_every_update_within_the_budget_and_trains_experts(config):
    result = simulate(config, "ddome")
    for name in config.institution_names:
        expected = [f"{what}, round {i}" for i in range(2) for what in CHOICE_THEN_UPDATE]
        assert whats(result, name) == expected
    check_epsilon_composes_the_charges(config, result, lambda name: events(result, name)[-2:])
    model, _ = build_model_with(config, lambda m: attach_ddome(m, ddome_config(config).adapter))
    start = ddome_state(model)
    moved = [n for n in start if not torch.equal(result.state.adapters[n], start[n])]
    assert any(n.startswith("ddome_gate") for n in moved) and any("experts_" in n for n in moved)
    # every institution trained top_k experts; the anchor (institution 0) its expert 0
    counts = result.state.extras[EXPERT_COUNTS]
    assert counts.sum() == 2 * len(config.institution_names)
    assert counts[0] >= 1


@pytest.mark.parametrize("strategy", ["fedamole", "ddome"])
def test_without_dp_nothing_is_charged(config, strategy):
    result = simulate(config, strategy, private=False)
    assert set(result.epsilon.values()) == {None}
    assert all(not charged for charged in result.charged.values())
    assert all(r.applied for r in result.rounds)


def test_a_test_curve_has_one_point_per_round_and_ends_at_the_final_metrics(config):
    result = simulate(config, "fedavg", private=False, test_every_round=True)
    names = config.institution_names
    assert [sorted(r.test) for r in result.rounds] == [sorted(names)] * len(result.rounds)
    assert all(result.rounds[-1].test[n] == result.final[n] for n in names)
    first = [result.rounds[0].test[n].loss for n in names]
    assert first != [result.initial[n].loss for n in names]  # the curve moves with training
    for n in names:  # per-record losses for paired comparisons
        final = result.final[n]
        assert sum(final.record_tokens) == final.tokens > 0
        assert sum(final.record_loss) == pytest.approx(final.loss * final.tokens)


class Overspending:
    """A learner whose round also makes a release it never planned, far beyond any budget."""

    def __init__(self, learner) -> None:
        self._learner = learner

    def __getattr__(self, name):
        return getattr(self._learner, name)

    def train(self, *args, **kwargs):
        local = self._learner.train(*args, **kwargs)
        extra = dataclasses.replace(local.releases[-1], event=dp_accounting.GaussianDpEvent(0.01))
        return dataclasses.replace(local, releases=[*local.releases, extra])


def test_a_release_beyond_the_budget_is_refused_before_it_is_used(config, monkeypatch):
    half = CLIENT_HALVES["fedavg"]
    overspending = dataclasses.replace(half, learner=lambda c, n: Overspending(half.learner(c, n)))
    used = []
    aggregate = coordinator.simulation.aggregate_locally
    monkeypatch.setattr(
        coordinator.simulation,
        "aggregate_locally",
        lambda *a, **k: used.append(1) or aggregate(*a, **k),
    )
    with pytest.raises(BudgetExceeded):
        simulate(config, "fedavg", client_half=overspending)
    assert not used  # the refused round's submissions never reached the secure sum


def test_a_refused_charge_records_nothing(config):
    federation = coordinator.simulation.Federation(config, "local", private=True)
    name = config.institution_names[0]
    small, too_much = (
        Release(0, 0, "routing-statistics", dp_accounting.GaussianDpEvent(s)) for s in (50.0, 0.2)
    )
    federation.charge(name, [small])
    with pytest.raises(BudgetExceeded):
        federation.charge(name, [too_much])
    assert federation.charged[name] == [("routing-statistics, round 0", small.event)]
    assert 0 < federation.budgets[name].spent() < config.budget(name).target_epsilon
