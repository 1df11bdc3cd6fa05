"""FedAMoLE: per-sample gradients of its adapter, the exact assignment, charged score releases,
and a round through the real SecAgg+ sum against the same strategy computed in plaintext."""

from __future__ import annotations

import dataclasses
import itertools

import dp_accounting
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clients.contract.config import FedAMoLESection
from clients.contract.layout import CHANNEL_BOUND
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.models.fedamole_lora import AMoLEConfig
from clients.models.fedamole_lora import amole_layers
from clients.models.fedamole_lora import amole_parameters
from clients.models.fedamole_lora import amole_state
from clients.models.fedamole_lora import attach_amole
from clients.models.fedamole_lora import load_amole_state
from clients.models.fedamole_lora import per_sample_loss
from clients.models.fedamole_lora import projections
from clients.models.fedamole_lora import set_held
from clients.models.loaders import tiny_dense_model
from clients.strategies.fedamole import ASSIGNMENT
from clients.strategies.fedamole import KEY_SUM
from clients.strategies.fedamole import KEYS
from clients.strategies.fedamole import FedAMoLEClient
from clients.strategies.fedamole import FedAMoLEConfig
from clients.strategies.fedamole import FedAMoLEState
from clients.strategies.fedamole import FedAMoLEUpdate
from clients.strategies.fedamole import amole_modules
from clients.strategies.fedamole import decode_assignment
from clients.strategies.fedamole import decode_embedding
from clients.strategies.fedamole import encode_assignment
from clients.strategies.fedamole import score_embedding
from clients.strategies.fedamole import state_from_global
from clients.training.release import gaussian_release
from clients.training.release import noise_generator
from clients.training.trainer import StepSettings
from coordinator.strategies.base import aggregate_locally
from coordinator.strategies.fedamole import FedAMoLEStrategy
from coordinator.strategies.fedamole import assign
from coordinator.strategies.fedamole import client_affinity
from coordinator.strategies.fedamole import next_state
from coordinator.strategies.fedamole import public_state
from coordinator.strategies.fedamole import solve_assignment
from privacy import assert_per_sample_gradients
from secagg import FixedPointCodec
from tests import adapter_fixtures
from tests.adapter_fixtures import BITS
from tests.adapter_fixtures import DP
from tests.adapter_fixtures import clipped_mean
from tests.adapter_fixtures import seeded_model
from tests.adapter_fixtures import token_ids as ids

ADAPTER = AMoLEConfig(num_experts=4, top_k=2, rank=4, load_balance_coef=0.01)


def model() -> torch.nn.Module:
    return seeded_model(lambda base: attach_amole(base, ADAPTER), seed=3)


def exercised(m: torch.nn.Module) -> torch.nn.Module:
    return adapter_fixtures.exercised(m, (p for _, p in amole_parameters(m)))


class Ledger:
    """Records every charge, in order; refuses when ``budget`` charges have been made."""

    def __init__(self, budget: int = 1000) -> None:
        self.entries: list[tuple[dp_accounting.DpEvent, str]] = []
        self.budget = budget

    def __call__(self, event: dp_accounting.DpEvent, what: str) -> None:
        if len(self.entries) >= self.budget:
            raise RuntimeError("budget exhausted")
        self.entries.append((event, what))


def config(num_clients: int = 4, **params) -> FedAMoLEConfig:
    """Four experts held two to four per client, scores and keys at noise multiplier 1."""
    defaults = dict(
        max_experts=4, affinity_blocks=8, score_noise_multiplier=1.0, key_noise_multiplier=1.0
    )
    section = FedAMoLESection(**{**defaults, **params})
    return FedAMoLEConfig(ADAPTER, num_clients, min_weight=0.21875, params=section)


