"""DDOME under secure aggregation, coordinator side: ratios of the full-vector secure sum.

The gate moves by sum(w delta) / sum(w) over every included client (FedAvg over all active
clients); expert m by sum(w delta_m) / sum_m(w) over the clients that trained it, when at least
``min_count`` did (the summed 0/1 counts say how many, never who); otherwise it keeps its value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from audit.context import ReleaseFacts
from audit.context import StrategyFacts
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import GlobalState
from clients.contract.layout import SubmissionLayout
from clients.models.ddome_lora import expert_of
from clients.strategies.ddome import DDOMEConfig
from clients.strategies.ddome import DDOMEState
from clients.strategies.ddome import ddome_config
from clients.strategies.experts import EXPERT_COUNT
from clients.strategies.experts import EXPERT_WEIGHT
from coordinator.strategies.base import ServerHalf
from coordinator.strategies.base import contributed_weight


def next_state(
    config: DDOMEConfig, state: DDOMEState, sums: Mapping[str, np.ndarray]
) -> DDOMEState:
    """The next state from the decoded mask-channel sum over the included clients."""
    values = config.layout(state).unpack(sums)
    total = contributed_weight(values, config.min_weight)
    floor = 0.5 * config.min_weight
    counts = np.rint(values[EXPERT_COUNT])
    expert_weight = values[EXPERT_WEIGHT]
    moves = (counts >= config.params.min_count) & (expert_weight >= floor)
    adapters: dict[str, torch.Tensor] = {}
    for name, current in state.adapters.items():
        m = expert_of(name)
        if m is not None and not moves[m]:
            adapters[name] = current.detach().clone()
            continue
        denominator = total if m is None else float(expert_weight[m])
        step = values[DELTA_PREFIX + name].reshape(tuple(current.shape)) / denominator
        adapters[name] = (current.detach().cpu().double() + torch.from_numpy(step)).to(
            current.dtype
        )
    return DDOMEState(adapters=adapters, expert_counts=counts, round=state.round + 1)


@dataclass(frozen=True)
class DDOMEStrategy:
    """DDOME's coordinator side over the federation's :class:`GlobalState` (the adapters, and
    the last round's per-expert counts as an extra)."""

    config: DDOMEConfig

    def _state(self, state: GlobalState) -> DDOMEState:
        return DDOMEState.from_global(state, self.config.adapter.num_experts)

    def initial_state(self, state: GlobalState) -> GlobalState:
        """The seeded adapters, and zero counts: no expert trained yet."""
        counts = np.zeros(self.config.adapter.num_experts)
        return DDOMEState(dict(state.adapters), counts).to_global()

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(self._state(state))

    def aggregate(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        return next_state(self.config, self._state(state), sums).to_global()


SERVER_HALF = ServerHalf(
    build=lambda config: DDOMEStrategy(ddome_config(config)),
    facts=StrategyFacts(
        update="adapter update (weighted LoRA-expert deltas, and the gate's)",
        releases_routing=False,
        extra_releases=(
            ReleaseFacts(
                what="expert choice (the gate's probabilities summed over the training blocks, "
                "L2 sensitivity 1); the experts trained, the update's zero pattern and the "
                "per-expert counts are its post-processing",
                mechanism="Gaussian mechanism",
                to_whom="nobody directly: its top-K shapes the masked (SecAgg+) update and the "
                "per-expert counts every institution receives",
            ),
        ),
        coordinator_sees="; per expert, how many institutions trained it in a round (never which)",
    ),
)
"""DDOME's server half and what its coordinator sees besides the sums (own adapters: no
routing statistics)."""
