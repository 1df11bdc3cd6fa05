"""FedMoE, client side: a personal sub-MoE chosen on the client, modular per-expert aggregation.

Each client holds, per MoE layer, a subset of the experts (all dense entries always). During the
first ``warmup_rounds`` rounds it trains the full MoE and records its activation pattern p(l, e)
(its share of layer l's routed slots that went to e). Afterwards, at the start of every round,
it searches its sub-MoE: the largest coverage θ in [0, 1] such that holding, in every layer, the
fewest experts (most used first, at least ``top_k``) whose usage reaches θ fits its memory budget
(``memory_fraction`` of all expert parameters), found by binary search on θ as in the paper.

Recommendation (named choice: the paper's uses other clients' p vectors, which the coordinator
must not see): the pattern searched is ``(1 - λ) p_i + λ p̄``, p̄ the broadcast global routing
distribution, so experts the federation uses for similar data can enter a sub-MoE after the
client's own (restricted) routing stopped seeing them. λ = ``recommend_weight``.

Training and inference route only to held experts
(:func:`clients.models.routing_hooks.restrict_routing`) and the other experts' entries, router rows
included, are held fixed. The submission always has the full length: zeros, a zero weight and a
zero count for experts not held, so the sums hide which experts a client holds; the coordinator
updates an expert only from ``min_count`` >= 2 holders.

"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from clients.contract.config import FederationConfig, FedMoESection
from clients.contract.layout import (
    DELTA_PREFIX,
    ROUTING,
    WEIGHT,
    GlobalState,
    StrategyError,
    Submission,
    SubmissionLayout,
    check_routing_matches,
)
from clients.models.routing_hooks import restrict_routing
from clients.strategies.base import TrainingPlan, example_weight
from clients.strategies.experts import (
    EXPERT_COUNT,
    EXPERT_WEIGHT,
    ExpertPartition,
    expert_segments,
    weighted_deltas,
)
from clients.strategies.fedavg import FedAvgConfig, checked_section, extended_config, moe_lora_half
from clients.training.trainer import LocalTrainingResult


@dataclass(frozen=True)
class FedMoEConfig(FedAvgConfig):
    """Public parameters of FedMoE (both sides must hold the same): FedAvg's weights, bounds
    and channels, and ``params``, the ``[aggregation.fedmoe]`` section, whose fields and ranges
    are declared once in :class:`~clients.contract.config.FedMoESection` (``memory_fraction``:
    the default budget alpha * M_k, a client may be given its own; ``recommend_weight``: λ of
    the recommendation; ``search_steps``: bisections of θ).
    """

    params: FedMoESection = field(default_factory=FedMoESection)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "params", checked_section(self.params))

    def layout(self, state: GlobalState) -> SubmissionLayout:
        """The per-expert segments (``clients.strategies.experts.expert_segments``)."""
        return SubmissionLayout(
            expert_segments(
                state,
                self.delta_bound,
                self.routing_bound,
                self.delta_channel,
                self.routing_channel,
            )
        )


def check_fraction(name: str, value: object, *, low_open: bool) -> None:
    """Refuse a value outside (0, 1] (``low_open``) or [0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0 < value <= 1 if low_open else 0 <= value <= 1):  # type: ignore[operator]
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise StrategyError(f"{name} must be a number in {interval}, got {value!r}")


def smallest_cover(pattern: np.ndarray, theta: float, minimum: int) -> np.ndarray:
    """Per layer, the fewest experts (most used first; ties by index) whose usage reaches
    ``theta`` of the layer's total, and never fewer than ``minimum``: bool (L, E)."""
    pattern = np.maximum(np.asarray(pattern, dtype=np.float64), 0.0)
    held = np.zeros(pattern.shape, dtype=bool)
    for layer, row in enumerate(pattern):
        order = np.argsort(-row, kind="stable")
        total = row.sum()
        cumulative = np.cumsum(row[order])
        reached = np.nonzero(cumulative >= theta * total - 1e-12)[0]
        size = int(reached[0]) + 1 if reached.size else row.size
        held[layer, order[: max(size, minimum)]] = True
    return held


def search_sub_moe(
    pattern: np.ndarray, sizes: np.ndarray, budget: float, minimum: int, steps: int
) -> tuple[np.ndarray, float]:
    """(held experts, θ): the largest coverage θ whose smallest cover fits ``budget``.

    ``sizes[l]``: parameters of one expert of layer l. Memory grows with θ, so θ is bisected.
    If even θ = 0 (``minimum`` experts per layer) exceeds the budget, that cover is returned with
    θ = 0: a layer cannot route with fewer experts than top_k.
    """

    def memory(held: np.ndarray) -> float:
        return float((held.sum(axis=1) * sizes).sum())

    best = smallest_cover(pattern, 0.0, minimum)
    if memory(full := smallest_cover(pattern, 1.0, minimum)) <= budget:
        return full, 1.0
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = 0.5 * (low + high)
        held = smallest_cover(pattern, mid, minimum)
        if memory(held) <= budget:
            low, best = mid, held
        else:
            high = mid
    return best, low