# --- the adapter ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_adapter_per_sample_gradients_match_brute_force(mode):
    m = exercised(model())
    set_held(m, {name: (0, 2, 3) for name, _ in amole_layers(m)})
    report = assert_per_sample_gradients(m, ids(3), per_sample_loss, mode=mode)
    names = {p.name for p in report.parameters}
    assert names == {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.endswith("token_proj.weight") for n in names)
    assert any(n.endswith("shared_B.weight") for n in names)
    assert any(n.endswith("experts_A.2.weight") for n in names)
    assert not any(".experts_A.1." in n or ".experts_B.1." in n for n in names)  # not held
    assert all(p.scale > 0 for p in report.parameters)


def test_routing_uses_only_held_experts():
    m = exercised(model())
    batch = ids(2)
    set_held(m, {name: (0, 1) for name, _ in amole_layers(m)})
    with torch.no_grad():
        before = m(input_ids=batch).logits
        layer = amole_layers(m)[0][1]
        layer.experts_B[3].weight.add_(1.0)  # not held: no effect
        assert torch.equal(m(input_ids=batch).logits, before)
        layer.experts_B[1].weight.add_(1.0)  # held: changes the output
        assert not torch.allclose(m(input_ids=batch).logits, before)


def test_attached_adapter_changes_no_output():
    batch = ids(2)
    with torch.no_grad():
        plain = tiny_dense_model()(input_ids=batch).logits
        assert torch.allclose(model()(input_ids=batch).logits, plain, atol=1e-6)


# --- the assignment -------------------------------------------------------------------------


def brute_force_best(p: np.ndarray, k: int, low: int, high: int) -> float:
    experts, clients = p.shape
    best = -np.inf
    for choice in itertools.product(itertools.combinations(range(clients), k), repeat=experts):
        x = np.zeros_like(p)
        for e, cs in enumerate(choice):
            x[e, list(cs)] = 1
        if np.all((x.sum(0) >= low) & (x.sum(0) <= high)):
            best = max(best, float((p * x).sum()))
    return best


def test_assignment_meets_its_constraints_and_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(5):
        p = client_affinity(rng.normal(size=(5, 3)))
        x = solve_assignment(p, clients_per_expert=2, min_experts=3, max_experts=4)
        assert x.shape == (5, 3) and x.dtype == bool
        assert np.all(x.sum(1) == 2)
        assert np.all((x.sum(0) >= 3) & (x.sum(0) <= 4))
        assert (p * x).sum() == pytest.approx(brute_force_best(p, 2, 3, 4), abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "knob"),
    [
        ({"min_experts": 3, "max_experts": 4}, "min_experts=3"),  # 8 slots < 4 clients x 3
        ({"clients_per_expert": 4, "max_experts": 3}, "max_experts=3"),  # 16 slots > 4 x 3
        ({"clients_per_expert": 5}, "clients_per_expert=5"),
        ({"min_experts": 1}, "top_k"),
    ],
)
def test_infeasible_settings_are_refused_naming_the_knob(kwargs, knob):
    with pytest.raises(StrategyError, match=knob):
        config(**kwargs)


def test_round_zero_assignment_is_a_public_reproducible_draw():
    m = model()
    modules = tuple(n for n, _ in amole_layers(m))
    first = public_state(config(), amole_state(m), modules)
    again = public_state(config(), amole_state(m), modules)
    other = public_state(config(public_seed=1), amole_state(m), modules)
    np.testing.assert_array_equal(first.assignment, again.assignment)
    assert not np.array_equal(first.assignment, other.assignment)
    assert first.assignment.shape == (len(modules), 4, 4)
    assert np.all(first.assignment.sum(2) == 2)
    assert np.all((first.assignment.sum(1) >= 2) & (first.assignment.sum(1) <= 4))


# --- releases -------------------------------------------------------------------------------


def test_gaussian_release_noise_has_the_charged_scale():
    ledger = Ledger()
    out = gaussian_release(
        np.zeros(20_000),
        sensitivity=0.5,
        noise_multiplier=2.0,
        charge=ledger,
        what="x",
        generator=noise_generator(0),
    )
    assert ledger.entries == [(dp_accounting.GaussianDpEvent(2.0), "x")]
    assert np.std(out) == pytest.approx(1.0, rel=0.03)  # 2.0 * 0.5


