"""FedMoE: the sub-MoE search, modular aggregation through real SecAgg+ equal to the plaintext
per-holder means, the minimum holder count, and what the coordinator can tell about holdings."""

from __future__ import annotations

import dp_accounting
import msgspec
import numpy as np
import pytest
import torch

from clients.contract.config import FedMoESection
from clients.contract.layout import CHANNEL_BOUND
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.models.loaders import tiny_dense_model
from clients.models.moe_lora import MoELoRAConfig
from clients.models.moe_lora import adapter_state
from clients.models.moe_lora import attach
from clients.models.moe_lora import routing_statistics
from clients.strategies.experts import ExpertPartition
from clients.strategies.fedmoe import FedMoEClient
from clients.strategies.fedmoe import FedMoEConfig
from clients.strategies.fedmoe import clipped_mean_loss
from clients.strategies.fedmoe import expert_sizes
from clients.strategies.fedmoe import fedmoe_client
from clients.strategies.fedmoe import search_sub_moe
from clients.strategies.fedmoe import smallest_cover
from clients.strategies.fedmoe import sub_moe_memory
from clients.strategies.fedmoe import validation_mechanism
from clients.training.trainer import LocalTrainingResult
from clients.training.trainer import train_local
from coordinator.strategies.base import aggregate_locally
from coordinator.strategies.fedmoe import FedMoECoordinator
from privacy import DPConfig
from secagg import FixedPointCodec
from tests.expert_fixtures import BITS
from tests.expert_fixtures import BOUND
from tests.expert_fixtures import EXPERTS
from tests.expert_fixtures import LAYERS
from tests.expert_fixtures import expert_entries
from tests.expert_fixtures import layer_of
from tests.expert_fixtures import make_result
from tests.expert_fixtures import make_routing
from tests.expert_fixtures import make_state
from tests.expert_fixtures import synthetic_config


def test_search_finds_the_largest_coverage_within_budget():
    rng = np.random.default_rng(0)
    sizes = np.array([10.0, 30.0, 20.0])
    for _ in range(10):
        pattern = rng.dirichlet(np.full(6, 0.5), size=3)
        budget = float(rng.uniform(0.3, 0.9) * sizes.sum() * 6)
        held, theta = search_sub_moe(pattern, sizes, budget, minimum=2, steps=40)
        memory = float((held.sum(1) * sizes).sum())
        assert np.all(held.sum(1) >= 2)
        # Brute force over a fine grid of coverages: the best feasible cover.
        feasible = [
            t
            for t in np.linspace(0, 1, 1001)
            if (smallest_cover(pattern, t, 2).sum(1) * sizes).sum() <= budget
        ]
        if not feasible:  # even the minimum exceeds the budget: the minimum is returned
            assert theta == 0.0 and np.all(held.sum(1) == 2)
            continue
        assert memory <= budget
        assert theta >= max(feasible) - 1e-3
        best = smallest_cover(pattern, max(feasible), 2)
        np.testing.assert_array_equal(held, best)
        covered = (pattern * held).sum(1) / pattern.sum(1)
        assert np.all(covered >= theta - 1e-9)


def test_cover_takes_the_most_used_experts_first():
    pattern = np.array([[0.1, 0.6, 0.05, 0.25]])
    np.testing.assert_array_equal(smallest_cover(pattern, 0.8, 1), [[False, True, False, True]])
    np.testing.assert_array_equal(smallest_cover(pattern, 0.5, 1), [[False, True, False, False]])
    np.testing.assert_array_equal(smallest_cover(pattern, 0.5, 3), [[True, True, False, True]])


def clients_with_patterns(config, state, rng, patterns):
    """FedMoE clients after one warm-up round whose own routing follows ``patterns``."""
    clients = []
    for probs in patterns:
        client = FedMoEClient(config)
        sub = client.submit(state, make_result(rng, BOUND, probs), 0.5)
        assert sub.values["expert_count"].all()  # warm-up: everyone holds everything
        clients.append(client)
    return clients


