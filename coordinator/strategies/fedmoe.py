"""FedMoE, coordinator side: modular aggregation from per-expert secure sums and counts.

Dense entries: ``sum(w delta) / sum(w)`` over every included client. Each expert:
``sum(w delta) / sum(w)`` over the clients that hold it, and only when at least ``min_count``
(>= 2) of them do; otherwise it keeps its global value. The coordinator sees the per-expert
number of holders in the sum, never who holds what (see ``clients.strategies.fedmoe``). With the
deltas under CKKS the counts and weights are still read from the masked sum, and each encrypted
delta entry is scaled by ``bound / (its weight sum)`` (0 for experts not updated).
"""

from __future__ import annotations

from dataclasses import dataclass

from audit.context import ReleaseFacts
from audit.context import StrategyFacts
from clients.strategies.fedmoe import FedMoEConfig
from clients.strategies.fedmoe import fedmoe_config
from coordinator.strategies.base import PerExpertCoordinator
from coordinator.strategies.base import ServerHalf


@dataclass(frozen=True)
class FedMoECoordinator(PerExpertCoordinator):
    """Coordinator side of FedMoE (the same :class:`FedMoEConfig` as the clients)."""

    config: FedMoEConfig


SERVER_HALF = ServerHalf(
    build=lambda config: FedMoECoordinator(fedmoe_config(config)),
    facts=StrategyFacts(
        extra_releases=(
            ReleaseFacts(
                what="validation signal (mean validation loss, clipped per block to [0, L_max], "
                "over the first m validation blocks); it never leaves, but steers the sub-MoE "
                "that later submissions reveal",
                mechanism="Gaussian mechanism, L2 sensitivity L_max / m",
                to_whom="no one (kept by the institution; post-processed into its sub-MoE)",
            ),
        ),
        coordinator_sees="; per expert, how many institutions hold it (never which)",
    ),
)
"""FedMoE's server half, and what its coordinator sees besides the sums."""
