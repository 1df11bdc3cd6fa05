"""FedAlign-MoE: client-side weights and scores equal the formulas computed centrally, the
secure aggregate (real SecAgg+, real CKKS) equals the plaintext computation, and the routing
regularizer pulls a real model's routing toward the global distribution under DP-SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.contract.config import FedAlignSection
from clients.contract.layout import CHANNEL_BOUND
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.contract.routing import RoutingStats
from clients.models.loaders import tiny_dense_model
from clients.models.moe_lora import MoELoRAConfig
from clients.models.moe_lora import adapter_state
from clients.models.moe_lora import attach
from clients.models.moe_lora import routing_statistics
from clients.strategies.fedalign import ALIGN_MEAN
from clients.strategies.fedalign import ALIGN_N
from clients.strategies.fedalign import ALIGN_STD
from clients.strategies.fedalign import FedAlignClient
from clients.strategies.fedalign import FedAlignConfig
from clients.strategies.fedalign import consistency_scores
from clients.strategies.fedalign import distribution
from clients.strategies.fedalign import routing_regularizer
from clients.strategies.fedalign import soft_target
from clients.training.trainer import LocalTrainingResult
from clients.training.trainer import train_local
from coordinator.strategies.base import aggregate_locally
from coordinator.strategies.fedalign import FedAlignCoordinator
from coordinator.strategies.fedalign import alignment_statistics
from privacy import DPConfig
from secagg import FixedPointCodec
from secagg.ckks import CkksKeyHolder
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

WEIGHTS = [0.4, 1.0, 0.7, 1.0]  # public, declared in the config
PROBS = [(0.5, 0.3, 0.2), (0.2, 0.3, 0.5), (0.34, 0.33, 0.33), (0.8, 0.1, 0.1)]


@pytest.fixture(scope="module")
def ckks():
    return CkksKeyHolder.generate()


def smoothed(counts: np.ndarray, s: float) -> np.ndarray:
    counts = np.maximum(counts, 0)
    return (1 - s) * counts / counts.sum(1, keepdims=True) + s / counts.shape[1]


def central_consistency(local: np.ndarray, global_: np.ndarray, config: FedAlignConfig):
    """s(l, e) written independently, per expert: Bernoulli JS as H(m) - (H(a) + H(b)) / 2 in
    bits; Bernoulli KL."""
    p, q = smoothed(local, config.params.smoothing), smoothed(global_, config.params.smoothing)

    def entropy(x):
        return -(x * np.log2(x) + (1 - x) * np.log2(1 - x))

    out = np.zeros_like(p)
    for layer in range(p.shape[0]):
        for e in range(EXPERTS):
            a, b = p[layer, e], q[layer, e]
            if config.params.consistency == "js":
                out[layer, e] = 1 - (entropy((a + b) / 2) - (entropy(a) + entropy(b)) / 2)
            else:
                kl = a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))
                out[layer, e] = np.exp(-kl / config.params.temperature)
    return out


def central_cosines(result: LocalTrainingResult, move: dict[str, np.ndarray]) -> np.ndarray:
    scores = np.zeros((len(LAYERS), EXPERTS))
    for layer in range(len(LAYERS)):
        for e in range(EXPERTS):
            names = [n for n in move if layer_of(n) == layer]
            u = np.concatenate(
                [
                    np.clip(result.delta[n].numpy(), -BOUND, BOUND)[expert_entries(n) == e]
                    for n in names
                ]
            )
            g = np.concatenate([move[n][expert_entries(n) == e] for n in names])
            scores[layer, e] = u @ g / (np.linalg.norm(u) * np.linalg.norm(g))
    return scores


def central_update(state, results, omegas, counts, dense_w, min_count):
    """Per entry: global + sum(omega delta) / sum(omega) (experts with enough count) or dense."""
    omega_sum, count_sum = np.sum(omegas, axis=0), np.sum(counts, axis=0)
    new = {}
    for name, current in state.adapters.items():
        owner, layer = expert_entries(name), layer_of(name)
        d = [np.clip(r.delta[name].numpy(), -BOUND, BOUND) for r in results]
        out = current.double().numpy().copy()
        for idx in np.ndindex(owner.shape):
            e = owner[idx]
            if e < 0:
                out[idx] += sum(w * di[idx] for w, di in zip(dense_w, d)) / sum(dense_w)
            elif count_sum[layer, e] >= min_count:
                num = sum(o[layer, e] * di[idx] for o, di in zip(omegas, d))
                out[idx] += num / omega_sum[layer, e]
        new[name] = out
    return new, omega_sum, count_sum


@pytest.mark.parametrize("consistency", ["js", "expert_kl"])
def test_two_rounds_through_secure_sums_equal_the_central_computation(ckks, consistency):
    rng = np.random.default_rng(11)
    config = synthetic_config(
        FedAlignConfig,
        FedAlignSection(consistency=consistency, temperature=0.5, beta=1.0, min_count=2),
        routing_channel="ckks",
    )
    clients = [FedAlignClient(config) for _ in WEIGHTS]
    coordinator = FedAlignCoordinator(config)
    codec = FixedPointCodec(clip=CHANNEL_BOUND, bits=BITS, max_clients=len(WEIGHTS))
    q = codec.max_error_per_client

    # Round 1: no global routing and no memory yet: weights are the example weights, no scores.
    state0 = make_state(rng)
    results = [make_result(rng, BOUND, p) for p in PROBS]
    subs = [c.submit(state0, r, w) for c, r, w in zip(clients, results, WEIGHTS)]
    w = np.array(WEIGHTS)
    for sub, wi in zip(subs, w):
        np.testing.assert_array_equal(sub.values["expert_weight"], np.full(6, wi))
        assert not sub.values["align_n"].any()
    layout = coordinator.layout(state0)
    agg = aggregate_locally(
        layout, [layout.pack(s.values) for s in subs], threshold=3, bits=BITS, ckks=ckks
    )
    state1 = coordinator.aggregate(state0, {"mask": agg.sums["mask"]})
    assert not state1.extras[ALIGN_N].any()

    # Round 2: the institutions decrypted last round's routing sum (CKKS); the coordinator's
    # broadcast carries score statistics that make tau = 0.1 - 1.0 * 0.3 = -0.2 everywhere.
    routing = make_routing(rng, (0.3, 0.3, 0.4))
    shape = (len(LAYERS), EXPERTS)
    extras = {
        ALIGN_MEAN: np.full(shape, 0.1),
        ALIGN_STD: np.full(shape, 0.3),
        ALIGN_N: np.full(shape, 4.0),
    }
    state2 = GlobalState(state1.adapters, routing, extras)
    move = {
        n: state1.adapters[n].double().numpy() - state0.adapters[n].double().numpy()
        for n in state0.adapters
    }
    results = [make_result(rng, BOUND, p) for p in PROBS]
    # Institution 3 moves layer 0 against the federation: its scores there are < -0.5 (out).
    for name in results[3].delta:
        if layer_of(name) == 0:
            results[3].delta[name] = torch.tensor(-np.sign(move[name]) * BOUND * 0.9)
    subs = [c.submit(state2, r, w) for c, r, w in zip(clients, results, WEIGHTS)]

    omegas, counts, scores = [], [], []
    for sub, r, wi in zip(subs, results, w):
        s = central_consistency(r.routing.counts, routing.counts, config)
        a = central_cosines(r, move)
        include = a >= -0.2
        omega = wi * s * include
        np.testing.assert_allclose(sub.values["expert_weight"], omega.ravel(), rtol=1e-12)
        np.testing.assert_array_equal(sub.values["expert_count"], include.ravel())
        np.testing.assert_allclose(sub.values["align_score"], a.ravel(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(sub.values["align_square"], (a**2).ravel(), rtol=1e-12)
        omegas.append(omega), counts.append(include), scores.append(a)
    assert np.all(scores[3][0] < -0.5) and not counts[3][0].any()
    assert np.all(np.ptp(np.array(omegas)[:3], axis=0) > 0)  # the weights differ per client

    layout = coordinator.layout(state2)
    packed = [layout.pack(s.values) for s in subs]
    agg = aggregate_locally(layout, packed, threshold=3, bits=BITS, ckks=ckks)
    state3 = coordinator.aggregate(state2, {"mask": agg.sums["mask"]})

    expected, omega_sum, _ = central_update(state2, results, omegas, counts, w, 2)
    m = len(WEIGHTS)
    for name, current in state2.adapters.items():
        got = state3.adapters[name].double().numpy()
        owner, layer = expert_entries(name), layer_of(name)
        weight = np.where(owner < 0, w.sum(), omega_sum[layer][np.maximum(owner, 0)])
        update = expected[name] - current.double().numpy()
        tol = (m * BOUND * q + np.abs(update) * m * q) / (weight - m * q)
        tol += np.abs(expected[name]) * 2.0**-24 + 1e-12
        assert np.all(np.abs(got - expected[name]) <= tol), name
        assert np.max(np.abs(update)) > 50 * np.max(tol)
    # The coordinator's score statistics are the mean and std of the clients' cosines.
    a = np.array(scores)
    np.testing.assert_allclose(state3.extras[ALIGN_MEAN], a.mean(0), atol=m * q)
    np.testing.assert_allclose(state3.extras[ALIGN_STD], a.std(0), atol=1e-2)
    np.testing.assert_array_equal(state3.extras[ALIGN_N], np.full(shape, 4.0))


def test_an_expert_kept_by_one_client_only_is_not_updated(ckks):
    rng = np.random.default_rng(5)
    config = synthetic_config(FedAlignConfig, FedAlignSection(min_count=2, beta=0.0))
    state0 = make_state(rng)
    clients = [FedAlignClient(config) for _ in range(3)]
    for c in clients:  # a first round, to give every client the memory of state0
        c.submit(state0, make_result(rng, BOUND), 0.5)
    shape = (len(LAYERS), EXPERTS)
    extras = {
        ALIGN_MEAN: np.full(shape, 0.5),
        ALIGN_STD: np.zeros(shape),
        ALIGN_N: np.full(shape, 3.0),
    }
    moved = {n: t + 0.01 for n, t in state0.adapters.items()}
    state = GlobalState(moved, make_routing(rng, (0.4, 0.3, 0.3)), extras)
    results = []
    for i in range(3):  # only client 0 moves along the global move (cos = 1 >= tau = 0.5)
        r = make_result(rng, BOUND)
        sign = 1.0 if i == 0 else -1.0
        results.append(
            LocalTrainingResult(
                {
                    n: torch.full(t.shape, sign * 0.02, dtype=torch.float64)
                    for n, t in r.delta.items()
                },
                r.routing,
                r.metrics,
                None,
                1,
            )
        )
    subs = [c.submit(state, r, 0.5) for c, r in zip(clients, results)]
    assert subs[0].values["expert_count"].all() and not subs[1].values["expert_count"].any()
    layout = config.layout(state)
    agg = aggregate_locally(layout, [layout.pack(s.values) for s in subs], threshold=2)
    new = FedAlignCoordinator(config).aggregate(state, agg.sums)
    for name in state.adapters:
        owner = expert_entries(name)
        diff = new.adapters[name].numpy() - state.adapters[name].numpy()
        np.testing.assert_array_equal(diff[owner >= 0], 0.0)  # one keeper: experts unchanged
        # shared entries: mean of +0.02, -0.02, -0.02 with equal weights
        np.testing.assert_allclose(diff[owner < 0], -0.02 / 3, atol=1e-4)


def test_regularizer_pulls_routing_toward_the_global_distribution():
    blocks = torch.randint(0, 256, (32, 16), generator=torch.Generator().manual_seed(0))
    target = np.array([0.85, 0.05, 0.05, 0.05])
    dp = DPConfig(8.0, 1e-5, 1.0, noise_multiplier=0.5)

    def kl_after(regularization: float) -> float:
        with torch.random.fork_rng(devices=[]):  # the same adapter initialisation each time
            torch.manual_seed(0)
            model = attach(tiny_dense_model(), MoELoRAConfig(rank=2, load_balance_coef=0.0))
        stats = routing_statistics(model)
        counts = np.tile(target * 1000, (len(stats.layer_names), 1))  # top-2 of 500 tokens
        gate_sum = np.tile(target * 500, (len(stats.layer_names), 1))
        routing = type(stats)(stats.layer_names, counts, gate_sum, np.full(len(counts), 500.0), 2)
        state = GlobalState(adapter_state(model), routing)
        client = FedAlignClient(
            FedAlignConfig(params=FedAlignSection(regularization=regularization))
        )
        with client.session(model, state) as plan:
            train_local(
                model,
                blocks,
                dp=dp,
                steps=25,
                batch_size=8,
                lr=3e-2,
                seed=0,
                progress=False,
                extra_loss=plan.extra_loss,
            )
        mean_gate = routing_statistics(model).mean_gate
        return float(np.mean((mean_gate * np.log(mean_gate / target)).sum(1)))

    # Over initialisation seeds 0-4 the ratio was 0.38-0.49 (KL of the whole run's routing).
    assert kl_after(5.0) < 0.65 * kl_after(0.0)


def test_regularizer_compares_soft_probabilities_with_the_summed_gate_sum():
    """A router putting 0.6/0.4 on two experts: the local quantity is the mean softmax, and the
    target is gate_sum / tokens, so a federation routing the same way gives a zero term, although
    its top-2 counts (equal for both experts) would not."""
    probs = torch.tensor([0.6, 0.4, 0.0, 0.0]).expand(3, 5, 4)  # [blocks, tokens, experts]
    tokens = np.array([1000.0])
    counts = np.array([[1000.0, 1000.0, 0.0, 0.0]])  # top-2: both experts every token
    gate_sum = np.array([[600.0, 400.0, 0.0, 0.0]])
    routing = RoutingStats(("layer",), counts, gate_sum, tokens, top_k=2)
    target = torch.from_numpy(soft_target(routing, 1e-3))
    np.testing.assert_allclose(target[0, :2], [0.6 * 0.999 + 2.5e-4, 0.4 * 0.999 + 2.5e-4])
    term = routing_regularizer([probs], target, 1e-3)
    assert term.shape == (3,)
    np.testing.assert_allclose(term.numpy(), 0.0, atol=1e-6)
    # the count-based target (0.5/0.5) is what the term would have compared with before
    counts_target = torch.from_numpy(distribution(counts, 1e-3))
    assert float(routing_regularizer([probs], counts_target, 1e-3)[0]) > 0.015


def test_consistency_is_per_expert():
    """Two layers routed identically except for one expert's share: only the experts whose share
    differs lose weight, so the weights within a layer differ."""
    counts = np.array([[50.0, 30.0, 20.0], [50.0, 30.0, 20.0]])
    local_counts = np.array([[50.0, 30.0, 20.0], [50.0, 20.0, 30.0]])
    names = ("a", "b")
    g = RoutingStats(names, counts, counts, np.full(2, 100.0))
    local = RoutingStats(names, local_counts, local_counts, np.full(2, 100.0))
    for consistency in ("js", "expert_kl"):
        config = FedAlignConfig(params=FedAlignSection(consistency=consistency))
        s = consistency_scores(local, g, config)
        np.testing.assert_allclose(s[0], 1.0)
        assert s[1, 0] == pytest.approx(1.0) and s[1, 1] < 1.0 and s[1, 2] < 1.0
        np.testing.assert_allclose(s, central_consistency(local_counts, counts, config))


def test_statistics_of_too_few_scores_are_not_broadcast():
    scores = [np.array([0.2, 0.9]), np.array([0.4, 0.0]), np.array([0.9, 0.0])]
    has = [np.array([1.0, 1.0]), np.array([1.0, 0.0]), np.array([1.0, 0.0])]
    sums = {
        "align_score": sum(scores),
        "align_square": sum(a**2 for a in scores),
        "align_n": sum(has) + np.array([0.01, -0.01]),  # quantisation error on the counts
    }
    stats = alignment_statistics(sums, (1, 2), min_scorers=2)
    np.testing.assert_allclose(stats[ALIGN_MEAN], [[0.5, 0.0]])
    np.testing.assert_allclose(stats[ALIGN_STD], [[np.std([0.2, 0.4, 0.9]), 0.0]])
    np.testing.assert_array_equal(stats[ALIGN_N], [[3.0, 0.0]])  # one score (0.9): withheld


def test_config_errors_name_the_field():
    with pytest.raises(StrategyError, match="consistency"):
        FedAlignConfig(params=FedAlignSection(consistency="cosine"))  # type: ignore[arg-type]
    with pytest.raises(StrategyError, match="min_count"):
        FedAlignConfig(params=FedAlignSection(min_count=0))
    with pytest.raises(StrategyError, match="beta"):
        FedAlignConfig(params=FedAlignSection(beta=-1.0))
    with pytest.raises(StrategyError, match="smoothing"):
        FedAlignConfig(params=FedAlignSection(smoothing=0.0))