class FedMoEClient:
    """Client side of FedMoE. Remembers its activation pattern and rounds seen between rounds;
    its sub-MoE is a function of them and the broadcast routing (``held``: the last one used).
    ``memory_fraction`` overrides the config's default budget for this client."""

    def __init__(self, config: FedMoEConfig, memory_fraction: float | None = None) -> None:
        self.config = config
        self.memory_fraction = (
            config.params.memory_fraction if memory_fraction is None else memory_fraction
        )
        check_fraction("memory_fraction", self.memory_fraction, low_open=True)
        self.rounds_seen = 0
        self.pattern: np.ndarray | None = None
        self.held: np.ndarray | None = None

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(state)

    def memory(self) -> dict[str, np.ndarray]:
        """Rounds seen and the last activation pattern (from its noised routing statistics)."""
        if self.pattern is None:
            return {}
        return {"rounds_seen": np.array([float(self.rounds_seen)]), "pattern": self.pattern}

    def restore(self, memory: Mapping[str, np.ndarray]) -> None:
        if not memory:
            return
        if set(memory) != {"rounds_seen", "pattern"} or np.shape(memory["rounds_seen"]) != (1,):
            raise StrategyError(
                f"FedMoE memory must hold rounds_seen and pattern, got {sorted(memory)}"
            )
        self.rounds_seen = int(memory["rounds_seen"][0])
        self.pattern = np.asarray(memory["pattern"], dtype=np.float64)

    def select(self, state: GlobalState) -> np.ndarray:
        """This round's sub-MoE (bool (L, E)): everything during warm-up, else the search."""
        partition = ExpertPartition.of(state)
        shape = (partition.num_layers, partition.num_experts)
        if self.rounds_seen < self.config.params.warmup_rounds or self.pattern is None:
            return np.ones(shape, dtype=bool)
        lam = self.config.params.recommend_weight
        pattern = (1.0 - lam) * self.pattern + lam * state.routing_distribution
        sizes = np.zeros(shape[0])
        for owner in partition.owners.values():
            sizes[owner.layer] += float((owner.experts == 0).sum())
        budget = self.memory_fraction * float(sizes.sum() * shape[1])
        held, _ = search_sub_moe(
            pattern, sizes, budget, state.routing.top_k, self.config.params.search_steps
        )
        return held

    @contextmanager
    def session(self, model: nn.Module, state: GlobalState) -> Iterator[TrainingPlan]:
        """Routes only to the held experts and holds the others' entries fixed."""
        self.held = self.select(state)
        frozen = ExpertPartition.of(state).expert_mask(self.held)
        with restrict_routing(model, self.held):
            yield TrainingPlan(frozen=frozen)

    def submit(
        self, state: GlobalState, result: LocalTrainingResult, num_examples: int
    ) -> Submission:
        check_routing_matches(result.routing, state.routing)
        partition = ExpertPartition.of(state)
        held = self.select(state)  # the session's choice: nothing it depends on changed since
        w = example_weight(num_examples, self.config.max_examples)
        weights = w * held.astype(np.float64)
        values = weighted_deltas(partition, result.delta, w, weights, self.config.delta_bound)
        raw = {
            **{
                k: result.delta[k.removeprefix(DELTA_PREFIX)].detach().cpu().double().numpy()
                for k in values
            },
            WEIGHT: np.array([w]),
            EXPERT_WEIGHT: weights.ravel(),
            EXPERT_COUNT: held.astype(np.float64).ravel(),
            ROUTING: result.routing.as_vector(),
        }
        clipped = self.layout(state).clipped_fraction(raw)
        values.update({k: v for k, v in raw.items() if not k.startswith(DELTA_PREFIX)})
        self.pattern = np.asarray(result.routing.load, dtype=np.float64)
        self.rounds_seen += 1
        return Submission(values=values, clipped=clipped)


def fedmoe_config(config: FederationConfig) -> FedMoEConfig:
    """FedMoE's parameters from ``[aggregation.fedmoe]`` (identical on both sides)."""
    return extended_config(config, FedMoEConfig, config.aggregation.fedmoe)


CLIENT_HALF = moe_lora_half(lambda config: FedMoEClient(fedmoe_config(config)))
