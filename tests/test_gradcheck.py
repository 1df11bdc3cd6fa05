"""The opacus#820 guard: per-sample gradients of the DP path equal brute force on the real
MoE-LoRA adapters (dense and native MoE), and the check fails when they are corrupted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks
from torch import nn

from clients.models.loaders import tiny_dense_model
from clients.models.loaders import tiny_moe_model
from clients.models.moe_lora import MoELoRAConfig
from clients.models.moe_lora import RoutedLinear
from clients.models.moe_lora import attach
from clients.models.moe_lora import load_balance_loss
from clients.models.moe_lora import routing_statistics
from clients.training.trainer import per_sample_loss
from privacy import PerSampleGradientError
from privacy import assert_per_sample_gradients
from privacy import check_per_sample_gradients
from tests import adapter_fixtures
from tests.adapter_fixtures import token_ids


def ids(batch: int = 3) -> torch.Tensor:
    return token_ids(batch, length=10)


def exercised(model: nn.Module) -> nn.Module:
    return adapter_fixtures.exercised(model, scale=0.05)


def dense_model(coef: float = 0.01) -> nn.Module:
    config = MoELoRAConfig(rank=4, shared_expert=True, load_balance_coef=coef)
    return exercised(attach(tiny_dense_model(), config))


def lm_only(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(1)


def test_dense_moe_lora_per_sample_gradients_match_brute_force():
    model = dense_model()
    report = assert_per_sample_gradients(model, ids(), per_sample_loss)
    names = {p.name for p in report.parameters}
    assert any(n.endswith("router.weight") for n in names)
    assert any(n.endswith("lora_A.weight") for n in names)
    assert any(n.endswith("shared_B.weight") for n in names)
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.scale > 0 for p in report.parameters)  # every parameter really exercised
    assert max(p.max_rel_error for p in report.parameters) < 1e-4


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_native_moe_lora_per_sample_gradients_match_brute_force(kind, mode):
    model = exercised(attach(tiny_moe_model(kind), MoELoRAConfig(rank=4)))
    report = assert_per_sample_gradients(model, ids(), per_sample_loss, mode=mode)
    names = [p.name for p in report.parameters]
    assert any("router_delta" in n for n in names)
    assert any("down_B" in n for n in names)
    assert all(p.scale > 0 for p in report.parameters)


def test_ghost_clipped_sum_matches_brute_force_on_dense_adapters():
    report = assert_per_sample_gradients(dense_model(), ids(4), per_sample_loss, mode="ghost")
    assert report.max_grad_norm is not None and report.max_grad_norm > 0
    assert all(p.scale > 0 for p in report.parameters)


def batch_mean_aux_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """DELIBERATELY COUPLED: adds the batch-mean load-balance loss to every sample's loss."""
    return lm_only(model, batch) + 0.5 * load_balance_loss(model, reduction="mean")


def test_ghost_fails_with_a_batch_mean_load_balance_loss():
    """A batch-mean aux loss leaves the mean (hence hooks' per-sample gradients) unchanged but
    not ghost clipping's per-sample reweighting: the check catches it, on the routers."""
    model = dense_model()
    assert check_per_sample_gradients(model, ids(4), batch_mean_aux_loss).ok
    report = check_per_sample_gradients(model, ids(4), batch_mean_aux_loss, mode="ghost")
    assert not report.ok
    assert any(n.endswith("router.weight") for n in report.failed)


def test_check_fails_when_one_grad_sample_is_perturbed(monkeypatch):
    model = dense_model()
    target = model.get_submodule("model.layers.1.mlp.up_proj.lora_B")
    stock = GradSampleHooks.GRAD_SAMPLERS[nn.Linear]

    def perturbed(layer, activations, backprops):
        grads = stock(layer, activations, backprops)
        if layer is target:
            grads[layer.weight] = grads[layer.weight].clone()
            grads[layer.weight][0] *= 1.01
        return grads

    monkeypatch.setitem(GradSampleHooks.GRAD_SAMPLERS, nn.Linear, perturbed)
    report = check_per_sample_gradients(model, ids(), per_sample_loss)
    assert report.failed == ("model.layers.1.mlp.up_proj.lora_B.weight",)
    with pytest.raises(PerSampleGradientError, match=r"up_proj\.lora_B"):
        assert_per_sample_gradients(model, ids(), per_sample_loss)


