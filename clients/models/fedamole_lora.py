"""FedAMoLE's adapter: a shared LoRA expert plus domain LoRA experts routed by their own keys.

Each target ``nn.Linear`` becomes (FedAMoLE, arXiv 2411.19128)::

    q = W_tp x                               token projection, d -> r
    k_e = A_e x                              key of expert e: its own LoRA-A output
    p = softmax_{e in held}(k_e . q / sqrt(r)),  top-k, renormalised -> w_e
    y = base(x) + s B_s A_s x + s sum_e w_e B_e A_e x

over the experts this client holds (``held``, set per round by the assignment). Every expert
is its own pair of ``nn.Linear`` so a client's non-held experts can be frozen (no gradient, no
DP noise) and skipped. All held experts are computed densely per token and the batch stays on
dimension 0 everywhere, so Opacus' stock ``nn.Linear`` grad sampler gives exact per-sample
gradients (no flat token gathering across the batch). The Switch load-balance loss is kept per
sample, as per-sample clipping requires.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from clients.models.adapter_state import copy_state
from clients.models.adapter_state import layer_parameters
from clients.models.adapter_state import load_state
from clients.models.lora_experts import ExpertShape
from clients.models.lora_experts import expert_factors
from clients.models.lora_experts import wrap_targets
from clients.models.padding import mean_token_loss
from clients.models.padding import model_input


class AMoLEError(ValueError):
    """The FedAMoLE adapter was configured or used wrongly (the message names the field)."""


@dataclass(frozen=True)
class AMoLEConfig(ExpertShape):
    """Adapter shape: ``num_experts`` domain experts of rank ``rank`` per target, top-``top_k``.

    Paper defaults are 30 experts, rank 8, alpha 16, top-2 and a load-balance weight of 0.001.
    """

    error: ClassVar[type[Exception]] = AMoLEError
    nonnegative: ClassVar[tuple[str, ...]] = ("load_balance_coef",)

    num_experts: int = 8
    load_balance_coef: float = 0.001


class AMoLELinear(nn.Module):
    """A frozen ``nn.Linear`` with FedAMoLE's shared expert, token projection and domain experts."""

    def __init__(self, base: nn.Linear, config: AMoLEConfig) -> None:
        super().__init__()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        d, out, r = base.in_features, base.out_features, config.rank
        self.base = base
        self.rank = r
        self.top_k = config.top_k
        self.scaling = config.scaling
        self.token_proj = nn.Linear(d, r, bias=False, **kw)
        self.shared_A = nn.Linear(d, r, bias=False, **kw)
        self.shared_B = nn.Linear(r, out, bias=False, **kw)
        self.experts_A, self.experts_B = expert_factors(base, r, config.num_experts)
        nn.init.zeros_(self.shared_B.weight)
        self.held: tuple[int, ...] = tuple(range(config.num_experts))
        self.last_load_balance: torch.Tensor | None = None
        self.recording: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.token_proj(x)
        keys = torch.stack([self.experts_A[e](x) for e in self.held], dim=-2)  # (..., h, r)
        probs = torch.softmax(((keys * q.unsqueeze(-2)).sum(-1) / math.sqrt(self.rank)).float(), -1)
        top_values, top_indices = torch.topk(probs, self.top_k, dim=-1)
        top_values = top_values / top_values.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top_indices, top_values).to(x.dtype)
        out = self.base(x) + self.scaling * self.shared_B(self.shared_A(x))
        for j, e in enumerate(self.held):
            out = out + self.scaling * self.experts_B[e](keys[..., j, :] * gates[..., j : j + 1])
        held = len(self.held)
        batch = x.shape[0]
        chosen = F.one_hot(top_indices, held).sum(-2).to(probs.dtype)
        f = chosen.reshape(batch, -1, held).mean(1) / self.top_k
        p = probs.reshape(batch, -1, held).mean(1)
        self.last_load_balance = held * (f * p).sum(-1)  # Switch loss per sample: 1 if uniform
        if self.recording is not None:
            tokens = tuple(range(1, x.dim() - 1))
            self.recording.append((q.detach().mean(tokens), keys.detach().mean(tokens)))
        return out

    def __getstate__(self) -> dict:
        # The last loss belongs to an autograd graph, which cannot be deep-copied or pickled.
        return {**super().__getstate__(), "last_load_balance": None}


