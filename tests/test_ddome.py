"""DDOME: per-sample gradients of the gate + experts, the frozen common embedding, the private
top-K choice, a round through the real SecAgg+ sum against plaintext, and zero-shot choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.contract.config import DDOMESection
from clients.contract.layout import CHANNEL_BOUND
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.models.ddome_lora import GATE
from clients.models.ddome_lora import DDOMEAdapterConfig
from clients.models.ddome_lora import attach_ddome
from clients.models.ddome_lora import common_embedding
from clients.models.ddome_lora import ddome_gate
from clients.models.ddome_lora import ddome_layers
from clients.models.ddome_lora import ddome_parameters
from clients.models.ddome_lora import ddome_state
from clients.models.ddome_lora import expert_of
from clients.models.ddome_lora import gate_logits
from clients.models.ddome_lora import load_ddome_state
from clients.models.ddome_lora import per_sample_loss
from clients.models.ddome_lora import set_trainable
from clients.models.loaders import tiny_dense_model
from clients.strategies.base import RecordedCharges
from clients.strategies.ddome import CHOICE_SENSITIVITY
from clients.strategies.ddome import EXPERT_COUNTS
from clients.strategies.ddome import DDOMEClient
from clients.strategies.ddome import DDOMEConfig
from clients.strategies.ddome import DDOMEState
from clients.strategies.ddome import choice_mechanism
from clients.strategies.ddome import evaluate_choice
from clients.strategies.ddome import gate_probability_sum
from clients.strategies.ddome import zero_shot
from clients.strategies.ddome import zero_shot_loss
from clients.training.release import noise_generator
from clients.training.trainer import StepSettings
from coordinator.strategies.base import aggregate_locally
from coordinator.strategies.ddome import DDOMEStrategy
from coordinator.strategies.ddome import next_state
from privacy import assert_per_sample_gradients
from privacy import dp_sgd_event
from secagg import FixedPointCodec
from tests import adapter_fixtures
from tests.adapter_fixtures import BITS
from tests.adapter_fixtures import DP
from tests.adapter_fixtures import clipped_mean
from tests.adapter_fixtures import seeded_model
from tests.adapter_fixtures import token_ids as ids

ADAPTER = DDOMEAdapterConfig(num_experts=4, top_k=2, rank=4, gate_hidden=16)


def model() -> torch.nn.Module:
    return seeded_model(lambda base: attach_ddome(base, ADAPTER), seed=5)


def exercised(m: torch.nn.Module) -> torch.nn.Module:
    return adapter_fixtures.exercised(m, (p for _, p in ddome_parameters(m)))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("anchor", [None, 1])
def test_gate_and_expert_per_sample_gradients_match_brute_force(anchor, mode):
    m = exercised(model())
    chosen = (1, 2)
    set_trainable(m, chosen)
    batch = (ids(3), common_embedding(m, ids(3)))

    def loss(mod, b):
        return per_sample_loss(mod, b[0], b[1], chosen, anchor, 0.5)

    report = assert_per_sample_gradients(m, batch, loss, mode=mode)
    names = {p.name for p in report.parameters}
    assert names == {n for n, p in m.named_parameters() if p.requires_grad}
    assert {f"{GATE}.0.weight", f"{GATE}.2.bias"} <= names
    assert any(n.endswith("experts_A.2.weight") for n in names)
    assert not any(".experts_A.0." in n or ".experts_B.3." in n for n in names)
    assert all(p.scale > 0 for p in report.parameters)


def test_common_embedding_is_the_frozen_base():
    m = exercised(model())
    blocks = ids(5)
    with torch.no_grad():
        plain = tiny_dense_model()(input_ids=blocks, output_hidden_states=True)
    emb = common_embedding(m, blocks)
    assert emb.shape == (5, 64)
    torch.testing.assert_close(emb, plain.hidden_states[-1].mean(1))
    with torch.no_grad():
        ddome_layers(m)[0][1].experts_B[0].weight.add_(1.0)
    torch.testing.assert_close(common_embedding(m, blocks), emb)  # experts play no part


def test_choice_is_the_top_k_of_the_noised_probability_sum_and_anchor_comes_first():
    m = model()
    state = DDOMEState(adapters=ddome_state(m), expert_counts=np.zeros(4))
    emb = common_embedding(m, ids(6))
    with torch.no_grad():
        total = torch.softmax(gate_logits(m, emb).double(), -1).sum(0).numpy()
    noised = (
        total
        + 4.0
        * torch.normal(
            0.0, 1.0, size=(4,), generator=noise_generator(3), dtype=torch.float64
        ).numpy()
    )
    best = tuple(int(i) for i in np.argsort(-noised))
    config = DDOMEConfig(ADAPTER)
    assert (
        DDOMEClient(config, m).choose(state, emb, RecordedCharges(), noise_generator(3))
        == (best[:2])
    )
    anchored = DDOMEClient(config, m, anchor=best[3])
    assert anchored.choose(state, emb, RecordedCharges(), noise_generator(3)) == (best[3], best[0])
    with pytest.raises(StrategyError, match="anchor"):
        DDOMEClient(config, m, anchor=4)


def test_choice_noise_has_the_stated_sensitivity_and_is_charged_before_it_is_drawn():
    m = model()
    state = DDOMEState(adapters=ddome_state(m), expert_counts=np.zeros(4))
    emb = common_embedding(m, ids(8))
    client = DDOMEClient(DDOMEConfig(ADAPTER, params=DDOMESection(choice_noise_multiplier=2.5)), m)
    exact = gate_probability_sum(m, emb)
    # adding or removing one block moves the sum by one probability vector: L2 <= 1
    one_more = gate_probability_sum(m, common_embedding(m, ids(9)))
    assert np.linalg.norm(one_more - gate_probability_sum(m, emb[:8])) <= CHOICE_SENSITIVITY
    charges = RecordedCharges()
    draws = np.stack([client.noised_totals(state, emb, charges) for _ in range(4000)])
    assert [e for e, _ in charges.events] == [
        choice_mechanism(client.config.params).dp_event()
    ] * 4000
    std = draws.std(0, ddof=1)
    np.testing.assert_allclose(std, 2.5 * CHOICE_SENSITIVITY, rtol=0.05)
    np.testing.assert_allclose(draws.mean(0), exact, atol=5 * 2.5 / np.sqrt(4000))

    class Refuse(Exception):
        pass

    def refuse(event, what):
        raise Refuse(what)

    with pytest.raises(Refuse, match="expert choice"):
        client.choose(state, emb, refuse)


CHOICE_SEED = 1
"""Seeds the choice noise (reproducible rounds; with it some expert has a single trainer)."""


class Federation:
    def __init__(self, n: int, **kwargs) -> None:
        self.config = DDOMEConfig(ADAPTER, min_weight=0.21875, params=DDOMESection(**kwargs))
        # Half anchors (the paper's stabiliser): clients 2 and 3 are tied to experts 2 and 3.
        anchors = [None, None, 2, 3][:n]
        self.clients = [DDOMEClient(self.config, model(), anchor=a) for a in anchors]
        self.blocks = [ids(12, seed=30 + i) for i in range(n)]
        self.emb = [common_embedding(c.model, b) for c, b in zip(self.clients, self.blocks)]
        self.weights = [0.375, 1.0, 0.21875, 0.78125][:n]  # public, declared 12 : 32 : 7 : 25
        self.state = DDOMEState(ddome_state(self.clients[0].model), np.zeros(4))

    def round(self, state, dropouts=None):
        updates = [
            c.train(
                state,
                self.blocks[i],
                self.emb[i],
                StepSettings(DP, 2, 4, 1e-2, seed=i),
                RecordedCharges(),
                noise_generator(CHOICE_SEED + i),
            )
            for i, c in enumerate(self.clients)
        ]
        subs = [
            c.submit(state, u, self.weights[i])
            for i, (c, u) in enumerate(zip(self.clients, updates))
        ]
        layout = self.config.layout(state)
        agg = aggregate_locally(
            layout,
            [layout.pack(s.values) for s in subs],
            threshold=len(self.clients) // 2 + 1,
            bits=BITS,
            dropouts=dropouts,
        )
        return updates, subs, agg


def plaintext(fed, state, updates, included):
    cfg = fed.config
    w = {i: fed.weights[i] for i in included}
    out = {}
    for name, current in state.adapters.items():
        m = expert_of(name)
        who = [i for i in included if m is None or m in updates[i].chosen]
        base = current.double().numpy()
        if len(who) < cfg.params.min_count:
            out[name] = base
            continue
        deltas = [updates[i].delta[name].double().numpy() for i in who]
        out[name] = base + clipped_mean(deltas, [w[i] for i in who], cfg.params.delta_bound)
    return out, w


@pytest.mark.parametrize(("dropouts", "min_count"), [({}, 2), ({2: "masked_input"}, 2), ({}, 3)])
def test_round_through_secure_sums_equals_plaintext(dropouts, min_count):
    fed = Federation(4, min_count=min_count)
    state = fed.state
    updates, _, agg = fed.round(state, dropouts)
    included = [i for i in range(4) if i not in dropouts]
    assert agg.included == included
    new = next_state(fed.config, state, agg.sums)
    want, w = plaintext(fed, state, updates, included)
    q = FixedPointCodec(clip=CHANNEL_BOUND, bits=BITS, max_clients=4).max_error_per_client
    n = len(included)
    counts = np.zeros(4)
    for i in included:
        counts[list(updates[i].chosen)] += 1
    np.testing.assert_array_equal(new.expert_counts, counts)
    assert np.any((counts > 0) & (counts < 2))  # some expert has a single trainer
    moved = 0
    for name, current in state.adapters.items():
        m = expert_of(name)
        who = [i for i in included if m is None or m in updates[i].chosen]
        update = want[name] - current.double().numpy()
        got = new.adapters[name].double().numpy()
        if len(who) < min_count:
            np.testing.assert_array_equal(got, current.double().numpy())
            continue
        total = sum(w[i] for i in who)
        tol = (n * fed.config.params.delta_bound * q + np.abs(update) * n * q) / (total - n * q)
        assert np.all(np.abs(got - want[name]) <= tol + 1e-6 * np.abs(want[name]) + 1e-7), name
        moved += int(np.max(np.abs(update)) > 100 * np.max(tol))
    assert moved > 0  # the test would see a wrong ratio: the updates dwarf the tolerance


def test_every_submission_is_the_full_vector_with_zeros_for_untrained_experts():
    fed = Federation(3)
    updates, subs, _ = fed.round(fed.state)
    layout = DDOMEStrategy(fed.config).layout(fed.state.to_global())  # the server half's
    for update, sub in zip(updates, subs):
        assert set(sub.values) == {s.name for s in layout.segments}
        assert len(update.chosen) == 2 and len(set(update.chosen)) == 2
        np.testing.assert_array_equal(
            sub.values["expert_count"] > 0, np.isin(range(4), update.chosen)
        )
        for name in fed.state.adapters:
            m = expert_of(name)
            value = sub.values["delta:" + name]
            if m is not None and m not in update.chosen:
                assert not np.any(value)
            elif m is None:
                assert np.any(value)  # the gate always trains


def test_unseen_institution_gets_a_valid_zero_shot_choice_after_federated_rounds():
    fed = Federation(3)
    server = DDOMEStrategy(fed.config)
    state = server.initial_state(fed.state.to_global())
    for r, dropouts in enumerate([{}, {1: "masked_input"}]):
        local = DDOMEState.from_global(state, 4, r)
        updates = [
            c.train(
                local, fed.blocks[i], fed.emb[i], StepSettings(DP, 2, 4, 1e-2, seed=r + i),
                RecordedCharges(), noise_generator(r + i),
            )
            for i, c in enumerate(fed.clients)
        ]  # fmt: skip
        # the choice was charged in train; the submission charges nothing beyond DP-SGD
        assert all(u.facts.dp_event() == dp_sgd_event(0.8, 4 / 12, 2) for u in updates)
        subs = [c.submit(local, u, 0.375) for c, u in zip(fed.clients, updates)]
        layout = server.layout(state)
        agg = aggregate_locally(
            layout, [layout.pack(s.values) for s in subs], threshold=2, bits=BITS,
            dropouts=dropouts,
        )  # fmt: skip
        assert agg.included == [i for i in range(3) if i not in dropouts]
        new = server.aggregate(state, agg.sums)
        assert not torch.equal(new.adapters[f"{GATE}.0.weight"], state.adapters[f"{GATE}.0.weight"])
        state = new
    unseen = model()  # a new institution: never trained, downloads the state, has no labels
    load_ddome_state(unseen, state.adapters)
    blocks = ids(6, seed=99)
    emb = common_embedding(unseen, blocks)
    choice = zero_shot(unseen, emb, 2)
    with torch.no_grad():
        mean = torch.softmax(gate_logits(unseen, emb), -1).mean(0)
    assert choice.experts == tuple(int(i) for i in torch.topk(mean, 2).indices)
    assert len(set(choice.experts)) == 2 and all(0 <= e < 4 for e in choice.experts)
    assert choice.per_sample.shape == (6,)
    assert set(choice.per_sample.tolist()) <= set(choice.experts)
    assert np.isfinite(zero_shot_loss(unseen, blocks, choice))


def test_zero_shot_follows_the_gate_and_uses_only_the_chosen_expert_per_sample():
    m = exercised(model())
    blocks = ids(4, seed=7)
    emb = common_embedding(m, blocks)
    with torch.no_grad():
        last = ddome_gate(m)[2]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 3.0, -3.0, 2.0]))
    choice = zero_shot(m, emb, 2)
    assert choice.experts == (1, 3)
    assert choice.per_sample.tolist() == [1, 1, 1, 1]
    before = zero_shot_loss(m, blocks, choice)
    layer = ddome_layers(m)[0][1]
    with torch.no_grad():
        layer.experts_B[3].weight.add_(1.0)  # chosen, but no sample uses it
        assert zero_shot_loss(m, blocks, choice) == before
        layer.experts_B[1].weight.add_(1.0)
        assert zero_shot_loss(m, blocks, choice) != before


def test_an_anchor_client_pulls_the_gate_towards_its_expert():
    m = model()
    blocks = ids(16, seed=3)
    emb = common_embedding(m, blocks)
    state = DDOMEState(adapters=ddome_state(m), expert_counts=np.zeros(4))

    def anchor_probability() -> float:
        with torch.no_grad():
            return float(torch.softmax(gate_logits(m, emb), -1)[:, 3].mean())

    before = anchor_probability()
    client = DDOMEClient(DDOMEConfig(ADAPTER, params=DDOMESection(anchor_coef=1.0)), m, anchor=3)
    update = client.train(
        state, blocks, emb, StepSettings(None, 10, 8, 1e-2, seed=0), RecordedCharges()
    )
    assert update.chosen[0] == 3
    assert anchor_probability() > before + 0.2


def test_evaluation_scores_the_mixture_the_institution_trains():
    m = exercised(model())
    blocks = ids(5)
    emb = common_embedding(m, blocks)
    metrics = evaluate_choice(m, blocks, emb, (1, 3), batch_size=2)
    with torch.no_grad():
        expected = per_sample_loss(m, blocks, emb, (1, 3)).mean()
        other = evaluate_choice(m, blocks, emb, (0, 2))
    assert metrics.loss == pytest.approx(float(expected), rel=1e-5)
    assert metrics.tokens == 5 * 11 and 0.0 <= metrics.accuracy <= 1.0
    assert other.loss != pytest.approx(metrics.loss)  # the choice matters


def test_the_broadcast_form_round_trips_and_refuses_other_counts():
    state = DDOMEState({"w": torch.ones(2)}, np.array([0.0, 2.0, 1.0, 0.0]), round=3)
    broadcast = state.to_global()
    assert set(broadcast.extras) == {EXPERT_COUNTS}
    back = DDOMEState.from_global(broadcast, num_experts=4, round=3)
    np.testing.assert_array_equal(back.expert_counts, state.expert_counts)
    empty = DDOMEState.from_global(GlobalState(broadcast.adapters, broadcast.routing), 4)
    assert not empty.expert_counts.any()
    with pytest.raises(StrategyError):
        DDOMEState.from_global(broadcast, num_experts=5)
    with pytest.raises(StrategyError):
        extra = {**broadcast.extras, "other": np.zeros(1)}
        DDOMEState.from_global(GlobalState(broadcast.adapters, broadcast.routing, extra), 4)