def test_refused_charge_releases_nothing():
    with pytest.raises(RuntimeError, match="budget"):
        gaussian_release(
            np.ones(3), sensitivity=1.0, noise_multiplier=1.0, charge=Ledger(0), what="x"
        )


# --- a federation of tiny models ------------------------------------------------------------


class Federation:
    """``n`` clients with their own model copies and data, and the public round-0 state."""

    def __init__(self, n: int, **kwargs) -> None:
        self.config = config(n, **kwargs)
        self.clients = [FedAMoLEClient(self.config, i, model()) for i in range(n)]
        self.train = [ids(12, seed=10 + i) for i in range(n)]
        self.aux = [ids(8, seed=20 + i) for i in range(n)]
        self.weights = [0.375, 1.0, 0.21875, 0.78125][:n]  # public, declared 12 : 32 : 7 : 25
        self.ledgers = [Ledger() for _ in range(n)]
        m = self.clients[0].model
        self.state = public_state(
            self.config, amole_state(m), tuple(name for name, _ in amole_layers(m))
        )

    def local(self, state: FedAMoLEState) -> list[FedAMoLEUpdate]:
        return [
            c.train(state, self.train[i], self.aux[i], StepSettings(DP, 2, 4, 1e-2, seed=i))
            for i, c in enumerate(self.clients)
        ]


def plaintext_round(fed, state, updates, submissions, included):
    """The same strategy without secure aggregation, from the clients' updates."""
    cfg = fed.config
    w = {i: fed.weights[i] for i in included}
    out = {}
    for name, current in state.adapters.items():
        role = state.expert_of.get(name)
        who = [i for i in included if role is None or updates[i].held[role]]
        if not who:
            out[name] = current.double().numpy()
            continue
        deltas = [updates[i].delta[name].double().numpy() for i in who]
        step = clipped_mean(deltas, [w[i] for i in who], cfg.params.delta_bound)
        out[name] = current.double().numpy() + step
    keys = state.keys.copy()
    for m, e in itertools.product(*map(range, state.key_counts.shape)):
        holders = [i for i in included if updates[i].held[m, e]]
        if holders:
            sent = [submissions[i].values[KEY_SUM].reshape(state.keys.shape)[m, e] for i in holders]
            keys[m, e] = np.mean(sent, axis=0)
    return out, keys, w


@pytest.mark.parametrize("dropouts", [{}, {1: "masked_input"}])
def test_round_through_secure_sums_equals_plaintext(dropouts):
    fed = Federation(4)
    state = fed.state
    updates = fed.local(state)
    subs = [
        c.submit(state, u, fed.weights[i], fed.ledgers[i], generator=noise_generator(i))
        for i, (c, u) in enumerate(zip(fed.clients, updates))
    ]
    layout = FedAMoLEStrategy(fed.config).layout(state.to_global())  # the server half's
    assert layout == fed.clients[0].layout(state)
    agg = aggregate_locally(
        layout, [layout.pack(s.values) for s in subs], threshold=3, bits=BITS, dropouts=dropouts
    )
    included = [i for i in range(4) if i not in dropouts]
    assert agg.included == included
    new = next_state(fed.config, state, agg.sums)
    want, want_keys, w = plaintext_round(fed, state, updates, subs, included)

    q = FixedPointCodec(clip=CHANNEL_BOUND, bits=BITS, max_clients=4).max_error_per_client
    n = len(included)
    e_w = n * q  # weight sums are packed with bound 1
    bound = fed.config.params.delta_bound
    holder_mean_differs = False
    for name, current in state.adapters.items():
        role = state.expert_of.get(name)
        who = [i for i in included if role is None or updates[i].held[role]]
        total = sum(w[i] for i in who)
        update = want[name] - current.double().numpy()
        tol = (n * bound * q + np.abs(update) * e_w) / (total - e_w) + 1e-6 * np.abs(want[name])
        got = new.adapters[name].double().numpy()
        assert np.all(np.abs(got - want[name]) <= tol + 1e-7), name
        if role is not None and np.max(np.abs(update)) > 0:
            everyone = np.mean([updates[i].delta[name].double().numpy() for i in included], 0)
            holder_mean_differs |= bool(
                np.max(np.abs(current.numpy() + everyone - want[name])) > np.max(tol) * 10
            )
    assert holder_mean_differs  # averaging over every client (a plausible bug) would fail

    key_tol = n * fed.config.params.key_clip * q + 1e-12
    np.testing.assert_allclose(new.keys, want_keys, rtol=0, atol=key_tol)
    assert np.abs(new.keys).max() > 100 * key_tol
    held_included = np.stack([updates[i].held for i in included]).sum(0)
    np.testing.assert_array_equal(new.key_counts, held_included)
    assert new.round == 1


