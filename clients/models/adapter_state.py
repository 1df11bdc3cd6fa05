"""Adapters as a state: their parameters by stable name, copied out and loaded back.

Every adapter family (MoE-LoRA, FedAMoLE's, DDOME's) wraps frozen ``base`` layers; what the
federation averages is every other parameter, named ``<layer>.<parameter>`` in model order so
that every party lists them identically.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping

import torch
from torch import nn


def layer_parameters(
    layers: Iterable[tuple[str, nn.Module]],
) -> Iterator[tuple[str, nn.Parameter]]:
    """The adapter parameters of ``(name, layer)`` pairs: all but each layer's frozen base."""
    for layer_name, layer in layers:
        for name, param in layer.named_parameters():
            if not name.startswith("base."):
                yield f"{layer_name}.{name}", param


def copy_state(parameters: Iterable[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Detached clones of ``parameters``, in their order."""
    return {name: param.detach().clone() for name, param in parameters}


def load_state(
    parameters: Iterable[tuple[str, nn.Parameter]],
    state: Mapping[str, torch.Tensor],
    error: type[Exception],
) -> None:
    """Copy ``state`` into ``parameters`` (values are cast). Strict: the same names and shapes,
    else ``error`` naming what differs, with nothing copied."""
    params = dict(parameters)
    missing = [n for n in params if n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise error(
            f"adapter state does not match the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    for name, param in params.items():
        value = state[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(param.shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise error(
                f"adapter tensor {name!r} has shape {got}, model expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])