def test_modular_aggregation_through_secagg_equals_the_plaintext_per_holder_means():
    rng = np.random.default_rng(3)
    config = synthetic_config(
        FedMoEConfig,
        FedMoESection(
            memory_fraction=0.7,  # 2 of 3 experts per layer
            warmup_rounds=1,
            recommend_weight=0.0,
            min_count=2,
        ),
    )
    state0 = make_state(rng)
    patterns = [(0.5, 0.4, 0.1), (0.45, 0.45, 0.1), (0.4, 0.5, 0.1), (0.1, 0.4, 0.5)]
    clients = clients_with_patterns(config, state0, rng, patterns)
    state = GlobalState(state0.adapters, make_routing(rng, (0.4, 0.4, 0.2)))
    held = [c.select(state) for c in clients]
    for h in held[:3]:
        np.testing.assert_array_equal(h, np.tile([True, True, False], (len(LAYERS), 1)))
    np.testing.assert_array_equal(held[3], np.tile([False, True, True], (len(LAYERS), 1)))
    weights = [0.3, 1.0, 0.6, 0.8]  # public, declared in the config
    results = [make_result(rng, BOUND) for _ in clients]
    subs = [c.submit(state, r, w) for c, r, w in zip(clients, results, weights)]

    coordinator = FedMoECoordinator(config)
    layout = coordinator.layout(state)
    agg = aggregate_locally(layout, [layout.pack(s.values) for s in subs], threshold=3, bits=BITS)
    new = coordinator.aggregate(state, agg.sums)

    w = np.array(weights)
    m = len(clients)
    q = FixedPointCodec(clip=CHANNEL_BOUND, bits=BITS, max_clients=m).max_error_per_client
    for name, current in state.adapters.items():
        owner, layer = expert_entries(name), layer_of(name)
        deltas = [np.clip(r.delta[name].numpy(), -BOUND, BOUND) for r in results]
        got = new.adapters[name].double().numpy() - current.double().numpy()
        for idx in np.ndindex(owner.shape):
            e = owner[idx]
            holders = [i for i in range(m) if e < 0 or held[i][layer, e]]
            if len(holders) < 2:  # expert 2: held by one client only, never updated
                assert got[idx] == 0.0
                continue
            weights = w[holders]
            want = sum(w[i] * deltas[i][idx] for i in holders) / weights.sum()
            tol = (m * BOUND * q + abs(want) * m * q) / (weights.sum() - m * q) + 1e-7
            assert abs(got[idx] - want) <= tol, (name, idx)
        # Not a plain mean over everybody: the non-holders' (non-zero) deltas are left out.
        if (owner == 0).any():
            everyone = np.mean([d[owner == 0] for d in deltas], axis=0)
            assert np.max(np.abs(got[owner == 0] - everyone)) > 1e-3
    assert any(np.any(expert_entries(n) == 2) for n in state.adapters)


def test_the_coordinator_cannot_tell_who_holds_what():
    rng = np.random.default_rng(8)
    config = synthetic_config(
        FedMoEConfig, FedMoESection(memory_fraction=0.7, recommend_weight=0.0)
    )
    state0 = make_state(rng)
    state = GlobalState(state0.adapters, make_routing(rng, (0.4, 0.4, 0.2)))
    delta = make_result(rng, BOUND).delta
    routing = make_routing(rng, (0.4, 0.3, 0.3))

    def run(patterns: list[tuple[float, ...]]) -> tuple[list[dict], GlobalState, list]:
        clients = clients_with_patterns(config, state0, rng, patterns)
        held = [c.select(state) for c in clients]
        result = LocalTrainingResult(delta, routing, make_result(rng, BOUND).metrics, None, 1)
        subs = [c.submit(state, result, 0.5) for c in clients]
        layout = FedMoECoordinator(config).layout(state)
        packed = [layout.pack(s.values) for s in subs]
        agg = aggregate_locally(layout, packed, threshold=2, bits=BITS)
        return packed, FedMoECoordinator(config).aggregate(state, agg.sums), held

    # Two federations whose clients swap their sub-MoEs: client 0 holds {0, 1} in one and
    # {1, 2} in the other. Every client sends a vector of the same length and layout.
    a_packed, a_state, a_held = run([(0.5, 0.4, 0.1), (0.1, 0.4, 0.5), (0.4, 0.5, 0.1)])
    b_packed, b_state, b_held = run([(0.1, 0.4, 0.5), (0.5, 0.4, 0.1), (0.4, 0.5, 0.1)])
    assert not np.array_equal(a_held[0], b_held[0])
    assert {p["mask"].shape for p in a_packed + b_packed} == {a_packed[0]["mask"].shape}
    assert FedMoECoordinator(config).layout(state) == config.layout(
        GlobalState.initial(state.adapters, LAYERS, EXPERTS, top_k=2)
    )
    # What the coordinator learns (the sums) and broadcasts (the next state) is the same.
    assert a_state.extras == {} and b_state.extras == {}
    tol = 3 * 3 * BOUND * FixedPointCodec(CHANNEL_BOUND, BITS, max_clients=3).max_error_per_client
    for name in state.adapters:
        np.testing.assert_allclose(
            a_state.adapters[name].numpy(), b_state.adapters[name].numpy(), atol=tol + 1e-7
        )
    np.testing.assert_allclose(a_state.routing.counts, b_state.routing.counts, atol=1.0)