def test_two_rounds_every_released_score_and_key_is_charged():
    fed = Federation(3)
    state = fed.state
    assert all(
        c.data_embedding(state, fed.aux[i], fed.ledgers[i]) is None
        for i, c in enumerate(fed.clients)
    )
    assert all(not ledger.entries for ledger in fed.ledgers)  # round 0: nothing released

    for _ in range(2):
        updates = fed.local(state)
        subs = [
            c.submit(state, u, fed.weights[i], fed.ledgers[i])
            for i, (c, u) in enumerate(zip(fed.clients, updates))
        ]
        layout = fed.config.layout(state)
        agg = aggregate_locally(
            layout, [layout.pack(s.values) for s in subs], threshold=2, bits=BITS
        )
        state = next_state(fed.config, state, agg.sums)
        released = {}
        for i, c in enumerate(fed.clients):
            before = len(fed.ledgers[i].entries)
            embedding = c.data_embedding(state, fed.aux[i], fed.ledgers[i])
            event, what = fed.ledgers[i].entries[before]
            assert len(fed.ledgers[i].entries) == before + 1
            assert event == dp_accounting.GaussianDpEvent(fed.config.params.score_noise_multiplier)
            assert "data embedding" in what
            assert embedding.shape == (state.key_counts.shape[0], fed.config.adapter.rank)
            released[i] = score_embedding(fed.config, state, embedding)
        state = assign(fed.config, state, released)
        a = state.assignment
        assert np.all(a.sum(2) == 2) and np.all((a.sum(1) >= 2) & (a.sum(1) <= 4))

    for ledger in fed.ledgers:  # per round: keys (submit), scores (the DP-SGD is the caller's)
        whats = [what for _, what in ledger.entries]
        assert len(whats) == 4
        assert sum("data embedding" in x for x in whats) == 2
        assert sum("keys" in x for x in whats) == 2


def test_scores_without_budget_are_not_released():
    fed = Federation(3)
    state = fed.state
    updates = fed.local(state)
    subs = [
        c.submit(state, u, fed.weights[i], Ledger())
        for i, (c, u) in enumerate(zip(fed.clients, updates))
    ]
    layout = fed.config.layout(state)
    agg = aggregate_locally(layout, [layout.pack(s.values) for s in subs], threshold=2, bits=BITS)
    state = next_state(fed.config, state, agg.sums)
    with pytest.raises(RuntimeError, match="budget"):
        fed.clients[0].data_embedding(state, fed.aux[0], Ledger(0))


def test_scores_follow_the_embedding():
    """Without noise worth the name, a client scores highest the expert whose key points along
    its embedding (the mechanism is not just noise)."""
    fed = Federation(3, score_noise_multiplier=1e-6)
    client = fed.clients[0]
    state = fed.state
    load_amole_state(client.model, state.adapters)
    set_held(client.model, state.held(0))
    emb = projections(client.model, fed.aux[0])
    keys = np.zeros(state.keys.shape)
    for m, module in enumerate(state.modules):
        q, _ = emb[module]
        t = q.mean(0).double().numpy()
        keys[m, 2] = t / np.linalg.norm(t)  # expert 2 points along the embedding
        keys[m, 0] = -t / np.linalg.norm(t)
    state = dataclasses.replace(state, keys=keys, key_counts=np.ones(state.key_counts.shape))
    scores = score_embedding(fed.config, state, client.data_embedding(state, fed.aux[0], Ledger()))
    assert np.all(scores.argmax(1) == 2) and np.all(scores.argmin(1) == 0)


