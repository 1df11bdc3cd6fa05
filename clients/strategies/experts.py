"""Which adapter entries belong to which routed expert, and per-expert weighted submissions.

Strategies that decide per expert (FedAlign-MoE's weights and alignment, FedMoE's sub-MoE) need
to know, for every entry of every adapter tensor, its MoE layer and expert. In
``clients.models.moe_lora`` the expert axis follows from the parameter's module name:

* dense layers: ``router`` (E, in) one row per expert; ``lora_A`` (E*r, in) r rows per expert;
  ``lora_B`` (out, E*r) r columns per expert; ``shared_A`` / ``shared_B`` belong to no expert;
* native layers: ``router_delta`` (E, H) one row per expert; the ``RoutedLinear`` factors
  ``gate_up_A``, ``gate_up_B``, ``down_A``, ``down_B`` (E, out, in) one slice per expert.

A router row counts as part of its expert (named choice: the row that decides how much an
expert is used is aggregated with that expert). Entries of no expert are "dense".

Per-expert weighted means travel as one secure sum: a client multiplies each entry of its delta
by the weight of the entry's expert (or its dense weight) and submits those weights too
(``weight`` for dense entries, ``expert_weight`` and ``expert_count`` per (layer, expert)), so the
coordinator gets each expert's weighted mean as a ratio of sums (``coordinator.strategies.base``).
The weights and counts always go on the mask channel: the coordinator must read their sums, also
when the deltas go under CKKS (it then scales the encrypted sum entry by entry without reading it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import ROUTING
from clients.contract.layout import WEIGHT
from clients.contract.layout import Channel
from clients.contract.layout import GlobalState
from clients.contract.layout import LayoutError
from clients.contract.layout import Segment
from clients.contract.layout import StrategyError

EXPERT_WEIGHT = "expert_weight"


EXPERT_COUNT = "expert_count"


DENSE = -1
"""Owner value of an entry that belongs to no expert."""


_EXPERT_AXIS = {
    "router": 0,
    "lora_A": 0,
    "lora_B": 1,
    "router_delta": 0,
    "gate_up_A": 0,
    "gate_up_B": 0,
    "down_A": 0,
    "down_B": 0,
}


_DENSE_MODULES = frozenset({"shared_A", "shared_B"})


@dataclass(frozen=True)
class TensorOwner:
    """One adapter tensor's MoE layer (index into the routing layers) and per-entry expert."""

    layer: int
    experts: np.ndarray  # int, the tensor's shape: expert index or DENSE


@dataclass(frozen=True, eq=False)
class ExpertPartition:
    """Owners of every adapter tensor of a state, in state order; built by :meth:`of`."""

    owners: dict[str, TensorOwner]
    num_layers: int
    num_experts: int

    @classmethod
    def of(cls, state: GlobalState) -> ExpertPartition:
        """The partition of ``state.adapters`` over ``state.routing``'s layers and experts."""
        layers = state.routing.layer_names
        num_experts = state.routing.num_experts
        owners = {
            name: _owner(name, tuple(t.shape), layers, num_experts)
            for name, t in state.adapters.items()
        }
        return cls(owners=owners, num_layers=len(layers), num_experts=num_experts)

    def entry_weights(self, name: str, dense: float, experts: np.ndarray) -> np.ndarray:
        """Per entry of ``name``: its expert's value in ``experts`` (L, E), or ``dense``."""
        owner = self.owners[name]
        row = np.asarray(experts, dtype=np.float64)[owner.layer]
        return np.where(owner.experts == DENSE, dense, row[np.maximum(owner.experts, 0)])

    def expert_vector(
        self, values: Mapping[str, np.ndarray], layer: int, expert: int
    ) -> np.ndarray:
        """Expert ``expert`` of layer ``layer``: its entries of every tensor, concatenated."""
        parts = [
            np.asarray(values[name]).ravel()[(owner.experts == expert).ravel()]
            for name, owner in self.owners.items()
            if owner.layer == layer
        ]
        return np.concatenate(parts) if parts else np.zeros(0)

    def expert_mask(self, held: np.ndarray) -> dict[str, torch.Tensor]:
        """Per tensor, True where the entry belongs to an expert NOT in ``held`` (L, E) bool."""
        held = np.asarray(held, dtype=bool)
        out = {}
        for name, owner in self.owners.items():
            row = held[owner.layer]
            kept = np.where(owner.experts == DENSE, True, row[np.maximum(owner.experts, 0)])
            out[name] = torch.from_numpy(~kept)
        return out


