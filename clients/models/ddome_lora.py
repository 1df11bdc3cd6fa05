"""DDOME's model: LoRA experts mixed per sample by a gate that reads a frozen common embedding.

DDOME (arXiv 2306.08586) embeds each sample once with a frozen common expert, x̂ = W_c(x); a
gating MLP scores the M experts from x̂ and the MoE output mixes the chosen experts with the
gate's weights. Here the common expert is the frozen base model (mean-pooled last hidden
state, adapters off) and the experts are LoRA adapters: in every target ``nn.Linear``::

    y = base(x) + s * sum_{m in chosen} g_m(x̂) B_m A_m x

with g the gate's softmax renormalised over the chosen experts, one weight per SAMPLE (the
paper mixes whole-model experts per sample; mixing their LoRA deltas per sample in every layer
is the adapter form of that). Each expert is its own pair of ``nn.Linear`` and the gate is a
``Sequential`` of ``nn.Linear`` fed with the per-sample embedding, so Opacus' stock grad sampler
gives exact per-sample gradients (batch on dimension 0 everywhere).
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from clients.contract.records import PAD_ID
from clients.models.adapter_state import copy_state
from clients.models.adapter_state import layer_parameters
from clients.models.adapter_state import load_state
from clients.models.lora_experts import ExpertShape
from clients.models.lora_experts import expert_factors
from clients.models.lora_experts import wrap_targets
from clients.models.padding import mean_token_loss
from clients.models.padding import model_input

GATE = "ddome_gate"


class DDOMEError(ValueError):
    """The DDOME model was configured or used wrongly (the message names the field)."""


@dataclass(frozen=True)
class DDOMEAdapterConfig(ExpertShape):
    """``num_experts`` LoRA experts (rank, alpha) on ``target_modules``; each client trains
    ``top_k`` of them (paper: K = 2); the gate has one hidden layer of ``gate_hidden``."""

    error: ClassVar[type[Exception]] = DDOMEError
    field_prefix: ClassVar[str] = "ddome."
    positive_ints: ClassVar[tuple[str, ...]] = ("gate_hidden",)

    gate_hidden: int = 64


class DDOMELinear(nn.Module):
    """A frozen ``nn.Linear`` plus M LoRA experts weighted by per-sample gates ``[B, M]``."""

    def __init__(self, base: nn.Linear, config: DDOMEAdapterConfig) -> None:
        super().__init__()
        self.base = base
        self.scaling = config.scaling
        self.experts_A, self.experts_B = expert_factors(base, config.rank, config.num_experts)
        self.gates: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.gates is None:  # the common expert: the frozen base alone
            return out
        shape = (x.shape[0], *([1] * (x.dim() - 1)))
        for m in torch.nonzero(self.gates.detach().abs().sum(0)).flatten().tolist():
            weight = self.gates[:, m].to(x.dtype).reshape(shape)
            out = out + self.scaling * weight * self.experts_B[m](self.experts_A[m](x))
        return out

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "gates": None}


def attach_ddome(model: nn.Module, config: DDOMEAdapterConfig) -> nn.Module:
    """Add the experts to every target ``nn.Linear`` and the gate (``model.ddome_gate``) in
    place, freeze the base model, and return it."""
    if ddome_layers(model):
        raise DDOMEError("model already carries DDOME adapters")
    wrap_targets(model, config, lambda base: DDOMELinear(base, config))
    hidden = model.get_input_embeddings().embedding_dim
    weight = model.get_input_embeddings().weight
    gate = nn.Sequential(
        nn.Linear(hidden, config.gate_hidden),
        nn.ReLU(),
        nn.Linear(config.gate_hidden, config.num_experts),
    ).to(device=weight.device, dtype=weight.dtype)
    setattr(model, GATE, gate)
    model.ddome_config = config
    return model


def ddome_layers(model: nn.Module) -> list[tuple[str, DDOMELinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DDOMELinear)]


def ddome_gate(model: nn.Module) -> nn.Module:
    gate = getattr(model, GATE, None)
    if not isinstance(gate, nn.Module):
        raise DDOMEError("model has no DDOME gate; call attach_ddome() first")
    return gate


def ddome_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The gate's parameters, then every expert's, in a stable order shared by all clients."""
    for name, param in ddome_gate(model).named_parameters():
        yield f"{GATE}.{name}", param
    yield from layer_parameters(ddome_layers(model))