def test_embedding_noise_has_the_stated_sensitivity_and_scores_carry_sqrt_e_less():
    """The released embedding's noise std is sigma * sqrt(M) 2 C_t / n (many CSPRNG draws);
    scored against keys of norm <= C_k, each score's noise is a sqrt(E) fraction of what
    releasing the scores themselves at the same epsilon would need."""
    fed = Federation(3, score_noise_multiplier=1.5)
    cfg, client, state = fed.config, fed.clients[0], fed.state
    keys = np.zeros(state.keys.shape)
    keys[:, :, 0] = cfg.params.key_clip  # every key at the clip: the worst case
    state = dataclasses.replace(state, keys=keys, key_counts=np.ones(state.key_counts.shape))
    load_amole_state(client.model, state.adapters)
    set_held(client.model, state.held(0))
    emb = projections(client.model, fed.aux[0][: cfg.params.affinity_blocks])
    exact = []
    for module in state.modules:
        q = emb[module][0].double()
        scale = torch.clamp(cfg.params.embedding_clip / q.norm(dim=-1, keepdim=True), max=1.0)
        exact.append((q * scale).mean(0).numpy())
    modules = len(state.modules)
    sensitivity = cfg.embedding_sensitivity(modules)
    assert sensitivity == pytest.approx(
        np.sqrt(modules) * 2 * cfg.params.embedding_clip / cfg.params.affinity_blocks
    )
    draws = np.stack([client.data_embedding(state, fed.aux[0], Ledger()) for _ in range(3000)])
    np.testing.assert_allclose(draws.std(0, ddof=1), 1.5 * sensitivity, rtol=0.06)
    np.testing.assert_allclose(
        draws.mean(0), np.stack(exact), atol=6 * 1.5 * sensitivity / np.sqrt(3000)
    )
    scores = np.stack([score_embedding(cfg, state, d) for d in draws])
    score_std = scores.std(0, ddof=1).max()
    as_scores = 1.5 * cfg.score_sensitivity(modules)
    experts = cfg.adapter.num_experts
    assert score_std == pytest.approx(as_scores / np.sqrt(experts), rel=0.06)


@dataclasses.dataclass(frozen=True)
class SpyStrategy(FedAMoLEStrategy):
    """The server half, recording every score matrix that reached it, per client."""

    received: dict[int, int] = dataclasses.field(default_factory=dict)

    def select(self, state, scores):
        for i in scores:
            self.received[i] = self.received.get(i, 0) + 1
        return super().select(state, scores)