def test_check_fails_for_corrupted_native_expert_grad_sampler(monkeypatch):
    model = exercised(attach(tiny_moe_model("mixtral"), MoELoRAConfig(rank=4)))
    stock = GradSampleHooks.GRAD_SAMPLERS[RoutedLinear]

    def swapped(layer, activations, backprops):  # samples 0 and 1 trade gradients
        grads = stock(layer, activations, backprops)
        return {p: g[[1, 0, *range(2, len(g))]] for p, g in grads.items()}

    monkeypatch.setitem(GradSampleHooks.GRAD_SAMPLERS, RoutedLinear, swapped)
    report = check_per_sample_gradients(model, ids(), per_sample_loss)
    assert set(report.failed) == {
        n for n, p in model.named_parameters() if p.requires_grad and "router" not in n
    }


class FlatDispatchMoELoRA(nn.Module):
    """DELIBERATELY BROKEN sparse dispatch: the routed tokens of the WHOLE batch are gathered
    into one flat tensor (sorted by expert) and fed to the expert Linears reshaped as [B, T, d].
    Shapes look per-sample to Opacus, but rows mix samples: the opacus#820 failure mode."""

    def __init__(self, base: nn.Linear, experts: int = 4, rank: int = 4) -> None:
        super().__init__()
        self.base, self.experts, self.rank = base, experts, rank
        self.router = nn.Linear(base.in_features, experts, bias=False)
        self.lora_A = nn.Linear(base.in_features, experts * rank, bias=False)
        self.lora_B = nn.Linear(experts * rank, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).softmax(-1)
        top = probs.argmax(-1)
        order = torch.argsort(top.reshape(-1), stable=True)
        gathered = x.reshape(-1, x.shape[-1])[order].reshape(x.shape)
        z = self.lora_A(gathered).unflatten(-1, (self.experts, self.rank))
        mask = F.one_hot(top.reshape(-1)[order], self.experts).reshape(*x.shape[:-1], -1)
        y = self.lora_B((z * mask.unsqueeze(-1)).flatten(-2)).reshape(-1, self.base.out_features)
        y = torch.empty_like(y).index_copy(0, order, y).reshape(*x.shape[:-1], -1)
        gate = probs.gather(-1, top.unsqueeze(-1))
        return self.base(x) + gate * y


def test_check_fails_for_flat_sparse_dispatch():
    model = tiny_dense_model()
    model.requires_grad_(False)
    mlp = model.model.layers[0].mlp
    mlp.up_proj = FlatDispatchMoELoRA(mlp.up_proj)
    exercised(model)
    for mode in ("hooks", "ghost"):
        report = check_per_sample_gradients(model, ids(), lm_only, mode=mode)
        assert not report.ok, mode
        assert {"model.layers.0.mlp.up_proj.lora_A.weight"} <= set(report.failed)


class SharedTableLM(nn.Module):
    """A parameter used outside its own module's forward: Opacus' hooks never see it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 8).requires_grad_(False)
        self.table = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 256)

    def forward(self, input_ids: torch.Tensor):
        h = self.emb(input_ids) @ self.table.weight  # bypasses table.forward

        class Out:
            logits = self.head(h)

        return Out


def test_check_reports_missing_per_sample_gradients():
    model = SharedTableLM()
    report = check_per_sample_gradients(model, ids(), lm_only)
    assert report.missing == ("table.weight",)
    assert report.failed == ("table.weight",)
    assert "missing" in report.summary()


def test_check_leaves_the_model_clean():
    model = dense_model()
    counters = routing_statistics(model).as_vector()
    check_per_sample_gradients(model, ids(), per_sample_loss)
    np.testing.assert_array_equal(routing_statistics(model).as_vector(), counters)
    for p in model.parameters():
        assert p.grad is None
        assert not hasattr(p, "grad_sample")
    assert all(not m._forward_hooks for m in model.modules())
    assert not model.training  # tiny models are built in eval mode; the check restores it
