"""Small synthetic MoE-LoRA states (names as ``clients.models.moe_lora`` makes them) for strategy
tests."""

from __future__ import annotations

from typing import Any
from typing import TypeVar

import numpy as np
import torch

from clients.contract.layout import GlobalState
from clients.contract.routing import RoutingStats
from clients.training.trainer import LocalTrainingResult
from clients.training.trainer import Metrics

C = TypeVar("C")

BITS = 16
BOUND = 0.05
MIN_WEIGHT = 0.01
"""The smallest public institution weight of the synthetic federations (weights are declared
in the config, never derived from data)."""
LAYERS = ("m.l0.up_proj", "m.l1.up_proj")
EXPERTS = 3
RANK = 2
IN, OUT = 5, 4
SHAPES = {
    f"{layer}.{name}": shape
    for layer in LAYERS
    for name, shape in (
        ("router.weight", (EXPERTS, IN)),
        ("lora_A.weight", (EXPERTS * RANK, IN)),
        ("lora_B.weight", (OUT, EXPERTS * RANK)),
        ("shared_A.weight", (RANK, IN)),
        ("shared_B.weight", (OUT, RANK)),
    )
}


def make_state(rng: np.random.Generator, routing: RoutingStats | None = None) -> GlobalState:
    adapters = {
        n: torch.tensor(rng.normal(size=s) * 0.1, dtype=torch.float32) for n, s in SHAPES.items()
    }
    state = GlobalState.initial(adapters, LAYERS, EXPERTS, top_k=2)
    return state if routing is None else GlobalState(state.adapters, routing)


def make_routing(rng: np.random.Generator, probs: tuple[float, ...]) -> RoutingStats:
    tokens = rng.integers(200, 600, size=len(LAYERS)).astype(np.float64)
    counts = np.stack([rng.multinomial(int(2 * t), probs) for t in tokens]).astype(float)
    return RoutingStats(LAYERS, counts, counts / 2.0, tokens, top_k=2)


def make_result(
    rng: np.random.Generator, bound: float, probs: tuple[float, ...] = (0.5, 0.3, 0.2)
) -> LocalTrainingResult:
    delta = {n: torch.tensor(rng.uniform(-bound, bound, size=s)) for n, s in SHAPES.items()}
    return LocalTrainingResult(
        delta=delta,
        routing=make_routing(rng, probs),
        metrics=Metrics(1.0, np.e, 0.5, 10),
        facts=None,
        steps=1,
    )


def expert_entries(name: str) -> np.ndarray:
    """Expert index per entry of a synthetic tensor, -1 for the shared expert (independent of
    ``clients.strategies.experts``: written from the shapes above)."""
    shape = SHAPES[name]
    if ".shared_" in name:
        return np.full(shape, -1)
    if name.endswith("router.weight"):
        return np.repeat(np.arange(EXPERTS)[:, None], IN, axis=1)
    if name.endswith("lora_A.weight"):
        return np.repeat((np.arange(EXPERTS * RANK) // RANK)[:, None], IN, axis=1)
    return np.repeat((np.arange(EXPERTS * RANK) // RANK)[None, :], OUT, axis=0)


def layer_of(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name.startswith(layer + "."))


def synthetic_config(config_type: type[C], params: Any, **fields: Any) -> C:
    """A per-expert strategy's config for the synthetic states: their bounds, the smallest
    public weight ``MIN_WEIGHT``, routing statistics on the mask channel, and ``params`` as its
    section."""
    fields = {"routing_channel": "mask", **fields}
    return config_type(
        min_weight=MIN_WEIGHT, delta_bound=BOUND, routing_bound=5000.0, params=params, **fields
    )
