"""FedMoE, coordinator side: modular aggregation from per-expert secure sums and counts.

Dense entries: ``sum(w delta) / sum(w)`` over every included client. Each expert:
``sum(w delta) / sum(w)`` over the clients that hold it, and only when at least ``min_count``
(>= 2) of them do; otherwise it keeps its global value. The coordinator sees the per-expert
number of holders in the sum, never who holds what (see ``clients.fedmoe``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from clients.fedmoe import FedMoEConfig
from clients.strategy import GlobalState, SubmissionLayout
from coordinator.strategy import expert_weighted_update, summed_routing


@dataclass(frozen=True)
class FedMoECoordinator:
    """Coordinator side of FedMoE (the same :class:`FedMoEConfig` as the clients)."""

    config: FedMoEConfig

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(state)

    def aggregate(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        values = self.layout(state).unpack(sums, partial=True)
        adapters = expert_weighted_update(
            state,
            values,
            min_count=self.config.min_count,
            min_weight=0.5 / self.config.max_examples,
        )
        return GlobalState(adapters=adapters, routing=summed_routing(state.routing, values))
