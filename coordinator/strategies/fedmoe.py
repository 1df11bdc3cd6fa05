"""FedMoE, coordinator side: modular aggregation from per-expert secure sums and counts.

Dense entries: ``sum(w delta) / sum(w)`` over every included client. Each expert:
``sum(w delta) / sum(w)`` over the clients that hold it, and only when at least ``min_count``
(>= 2) of them do; otherwise it keeps its global value. The coordinator sees the per-expert
number of holders in the sum, never who holds what (see ``clients.strategies.fedmoe``). With the
deltas under CKKS the counts and weights are still read from the masked sum, and each encrypted
delta entry is scaled by ``bound / (its weight sum)`` (0 for experts not updated).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from audit.context import StrategyFacts
from clients.contract.layout import GlobalState, SubmissionLayout
from clients.strategies.fedmoe import FedMoEConfig
from coordinator.strategies.base import (
    expert_update_factors,
    expert_weighted_update,
    summed_routing,
)


@dataclass(frozen=True)
class FedMoECoordinator:
    """Coordinator side of FedMoE (the same :class:`FedMoEConfig` as the clients)."""

    config: FedMoEConfig

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(state)

    def aggregate(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        values = self.layout(state).unpack(sums, partial=True)
        adapters = expert_weighted_update(
            state, values, min_count=self.config.min_count, min_weight=self._min_weight
        )
        return GlobalState(adapters=adapters, routing=summed_routing(state.routing, values))

    def encrypted_update_factors(
        self, state: GlobalState, sums: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        return expert_update_factors(
            state, self.layout(state), sums,
            min_count=self.config.min_count, min_weight=self._min_weight,
        )  # fmt: skip

    def public_update(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        values = self.layout(state).unpack(sums, partial=True)
        return GlobalState(state.adapters, summed_routing(state.routing, values), state.extras)

    @property
    def _min_weight(self) -> float:
        return 0.5 / self.config.max_examples


AUDIT_FACTS = StrategyFacts(
    coordinator_sees="; per expert, how many institutions hold it (never which)"
)
"""What FedMoE releases and its coordinator sees, for the privacy report."""
