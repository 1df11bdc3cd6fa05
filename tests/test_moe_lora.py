"""MoE-LoRA adapters: attach, routing statistics, load balance, adapter state, per-sample grads."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from clients.contract.routing import RoutingStats
from clients.models.loaders import tiny_dense_model
from clients.models.loaders import tiny_moe_model
from clients.models.moe_lora import AdapterStateError
from clients.models.moe_lora import MoELoRAConfig
from clients.models.moe_lora import MoELoRAConfigError
from clients.models.moe_lora import MoELoRALinear
from clients.models.moe_lora import NativeMoELoRA
from clients.models.moe_lora import NotAttachedError
from clients.models.moe_lora import UnsupportedModelError
from clients.models.moe_lora import adapter_parameters
from clients.models.moe_lora import adapter_state
from clients.models.moe_lora import attach
from clients.models.moe_lora import get_config
from clients.models.moe_lora import load_adapter_file
from clients.models.moe_lora import load_adapter_state
from clients.models.moe_lora import load_balance_loss
from clients.models.moe_lora import reset_routing_statistics
from clients.models.moe_lora import routing_statistics
from clients.models.moe_lora import save_adapter_state

VOCAB = 256
KINDS = ["mixtral", "qwen2_moe", "olmoe"]


def _ids(batch: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction
    )


def _perturb_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every adapter parameter (zero-initialised B factors too) a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _model(kind: str) -> torch.nn.Module:
    return tiny_dense_model(VOCAB) if kind == "dense" else tiny_moe_model(kind, VOCAB)


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_k": 5, "num_experts": 4}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"rank": 0}, "rank"),
        ({"alpha": 0.0}, "alpha"),
        ({"target_modules": ()}, "target_modules"),
        ({"load_balance_coef": -1.0}, "load_balance_coef"),
        ({"mode": "sparse"}, "mode"),
    ],
)
def test_config_rejects_bad_fields_by_name(kwargs, field):
    with pytest.raises(MoELoRAConfigError, match=field):
        MoELoRAConfig(**kwargs)


def test_config_is_immutable_and_normalises_targets():
    config = MoELoRAConfig(target_modules=["q_proj"])
    assert config.target_modules == ("q_proj",)
    assert config.scaling == pytest.approx(2.0)
    with pytest.raises(AttributeError):
        config.rank = 4  # type: ignore[misc]


# --- attach ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", *KINDS])
def test_attach_keeps_outputs_and_freezes_base(kind):
    model = _model(kind)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    attach(model, MoELoRAConfig(shared_expert=True))
    with torch.no_grad():
        after = model(ids).logits
    if kind == "dense":
        assert torch.equal(before, after)  # base(x) + 0 is bit-exact
    else:  # the native wrapper sums the k expert outputs in another order
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in adapter_parameters(model)}
    assert len(trainable) > 0
    wrapper = MoELoRALinear if kind == "dense" else NativeMoELoRA
    assert any(isinstance(m, wrapper) for m in model.modules())
    assert get_config(model).shared_expert


def test_dense_attach_targets_exactly_the_named_linears():
    model = attach(tiny_dense_model(VOCAB), MoELoRAConfig(target_modules=("q_proj", "down_proj")))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]
    assert wrapped == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_attach_errors_are_typed():
    with pytest.raises(UnsupportedModelError, match=r"no nn\.Linear named"):
        attach(tiny_dense_model(VOCAB), MoELoRAConfig(target_modules=("nope",)))
    with pytest.raises(UnsupportedModelError, match="native"):
        attach(tiny_dense_model(VOCAB), MoELoRAConfig(mode="native"))
    with pytest.raises(UnsupportedModelError, match="inside a native MoE block"):
        attach(tiny_moe_model("qwen2_moe", VOCAB), MoELoRAConfig(mode="dense"))
    model = attach(tiny_dense_model(VOCAB))
    with pytest.raises(UnsupportedModelError, match="already"):
        attach(model)
    bare = tiny_dense_model(VOCAB)
    for fn in (adapter_state, routing_statistics, load_balance_loss, get_config):
        with pytest.raises(NotAttachedError):
            fn(bare)


def test_dense_mode_on_a_moe_model_adapts_attention_only():
    model = attach(tiny_moe_model("mixtral", VOCAB), MoELoRAConfig(mode="dense"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]
    assert len(wrapped) == 4 and all("self_attn" in n for n in wrapped)
    assert not any(isinstance(m, NativeMoELoRA) for m in model.modules())


# --- routing --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", *KINDS])
def test_routing_statistics_add_up(kind):
    model = attach(_model(kind), MoELoRAConfig(num_experts=4, top_k=2))
    ids = _ids(batch=3, length=12)
    model.train()
    model(ids)
    model.eval()
    with torch.no_grad():
        model(ids[:2])
    stats = routing_statistics(model)
    tokens = 3 * 12 + 2 * 12
    n_layers = 8 if kind == "dense" else 2
    assert stats.counts.shape == (n_layers, 4) and stats.gate_sum.shape == (n_layers, 4)
    assert stats.tokens.tolist() == [tokens] * n_layers
    np.testing.assert_array_equal(stats.counts.sum(axis=1), 2 * stats.tokens)
    np.testing.assert_allclose(stats.mean_gate.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats.load.sum(axis=1), 1.0)
    assert stats.top_k == 2 and len(stats.layer_names) == n_layers
    reset_routing_statistics(model)
    assert routing_statistics(model).as_vector().sum() == 0


def test_native_statistics_come_from_the_models_router():
    model = tiny_moe_model("olmoe", VOCAB)
    gate = model.model.layers[0].mlp.gate
    ids = _ids(batch=2, length=8)
    seen = []
    gate.register_forward_hook(lambda _m, _i, out: seen.append(out[2].detach()))
    with torch.no_grad():
        model(ids)
    expected = torch.bincount(seen[0].reshape(-1), minlength=4).double()
    attach(model)
    with torch.no_grad():
        model(ids)
    stats = routing_statistics(model)
    np.testing.assert_array_equal(stats.counts[0], expected.numpy())
    assert stats.layer_names[0] == "model.layers.0.mlp"


@pytest.mark.parametrize("kind", ["dense", "mixtral"])
def test_top_k_gates_are_sparse_and_sum_to_one(kind):
    model = attach(_model(kind), MoELoRAConfig(num_experts=4, top_k=2))
    layer = next(m for m in model.modules() if isinstance(m, (MoELoRALinear, NativeMoELoRA)))
    captured = {}
    original = layer._route

    def spy(logits, renormalize):
        values, indices = original(logits, renormalize)
        captured["gates"] = torch.zeros(*indices.shape[:-1], 4).scatter(-1, indices, values)
        return values, indices

    layer._route = spy
    with torch.no_grad():
        model(_ids())
    gates = captured["gates"]
    assert gates.shape[:-1] == (3, 12)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 12))


def test_routing_stats_vector_round_trip_and_sum():
    model = attach(tiny_dense_model(VOCAB))
    model(_ids(seed=1))
    a = routing_statistics(model)
    model(_ids(seed=2))
    both = routing_statistics(model)
    reset_routing_statistics(model)
    model(_ids(seed=2))
    b = routing_statistics(model)
    summed = RoutingStats.from_vector(
        a.as_vector() + b.as_vector(), a.layer_names, a.num_experts, a.top_k
    )
    np.testing.assert_allclose(summed.counts, both.counts)
    np.testing.assert_allclose(summed.gate_sum, both.gate_sum, rtol=1e-12)
    np.testing.assert_allclose((a + b).tokens, both.tokens)
    assert a.as_vector().shape == (a.num_layers * (2 * a.num_experts + 1),)
    with pytest.raises(ValueError, match="shape"):
        RoutingStats.from_vector(np.zeros(3), a.layer_names, a.num_experts)


@pytest.mark.parametrize("kind", ["dense", "qwen2_moe"])
def test_load_balance_loss_is_positive_and_differentiable(kind):
    model = attach(_model(kind))
    with pytest.raises(NotAttachedError, match="forward"):
        load_balance_loss(model)
    model(_ids())
    loss = load_balance_loss(model)
    assert loss.ndim == 0 and loss.item() > 0
    per_sample = load_balance_loss(model, reduction="none")
    assert per_sample.shape == (3,) and (per_sample > 0).all()
    torch.testing.assert_close(per_sample.mean(), loss)
    loss.backward()
    router = "router.weight" if kind == "dense" else "router_delta.weight"
    grads = [p.grad for n, p in adapter_parameters(model) if n.endswith(router)]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# --- training and adapter state -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "mixtral"])
def test_training_changes_adapters_only_and_reaches_every_adapter(kind):
    model = attach(_model(kind), MoELoRAConfig(shared_expert=True))
    base_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    adapters_before = adapter_state(model)
    optimizer = torch.optim.Adam([p for _, p in adapter_parameters(model)], lr=1e-2)
    ids = _ids()
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        loss = _lm_loss(model(ids).logits, ids) + 0.01 * load_balance_loss(model)
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name
        optimizer.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[name]), name
    after = adapter_state(model)
    changed = [n for n in after if not torch.equal(after[n], adapters_before[n])]
    assert changed == list(after)  # after 3 steps every adapter tensor moved (A via B != 0)


@pytest.mark.parametrize("kind", ["dense", "olmoe"])
def test_adapter_state_safetensors_round_trip(kind, tmp_path):
    model = attach(_model(kind), MoELoRAConfig(shared_expert=True))
    _perturb_adapters(model)
    state = adapter_state(model)
    assert list(state) == [n for n, _ in adapter_parameters(model)]
    assert all(not t.requires_grad for t in state.values())
    path = tmp_path / "adapter.safetensors"
    save_adapter_state(path, state)
    loaded = load_adapter_file(path)
    assert list(loaded) == list(state)
    for name in state:
        assert loaded[name].dtype == state[name].dtype
        assert torch.equal(loaded[name], state[name])
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    other = attach(_model(kind), MoELoRAConfig(shared_expert=True))
    assert list(adapter_state(other)) == list(state)  # same names on another institution
    load_adapter_state(other, loaded)
    with torch.no_grad():
        assert torch.equal(other(ids).logits, expected)


def test_adapter_state_is_a_snapshot():
    model = attach(tiny_dense_model(VOCAB))
    state = adapter_state(model)
    name = next(iter(state))
    with torch.no_grad():
        dict(adapter_parameters(model))[name].add_(1.0)
    assert not torch.equal(state[name], dict(adapter_parameters(model))[name])


def test_attached_model_deep_copies_after_a_training_forward():
    model = attach(tiny_moe_model("mixtral", VOCAB))
    ids = _ids()
    model(ids)  # leaves a differentiable load-balance loss on every layer
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(ids).logits, model(ids).logits)
    assert list(adapter_state(clone)) == list(adapter_state(model))


def test_load_adapter_state_is_strict(tmp_path):
    model = attach(tiny_dense_model(VOCAB))
    state = adapter_state(model)
    first = next(iter(state))
    missing = dict(state)
    del missing[first]
    with pytest.raises(AdapterStateError, match="missing"):
        load_adapter_state(model, missing)
    with pytest.raises(AdapterStateError, match="unexpected"):
        load_adapter_state(model, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(AdapterStateError, match=re.escape(first)):
        load_adapter_state(model, {**state, first: torch.zeros(2, 2)})
    other_rank = attach(tiny_dense_model(VOCAB), MoELoRAConfig(rank=4))
    with pytest.raises(AdapterStateError, match="shape"):
        load_adapter_state(other_rank, state)
    path = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(AdapterStateError, match="not a sealmoe"):
        load_adapter_file(path)


# --- per-sample gradients under Opacus ------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", *KINDS])
def test_opacus_per_sample_gradients_match_brute_force(kind):
    torch.manual_seed(0)
    model = attach(_model(kind), MoELoRAConfig(shared_expert=True))
    _perturb_adapters(model)
    model.train()
    ids = _ids(batch=3, length=8)
    params = dict(adapter_parameters(model))
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        logits = gsm(ids).logits
        loss = _lm_loss(logits, ids, "sum") + 0.5 * load_balance_loss(model, "none").sum()
        loss.backward()
        per_sample = {n: p.grad_sample.clone() for n, p in params.items()}
        gsm.disable_hooks()
        for i in range(ids.shape[0]):
            one = ids[i : i + 1]
            loss_i = _lm_loss(model(one).logits, one, "sum") + 0.5 * load_balance_loss(model)
            grads = torch.autograd.grad(loss_i, list(params.values()))
            for (name, _), g in zip(params.items(), grads, strict=True):
                torch.testing.assert_close(per_sample[name][i], g, rtol=1e-4, atol=1e-6)
    finally:
        gsm._close()


def test_layers_limit_the_adapters_to_chosen_decoder_layers():
    model = attach(tiny_dense_model(VOCAB), MoELoRAConfig(target_modules=("q_proj",), layers=(-1,)))
    names = {n.rsplit(".", 2)[0] for n, _ in adapter_parameters(model)}
    assert names == {"model.layers.1.self_attn.q_proj"}  # the last of the two layers
    with pytest.raises(UnsupportedModelError, match="not a layer of a model with 2 layers"):
        attach(tiny_dense_model(VOCAB), MoELoRAConfig(layers=(5,)))