def test_rounds_through_the_server_half_charge_every_score_that_reaches_it():
    """Client halves and the server half over the wire forms, with a dropout in round 2."""
    fed = Federation(3)
    server = SpyStrategy(fed.config)
    state = server.initial_state(fed.state.to_global())
    trained: dict[int, list] = {i: [] for i in range(3)}
    for r, dropouts in enumerate([{}, {}, {2: "masked_input"}]):
        if server.wants_scores(state):
            local = state_from_global(fed.config, state, r)
            scores = {
                i: c.data_embedding(local, fed.aux[i], fed.ledgers[i])
                for i, c in enumerate(fed.clients)
            }
            wire = {i: np.ascontiguousarray(s, dtype="<f8").tobytes() for i, s in scores.items()}
            state = server.select(
                state, {i: server.decode_scores(state, b) for i, b in wire.items()}
            )
        local = state_from_global(fed.config, state, r)
        subs = []
        for i, c in enumerate(fed.clients):
            u = c.train(local, fed.train[i], fed.aux[i], StepSettings(DP, 2, 4, 1e-2, seed=r + i))
            trained[i].append(u.facts.dp_event())
            fed.ledgers[i](u.facts.dp_event(), f"fedamole expert updates (DP-SGD), round {r}")
            subs.append(c.submit(local, u, 0.375, fed.ledgers[i]))
        layout = server.layout(state)
        agg = aggregate_locally(
            layout, [layout.pack(s.values) for s in subs], threshold=2, bits=BITS,
            dropouts=dropouts,
        )  # fmt: skip
        assert agg.included == [i for i in range(3) if i not in dropouts]
        state = server.aggregate(state, agg.sums)
        a = state_from_global(fed.config, state).assignment
        assert np.all(a.sum(2) == 2) and np.all((a.sum(1) >= 2) & (a.sum(1) <= 4))
    assert server.received == {0: 2, 1: 2, 2: 2}  # rounds 1 and 2 used scores
    for i, ledger in enumerate(fed.ledgers):
        scores = [e for e, what in ledger.entries if "affinity scores" in what]
        assert len(scores) == server.received[i]
        assert all(e == dp_accounting.GaussianDpEvent(1.0) for e in scores)
        # every round's DP-SGD update and keys were charged, also where the sum dropped it
        assert [e for e, what in ledger.entries if "DP-SGD" in what] == trained[i]
        assert sum("keys" in what for _, what in ledger.entries) == 3


# --- the form the federation processes broadcast ------------------------------------------


def test_the_broadcast_form_round_trips_and_refuses_malformed_extras():
    m = model()
    state = public_state(config(num_clients=3), amole_state(m), [n for n, _ in amole_layers(m)])
    keyed = dataclasses.replace(
        state, keys=np.random.default_rng(0).normal(size=state.keys.shape),
        key_counts=np.full(state.key_counts.shape, 2.0),
    )  # fmt: skip
    broadcast = keyed.to_global()
    assert amole_modules(broadcast.adapters) == state.modules
    back = state_from_global(config(num_clients=3), broadcast)
    np.testing.assert_array_equal(back.keys, keyed.keys)
    np.testing.assert_array_equal(back.assignment, keyed.assignment)
    assert back.has_keys and not state.has_keys
    no_extras = state_from_global(
        config(num_clients=3), GlobalState(broadcast.adapters, broadcast.routing)
    )
    assert not no_extras.has_keys and not no_extras.assignment.any()
    for bad in (
        {**broadcast.extras, ASSIGNMENT: broadcast.extras[ASSIGNMENT] * 2},  # not 0/1
        {**broadcast.extras, KEYS: broadcast.extras[KEYS][:, :, :-1]},  # wrong rank
        {k: v for k, v in broadcast.extras.items() if k != KEYS},  # missing
    ):
        with pytest.raises(StrategyError):
            state_from_global(
                config(num_clients=3), GlobalState(broadcast.adapters, broadcast.routing, bad)
            )


@settings(max_examples=50, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5))))
def test_assignment_bytes_round_trip(assignment):
    data = encode_assignment(assignment)
    np.testing.assert_array_equal(decode_assignment(data, assignment.shape), assignment)
    with pytest.raises(StrategyError, match="bytes"):
        decode_assignment(data + b"\x00", assignment.shape)
    with pytest.raises(StrategyError, match="only 0 and 1"):
        decode_assignment(b"\x02" + data[1:], assignment.shape)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=80))
def test_embeddings_from_the_wire_are_exactly_the_shape_and_finite(data):
    shape = (2, 4)
    if len(data) != 64:
        with pytest.raises(StrategyError, match="bytes"):
            decode_embedding(data, shape)
        return
    values = np.frombuffer(data, dtype="<f8")
    if not np.all(np.isfinite(values)):
        with pytest.raises(StrategyError, match="finite"):
            decode_embedding(data, shape)
    else:
        np.testing.assert_array_equal(decode_embedding(data, shape), values.reshape(shape))