def ddome_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy_state(ddome_parameters(model))


def load_ddome_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the gate and experts (same names and shapes)."""
    load_state(ddome_parameters(model), state, DDOMEError)


def expert_of(name: str) -> int | None:
    """The expert index of an expert tensor's name, None for the gate."""
    for part in (".experts_A.", ".experts_B."):
        if part in name:
            return int(name.split(part, 1)[1].split(".")[0])
    return None


def set_trainable(model: nn.Module, chosen: Sequence[int]) -> None:
    """Only the gate and the ``chosen`` experts train (the others get no gradient, no noise)."""
    ddome_gate(model).requires_grad_(True)
    for _, layer in ddome_layers(model):
        for m in range(len(layer.experts_A)):
            layer.experts_A[m].requires_grad_(m in chosen)
            layer.experts_B[m].requires_grad_(m in chosen)


@torch.no_grad()
def common_embedding(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """x̂ [N, H]: the frozen base model's last hidden state, mean-pooled over each record's
    tokens (padding left out)."""
    layers = ddome_layers(model)
    for _, layer in layers:
        layer.gates = None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        parts = [
            _pooled(model, blocks[i : i + batch_size].to(device))
            for i in range(0, blocks.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(parts).cpu()


def _pooled(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    hidden = model(input_ids=model_input(ids), output_hidden_states=True).hidden_states[-1]
    real = (ids != PAD_ID).unsqueeze(-1).to(hidden.dtype)
    return (hidden * real).sum(1) / real.sum(1).clamp(min=1)


def gate_logits(model: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
    return ddome_gate(model)(embeddings)


def _mask(logits: torch.Tensor, chosen: Sequence[int]) -> torch.Tensor:
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[list(chosen)] = True
    return logits.masked_fill(~keep, float("-inf"))


def chosen_gates(logits: torch.Tensor, chosen: Sequence[int]) -> torch.Tensor:
    """Per-sample expert weights [B, M]: the gate's softmax over ``chosen`` (zeros elsewhere)."""
    return torch.softmax(_mask(logits, chosen).float(), -1)


def mixture_logits(model: nn.Module, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """LM logits with per-sample expert weights ``gates`` [B, M] (zeros: expert unused)."""
    layers = ddome_layers(model)
    for _, layer in layers:
        layer.gates = gates
    try:
        return model(input_ids=model_input(ids)).logits
    finally:
        for _, layer in layers:
            layer.gates = None


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return mean_token_loss(logits, ids)


def per_sample_loss(
    model: nn.Module,
    ids: torch.Tensor,
    embeddings: torch.Tensor,
    chosen: Sequence[int],
    anchor: int | None = None,
    anchor_coef: float = 0.0,
) -> torch.Tensor:
    """Per-block loss [B] of the joint gate-expert objective: the MoE output's next-token
    cross-entropy (gate softmax over ``chosen``), plus, for an anchor client,
    ``anchor_coef`` times the gate's cross-entropy towards its ``anchor`` expert."""
    logits = gate_logits(model, embeddings)
    gates = chosen_gates(logits, chosen)
    loss = _lm_loss(mixture_logits(model, ids, gates), ids)
    if anchor is not None and anchor_coef > 0:
        target = torch.full((ids.shape[0],), anchor, dtype=torch.long, device=ids.device)
        loss = loss + anchor_coef * F.cross_entropy(logits.float(), target, reduction="none")
    return loss


@torch.no_grad()
def top_experts(model: nn.Module, embeddings: torch.Tensor, k: int) -> tuple[int, ...]:
    """The ``k`` experts with the highest mean gate probability over ``embeddings`` (best first)."""
    probs = torch.softmax(gate_logits(model, embeddings.to(_device(model))).float(), -1)
    return tuple(int(m) for m in torch.topk(probs.mean(0), k).indices)


def _device(model: nn.Module) -> torch.device:
    return next(ddome_gate(model).parameters()).device