def _owner(
    name: str, shape: tuple[int, ...], layers: tuple[str, ...], num_experts: int
) -> TensorOwner:
    matches = [i for i, layer in enumerate(layers) if name.startswith(layer + ".")]
    if len(matches) != 1:
        raise LayoutError(f"adapter tensor {name!r} belongs to no single routing layer")
    layer = matches[0]
    module = name[len(layers[layer]) + 1 :].rsplit(".", 1)[0]
    if module in _DENSE_MODULES:
        return TensorOwner(layer, np.full(shape, DENSE, dtype=np.int64))
    if module not in _EXPERT_AXIS:
        raise LayoutError(f"adapter tensor {name!r}: no known expert axis for {module!r}")
    axis = _EXPERT_AXIS[module]
    size = shape[axis]
    if size % num_experts:
        raise LayoutError(
            f"adapter tensor {name!r}: axis {axis} of size {size} does not split into "
            f"{num_experts} experts"
        )
    index = np.arange(size) // (size // num_experts)
    view = [1] * len(shape)
    view[axis] = size
    return TensorOwner(layer, np.broadcast_to(index.reshape(view), shape).copy())


def expert_segments(
    state: GlobalState,
    delta_bound: float,
    routing_bound: float,
    delta_channel: Channel,
    routing_channel: Channel,
) -> tuple[Segment, ...]:
    """The segments every per-expert strategy shares: deltas (``delta_channel``), the three
    weights (mask), routing (``routing_channel``)."""
    layers, experts = state.routing.num_layers, state.routing.num_experts
    return (
        *(
            Segment(DELTA_PREFIX + name, int(t.numel()), delta_channel, delta_bound)
            for name, t in state.adapters.items()
        ),
        Segment(WEIGHT, 1, "mask", 1.0),
        Segment(EXPERT_WEIGHT, layers * experts, "mask", 1.0),
        Segment(EXPERT_COUNT, layers * experts, "mask", 1.0),
        Segment(ROUTING, len(state.routing.as_vector()), routing_channel, routing_bound),
    )


def weighted_deltas(
    partition: ExpertPartition,
    delta: Mapping[str, torch.Tensor],
    dense_weight: float,
    expert_weights: np.ndarray,
    bound: float,
) -> dict[str, np.ndarray]:
    """``delta:<name>`` segments: each entry clipped to ``±bound``, times its owner's weight.

    ``expert_weights`` (L, E) in [0, 1]; ``dense_weight`` in [0, 1] for entries of no expert.
    """
    weights = np.asarray(expert_weights, dtype=np.float64)
    if weights.shape != (partition.num_layers, partition.num_experts):
        raise StrategyError(
            f"expert weights have shape {weights.shape}, expected "
            f"({partition.num_layers}, {partition.num_experts})"
        )
    if not (0.0 <= dense_weight <= 1.0) or np.any(weights < 0) or np.any(weights > 1):
        raise StrategyError("weights must lie in [0, 1] (their segments are bounded by 1)")
    out = {}
    for name, t in delta.items():
        if name not in partition.owners:
            raise LayoutError(f"delta has tensor {name!r} that the global state lacks")
        d = np.clip(t.detach().cpu().double().numpy(), -bound, bound)
        if d.shape != partition.owners[name].experts.shape:
            raise LayoutError(
                f"delta tensor {name!r} has shape {d.shape}, the global state "
                f"{partition.owners[name].experts.shape}"
            )
        out[DELTA_PREFIX + name] = partition.entry_weights(name, dense_weight, weights) * d
    return out