def test_session_trains_only_the_held_sub_moe_under_dp():
    model = attach(tiny_dense_model(), MoELoRAConfig(rank=2, load_balance_coef=0.0))
    stats = routing_statistics(model)
    layers = len(stats.layer_names)
    state = GlobalState.initial(adapter_state(model), stats.layer_names, 4, 2)
    client = FedMoEClient(FedMoEConfig(params=FedMoESection(warmup_rounds=0)), memory_fraction=0.5)
    blocks = torch.randint(0, 256, (32, 16), generator=torch.Generator().manual_seed(1))
    client.pattern = np.tile([0.1, 0.5, 0.1, 0.3], (layers, 1))
    dp = DPConfig(8.0, 1e-5, 1.0, noise_multiplier=0.8)
    with client.session(model, state) as plan:
        result = train_local(
            model, blocks, dp=dp, steps=3, batch_size=8, seed=0, progress=False, frozen=plan.frozen
        )
    np.testing.assert_array_equal(client.held, np.tile([False, True, False, True], (layers, 1)))
    assert np.all(result.routing.counts[:, [0, 2]] == 0) and np.all(
        result.routing.counts[:, [1, 3]] > 0
    )
    partition = ExpertPartition.of(state)
    for name, mask in partition.expert_mask(client.held).items():
        assert torch.all(result.delta[name][mask] == 0)
    sub = client.submit(state, result, 1.0)
    np.testing.assert_array_equal(sub.values["expert_count"], client.held.ravel())


def test_config_refuses_a_minimum_count_of_one():
    with pytest.raises(StrategyError, match=r">= 2 - at `\$\.min_count`"):
        FedMoEConfig(params=FedMoESection(min_count=1))
    with pytest.raises(StrategyError, match="memory_fraction"):
        FedMoEConfig(params=FedMoESection(memory_fraction=0.0))
    with pytest.raises(StrategyError, match="memory_fraction"):
        FedMoEClient(FedMoEConfig(), memory_fraction=1.5)


# ------------------------------------------------------------------ the validation signal


def test_validation_signal_noise_has_std_sigma_times_l_max_over_m():
    """Many draws of the mechanism (privacy.noise's CSPRNG): the empirical std is within 3% of
    sigma * L_max / m (20000 draws: the std's own relative error is about 0.5%)."""
    params = FedMoESection(validation_records=40, loss_cap=5.0, validation_noise_multiplier=3.0)
    mechanism = validation_mechanism(params)
    assert mechanism.l2_sensitivity == pytest.approx(5.0 / 40)
    assert mechanism.dp_event() == dp_accounting.GaussianDpEvent(3.0)
    draws = mechanism.apply(np.full(20000, 1.25)) - 1.25
    assert abs(draws.mean()) < 0.01
    assert np.std(draws) == pytest.approx(3.0 * 5.0 / 40, rel=0.03)


def test_one_validation_block_moves_the_clipped_mean_by_at_most_l_max_over_m():
    """The stated sensitivity: adding or removing any one block (fewer or more blocks than m,
    losses beyond the cap) moves v by at most L_max / m, and a large loss reaches it."""
    rng = np.random.default_rng(0)
    m, cap = 8, 4.0
    worst = 0.0
    for n in (3, 8, 12):
        losses = rng.uniform(0, 7, size=n)
        v = clipped_mean_loss(losses, m, cap)
        for i in range(n):  # remove block i
            worst = max(worst, abs(v - clipped_mean_loss(np.delete(losses, i), m, cap)))
        for i in range(n + 1):  # add a block at position i
            added = np.insert(losses, i, rng.choice([0.0, 9.0]))
            worst = max(worst, abs(v - clipped_mean_loss(added, m, cap)))
    assert worst <= cap / m + 1e-12
    assert worst == pytest.approx(cap / m)


def sub_moe_client(**params) -> tuple[FedMoEClient, GlobalState]:
    """A client past warm-up on the synthetic state, with an own pattern favouring expert 0."""
    state = make_state(np.random.default_rng(0))
    section = FedMoESection(warmup_rounds=0, memory_fraction=0.7, **params)
    client = FedMoEClient(FedMoEConfig(params=section))
    client.pattern = np.tile([0.6, 0.3, 0.1], (len(LAYERS), 1))
    return client, state


