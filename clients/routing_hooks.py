"""Observe and restrict the routers of MoE-LoRA layers from outside, through forward hooks.

Strategies need two things from the routers without changing ``clients.moe_lora``: the router
probabilities of the current batch, per sample, to put a differentiable term on them (FedAlign's
KL regularizer), and a way to keep tokens away from experts a client does not hold (FedMoE).

Both act on the trainable router module's output: ``router`` (dense layers, the whole logits) or
``router_delta`` (native layers, added to the frozen base gate's logits). Adding a constant to
that output leaves Opacus' per-sample gradients exact: its grad sampler sees the module's input
and the gradient of its output, and a constant shift changes neither formula.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from clients.moe_lora import MoELoRALinear, NativeMoELoRA, get_config

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


class RouterCapture:
    """The router logits of the last forward, per layer; made by :func:`capture_routers`."""

    def __init__(self, layers: list[tuple[str, MoELoRALinear | NativeMoELoRA]]) -> None:
        self._trainable: list[torch.Tensor | None] = [None] * len(layers)
        self._base: list[torch.Tensor | None] = [None] * len(layers)
        self._native = [isinstance(layer, NativeMoELoRA) for _, layer in layers]

    def probabilities(self) -> list[torch.Tensor]:
        """Per layer, the full softmax router probabilities ``[B, T, E]`` (float32) of the last
        forward, differentiable with respect to the trainable router."""
        out = []
        for i, trainable in enumerate(self._trainable):
            if trainable is None:
                raise RuntimeError("no forward pass ran inside capture_routers()")
            logits = trainable
            if self._native[i]:
                base = self._base[i]
                assert base is not None  # set by the base gate's hook in the same forward
                logits = trainable + base.view(trainable.shape)
            out.append(torch.softmax(logits.float(), dim=-1))
        return out


@contextmanager
def capture_routers(model: nn.Module) -> Iterator[RouterCapture]:
    """Inside the block, every forward records each layer's router logits (see
    :class:`RouterCapture`)."""
    get_config(model)
    layers = routed_layers(model)
    capture = RouterCapture(layers)
    handles = []
    for i, (_, layer) in enumerate(layers):

        def keep(module: nn.Module, args: object, out: torch.Tensor, i: int = i) -> None:
            capture._trainable[i] = out

        handles.append(_trainable_router(layer).register_forward_hook(keep))
        if isinstance(layer, NativeMoELoRA):

            def keep_base(module: nn.Module, args: object, out: object, i: int = i) -> None:
                capture._base[i] = out[0] if isinstance(out, tuple) else out  # type: ignore[assignment]

            handles.append(layer.base.gate.register_forward_hook(keep_base))
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
