"""Per-expert building blocks on real tiny models: which entries belong to which expert, router
restriction and capture through hooks (per-sample gradients stay exact), and the trainer's
``frozen`` and ``extra_loss`` arguments under real Opacus DP-SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.contract.layout import GlobalState
from clients.models.loaders import tiny_dense_model
from clients.models.loaders import tiny_moe_model
from clients.models.moe_lora import MoELoRAConfig
from clients.models.moe_lora import adapter_state
from clients.models.moe_lora import attach
from clients.models.moe_lora import load_adapter_state
from clients.models.moe_lora import reset_routing_statistics
from clients.models.moe_lora import router_probabilities
from clients.models.moe_lora import routing_statistics
from clients.models.routing_hooks import restrict_routing
from clients.strategies.experts import DENSE
from clients.strategies.experts import ExpertPartition
from clients.training.trainer import TrainerError
from clients.training.trainer import per_sample_loss
from clients.training.trainer import train_local
from privacy import DPConfig
from privacy import assert_per_sample_gradients

DP = DPConfig(8.0, 1e-5, 1.0, noise_multiplier=0.8)


def dense_model() -> torch.nn.Module:
    return attach(tiny_dense_model(), MoELoRAConfig(rank=2, shared_expert=True))


def native_model() -> torch.nn.Module:
    return attach(tiny_moe_model("mixtral"), MoELoRAConfig(rank=2))


def state_of(model: torch.nn.Module) -> GlobalState:
    stats = routing_statistics(model)
    return GlobalState.initial(adapter_state(model), stats.layer_names, stats.num_experts, 2)


def blocks(n: int = 6, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B factors, so that every expert changes the output."""
    gen = torch.Generator().manual_seed(seed)
    load_adapter_state(
        model,
        {n: torch.randn(t.shape, generator=gen) * 0.3 for n, t in adapter_state(model).items()},
    )


@pytest.mark.parametrize("make", [dense_model, native_model])
def test_partition_gives_each_expert_an_equal_share_of_each_layer(make):
    model = make()
    partition = ExpertPartition.of(state_of(model))
    per_layer = {}
    for name, owner in partition.owners.items():
        counts = np.bincount(owner.experts[owner.experts != DENSE], minlength=4)
        per_layer.setdefault(owner.layer, []).append(counts)
        assert set(np.unique(owner.experts)) <= {DENSE, 0, 1, 2, 3}
        if ".shared_" in name:
            assert np.all(owner.experts == DENSE)
        else:
            assert np.all(owner.experts != DENSE)
    assert sorted(per_layer) == list(range(partition.num_layers))
    for counts in per_layer.values():
        total = np.sum(counts, axis=0)
        assert total[0] > 0 and np.all(total == total[0])


@pytest.mark.parametrize("make", [dense_model, native_model])
def test_entries_of_blocked_experts_do_not_touch_the_output(make):
    model = make()
    randomize(model)
    state = state_of(model)
    partition = ExpertPartition.of(state)
    allowed = np.zeros((partition.num_layers, 4), dtype=bool)
    allowed[:, :2] = True
    ids = blocks()
    frozen = partition.expert_mask(allowed)  # True on the entries of experts 2 and 3

    def perturbed(mask_of: dict[str, torch.Tensor]) -> torch.Tensor:
        base = adapter_state(model)
        load_adapter_state(model, {n: t + 5.0 * mask_of[n] for n, t in base.items()})
        with torch.no_grad(), restrict_routing(model, allowed):
            out = model(input_ids=ids).logits
        load_adapter_state(model, base)
        return out

    with torch.no_grad(), restrict_routing(model, allowed):
        reset_routing_statistics(model)
        reference = model(input_ids=ids).logits
        counts = routing_statistics(model).counts
    assert np.all(counts[:, 2:] == 0) and np.all(counts[:, :2] > 0)
    torch.testing.assert_close(perturbed(frozen), reference)
    held_entries = {n: ~m for n, m in frozen.items()}
    assert (perturbed(held_entries) - reference).abs().max() > 1e-2
    # The hooks are gone after the block: blocked experts get tokens again.
    reset_routing_statistics(model)
    with torch.no_grad():
        model(input_ids=ids)
    assert routing_statistics(model).counts[:, 2:].sum() > 0


def test_restrict_routing_refuses_fewer_experts_than_top_k():
    model = dense_model()
    allowed = np.ones((len(routing_statistics(model).layer_names), 4), dtype=bool)
    allowed[3, 1:] = False
    with pytest.raises(ValueError, match="fewer than top_k=2"), restrict_routing(model, allowed):
        pass


@pytest.mark.parametrize("make", [dense_model, native_model])
def test_router_capture_and_masking_keep_per_sample_gradients_exact(make):
    model = make()
    randomize(model, seed=1)
    layers = len(routing_statistics(model).layer_names)
    allowed = np.ones((layers, 4), dtype=bool)
    allowed[:, 3] = False
    with restrict_routing(model, allowed):

        def loss(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
            base = per_sample_loss(m, ids)
            probs = router_probabilities(m)
            assert len(probs) == layers and probs[0].shape[0] == ids.shape[0]
            # A per-sample term on the router probabilities (squared share of expert 0).
            return base + torch.stack([p.mean(1)[:, 0] ** 2 for p in probs]).sum(0)

        assert_per_sample_gradients(model, blocks(4), loss)


def test_frozen_entries_stay_exactly_put_under_dp_noise():
    model = dense_model()
    state = state_of(model)
    allowed = np.ones((state.routing.num_layers, 4), dtype=bool)
    allowed[:, 1] = False
    frozen = ExpertPartition.of(state).expert_mask(allowed)
    result = train_local(
        model, blocks(16), dp=DP, steps=3, batch_size=4, seed=0, progress=False, frozen=frozen
    )
    for name, mask in frozen.items():
        delta = result.delta[name]
        assert torch.all(delta[mask] == 0), name
        assert delta[~mask].abs().max() > 0, name  # noise alone moves every other entry


def test_bad_frozen_and_extra_loss_are_named():
    model = dense_model()
    state = state_of(model)
    name = next(iter(state.adapters))
    with pytest.raises(TrainerError, match="unknown adapter tensors"):
        train_local(model, blocks(), dp=None, steps=1, batch_size=2, frozen={"x": torch.ones(1)})
    with pytest.raises(TrainerError, match=r"frozen\[.*\] has shape"):
        bad = {name: torch.zeros(1, dtype=torch.bool)}
        train_local(model, blocks(), dp=None, steps=1, batch_size=2, frozen=bad)
    with pytest.raises(TrainerError, match="one value per block"):
        train_local(
            model,
            blocks(),
            dp=None,
            steps=1,
            batch_size=2,
            extra_loss=lambda m, ids: torch.zeros(()),
        )