def test_a_stall_revises_with_the_global_routing_and_no_gain_reverts():
    client, state = sub_moe_client(recommend_weight=1.0, tolerance=0.05)
    # the federation routes to expert 2, which this institution does not use
    state = GlobalState(state.adapters, make_routing(np.random.default_rng(1), (0.05, 0.05, 0.9)))
    own = client.select(state)
    client.held = own
    client.observe(3.0)
    client.observe(2.5)  # improved by more than the tolerance: no revision
    assert client.lam == 0.0 and client.trial is None
    client.observe(2.48)  # stalled: revise
    assert client.lam == 1.0 and client.trial is not None
    revised = client.select(state)
    assert not np.array_equal(revised, own) and np.all(revised[:, 2])
    client.held = revised
    client.observe(2.47)  # the revision did not help (not below 2.48 - 0.05): revert
    assert client.lam == 0.0 and client.trial is None
    np.testing.assert_array_equal(client.select(state), own)
    # memory keeps the whole state across a restart
    again, _ = sub_moe_client(recommend_weight=1.0, tolerance=0.05)
    again.restore(client.memory())
    np.testing.assert_array_equal(again.select(state), own)
    assert (again.lam, again.signal) == (0.0, 2.47)


def test_a_revision_that_helps_is_kept():
    client, state = sub_moe_client(recommend_weight=0.5, tolerance=0.0)
    client.held = client.select(state)
    client.observe(2.0)
    client.observe(2.1)  # worse: stalled
    assert client.lam == 0.5
    client.held = client.select(state)
    client.observe(1.5)  # better than before the revision: kept
    assert client.lam == 0.5 and client.trial is None and client.revert_to is None


def test_the_fedmoe_round_plans_the_validation_release_with_the_routing():
    """The privacy plan (config alone) and the learner agree: routing, then the signal."""
    from clients.strategies.fedmoe import CLIENT_HALF

    config = fedmoe_federation_config()
    events = CLIENT_HALF.round_releases(config)
    section = config.aggregation.fedmoe
    assert events == [
        dp_accounting.GaussianDpEvent(config.privacy.routing_noise_multiplier),
        dp_accounting.GaussianDpEvent(section.validation_noise_multiplier),
    ]


def fedmoe_federation_config():
    """The tiny federation with FedMoE and a per-institution budget for the first member."""
    import tempfile
    from pathlib import Path

    from tests.test_strategy_federation import strategy_config

    return strategy_config(Path(tempfile.mkdtemp()), "fedmoe")


# ------------------------------------------------------------------ memory budgets


def test_budgets_differ_per_institution_and_count_the_shared_parts():
    config = fedmoe_federation_config()
    names = config.institution_names
    section = msgspec.structs.replace(
        config.aggregation.fedmoe, memory_fraction=0.9, memory_fractions={names[0]: 0.6}
    )
    assert section.problems(config) == []
    config = msgspec.structs.replace(
        config, aggregation=msgspec.structs.replace(config.aggregation, fedmoe=section)
    )
    assert fedmoe_client(config, names[0]).memory_fraction == 0.6
    assert fedmoe_client(config, names[1]).memory_fraction == 0.9
    bad = msgspec.structs.replace(section, memory_fractions={"nobody": 0.5})
    assert [field for field, _ in bad.problems(config)] == ["memory_fractions"]

    state = make_state(np.random.default_rng(0))
    partition = ExpertPartition.of(state)
    sizes, dense = expert_sizes(partition, state)
    total = sum(t.numel() for t in state.adapters.values())
    assert dense > 0 and dense + sizes.sum() * EXPERTS == total
    held = np.zeros((len(LAYERS), EXPERTS), dtype=bool)
    held[:, 0] = True
    assert sub_moe_memory(held, sizes, dense) == dense + sizes.sum()
    # the budget is a fraction of everything held: the shared parts plus top_k = 2 experts
    # per layer fit, all three do not; the whole MoE fits only the full budget
    client, _ = sub_moe_client()
    client.memory_fraction = (dense + 2.5 * sizes.sum()) / total
    chosen = client.select(state)
    assert np.all(chosen.sum(1) == 2)
    assert sub_moe_memory(chosen, sizes, dense) <= client.memory_fraction * total
    client.memory_fraction = 1.0
    assert client.select(state).all()
