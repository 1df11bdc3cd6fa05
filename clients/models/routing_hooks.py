"""Restrict the routers of MoE-LoRA layers from outside, through forward hooks (FedMoE's
sub-MoE: tokens must not reach experts a client does not hold).

The hook acts on the trainable router module's output: ``router`` (dense layers, the whole
logits) or ``router_delta`` (native layers, added to the frozen base gate's logits). Adding a
constant to that output leaves Opacus' per-sample gradients exact: its grad sampler sees the
module's input and the gradient of its output (taken after forward hooks), and a constant shift
changes neither. A forward hook must not be used to *read* that output for a loss term: the
tensor it sees bypasses the backward hook Opacus adds afterwards, so the term's gradient would be
missing from the per-sample gradients (use ``clients.models.moe_lora.router_probabilities``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from clients.models.moe_lora import MoELoRALinear
from clients.models.moe_lora import NativeMoELoRA

BLOCKED_LOGIT = -1.0e4
"""Added to the logit of an expert a client does not hold: its softmax weight is exp(-1e4) = 0."""


def routed_layers(model: nn.Module) -> list[tuple[str, MoELoRALinear | NativeMoELoRA]]:
    """``(name, layer)`` of every MoE-LoRA layer, in the order of ``routing_statistics``."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, MoELoRALinear | NativeMoELoRA)
    ]


def _trainable_router(layer: MoELoRALinear | NativeMoELoRA) -> nn.Linear:
    return layer.router if isinstance(layer, MoELoRALinear) else layer.router_delta


@contextmanager
def restrict_routing(model: nn.Module, allowed: np.ndarray) -> Iterator[None]:
    """Inside the block, layer l routes only to experts e with ``allowed[l, e]``.

    Every layer must allow at least ``top_k`` experts (a token picks top_k distinct experts).
    """
    layers = routed_layers(model)
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != (len(layers), layers[0][1].num_experts if layers else 0):
        raise ValueError(
            f"allowed has shape {allowed.shape}, the model routes {len(layers)} layers"
        )
    top_k = layers[0][1].top_k
    short = [name for (name, _), row in zip(layers, allowed, strict=True) if row.sum() < top_k]
    if short:
        raise ValueError(f"layers {short[:3]} allow fewer than top_k={top_k} experts")
    handles = []
    for (_, layer), row in zip(layers, allowed, strict=True):
        router = _trainable_router(layer)
        shift = torch.where(torch.from_numpy(row), 0.0, BLOCKED_LOGIT)

        def hook(module: nn.Module, args: object, out: torch.Tensor, shift=shift) -> torch.Tensor:
            return out + shift.to(device=out.device, dtype=out.dtype)

        handles.append(router.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