def attach_amole(model: nn.Module, config: AMoLEConfig) -> nn.Module:
    """Wrap every target ``nn.Linear`` in place, freeze the base model, and return the model."""
    if amole_layers(model):
        raise AMoLEError("model already carries FedAMoLE adapters")
    wrap_targets(model, config, lambda base: AMoLELinear(base, config))
    model.amole_config = config
    return model


def amole_layers(model: nn.Module) -> list[tuple[str, AMoLELinear]]:
    """``(name, layer)`` of every FedAMoLE layer, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AMoLELinear)]


def amole_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every adapter parameter (held or not), in a stable order shared by all clients."""
    yield from layer_parameters(amole_layers(model))


def amole_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of every adapter parameter (the strategy's global adapters)."""
    return copy_state(amole_parameters(model))


def load_amole_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the adapters (same names and shapes, else :class:`AMoLEError`)."""
    load_state(amole_parameters(model), state, AMoLEError)


def set_held(model: nn.Module, held: Mapping[str, Sequence[int]]) -> None:
    """Route each layer over its ``held`` experts; only those (and the shared parts) train."""
    layers = dict(amole_layers(model))
    if set(held) != set(layers):
        raise AMoLEError(f"held experts must be given for exactly the layers {sorted(layers)}")
    for name, layer in layers.items():
        experts = tuple(sorted({int(e) for e in held[name]}))
        if len(experts) < layer.top_k or not all(0 <= e < len(layer.experts_A) for e in experts):
            raise AMoLEError(
                f"{name}: held experts {experts} must be >= top_k ({layer.top_k}) valid indices"
            )
        layer.held = experts
        for part in (layer.token_proj, layer.shared_A, layer.shared_B):
            part.requires_grad_(True)
        for e in range(len(layer.experts_A)):
            layer.experts_A[e].requires_grad_(e in experts)
            layer.experts_B[e].requires_grad_(e in experts)


def load_balance(model: nn.Module) -> torch.Tensor:
    """Per-sample Switch loss [B] of the last forward, averaged over FedAMoLE layers."""
    losses = [layer.last_load_balance for _, layer in amole_layers(model)]
    if not losses or any(loss is None for loss in losses):
        raise AMoLEError("no forward pass has run through FedAMoLE adapters")
    return torch.stack(losses).mean(0)  # type: ignore[arg-type]


def per_sample_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-record loss [B]: mean next-token cross-entropy over the record's tokens + coef * load
    balance."""
    loss = mean_token_loss(model(input_ids=model_input(ids)).logits, ids)
    coef = model.amole_config.load_balance_coef
    return loss + coef * load_balance(model) if coef > 0 else loss


@contextmanager
def recording(model: nn.Module) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """While active, each layer records per-sample means (over tokens) of ``q`` [B, r] and of its
    held experts' keys [B, h, r] for every forward, under its name."""
    layers = amole_layers(model)
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, layer in layers:
        layer.recording = records.setdefault(name, [])
    try:
        yield records
    finally:
        for _, layer in layers:
            layer.recording = None


@torch.no_grad()
def projections(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 8
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: per-block mean token projection [N, r] and held experts' keys [N, h, r]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with recording(model) as records:
            for start in range(0, blocks.shape[0], batch_size):
                model(input_ids=model_input(blocks[start : start + batch_size].to(device)))
    finally:
        model.train(was_training)
    return {
        name: (torch.cat([q for q, _ in rec]).cpu(), torch.cat([k for _, k in rec]).cpu())
        for name, rec in records.items()
    }
