"""FedAlign-MoE, coordinator side: per-expert weighted means and the alignment statistics.

From the secure sums only: each expert's ``sum(w s delta) / sum(w s)`` over the clients that kept
it (at least ``min_count`` of them), dense entries by ``sum(w delta) / sum(w)``, and per
(layer, expert) the mean and standard deviation of the alignment scores,
``M = sum(a) / n``, ``Sigma = sqrt(sum(a^2) / n - M^2)``, broadcast as extras for the clients'
next threshold (only where n reaches ``min_scorers``). With the deltas under CKKS the weights and
scores are still read from the masked sum, and each encrypted delta entry is scaled by
``bound / (its weight sum)`` (0 for experts not updated). See ``clients.strategies.fedalign`` for
the client side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from audit.context import StrategyFacts
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.strategies.fedalign import ALIGN_MEAN
from clients.strategies.fedalign import ALIGN_N
from clients.strategies.fedalign import ALIGN_SCORE
from clients.strategies.fedalign import ALIGN_SQUARE
from clients.strategies.fedalign import ALIGN_STD
from clients.strategies.fedalign import FedAlignConfig
from clients.strategies.fedalign import fedalign_config
from coordinator.strategies.base import PerExpertCoordinator
from coordinator.strategies.base import ServerHalf
from coordinator.strategies.base import summed_routing


@dataclass(frozen=True)
class FedAlignCoordinator(PerExpertCoordinator):
    """Coordinator side of FedAlign-MoE (the same :class:`FedAlignConfig` as the clients)."""

    config: FedAlignConfig

    def public_update(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        values = self.layout(state).unpack(sums, partial=True)
        if any(name not in values for name in (ALIGN_SCORE, ALIGN_SQUARE, ALIGN_N)):
            raise StrategyError("FedAlign needs the sum of the mask channel (weights, scores)")
        return GlobalState(
            adapters=state.adapters,
            routing=summed_routing(state.routing, values),
            extras=alignment_statistics(
                values, state.routing.counts.shape, self.config.params.min_scorers
            ),
        )


def alignment_statistics(
    values: Mapping[str, np.ndarray], shape: tuple[int, ...], min_scorers: int
) -> dict[str, np.ndarray]:
    """Mean, standard deviation and number of the scores per (layer, expert).

    Where fewer than ``min_scorers`` scores are in the sum, all three are 0: clients apply no
    threshold there anyway, and a mean over one client would broadcast that client's score.
    Counts are rounded (integers plus quantisation error).
    """
    n = np.rint(np.maximum(np.asarray(values[ALIGN_N]).reshape(shape), 0.0))
    enough = n >= min_scorers
    n = np.where(enough, n, 0.0)
    total = np.asarray(values[ALIGN_SCORE]).reshape(shape)
    squares = np.asarray(values[ALIGN_SQUARE]).reshape(shape)
    safe = np.maximum(n, 1.0)
    mean = np.where(enough, total / safe, 0.0)
    variance = np.where(enough, squares / safe - mean**2, 0.0)
    return {ALIGN_MEAN: mean, ALIGN_STD: np.sqrt(np.maximum(variance, 0.0)), ALIGN_N: n}


SERVER_HALF = ServerHalf(
    build=lambda config: FedAlignCoordinator(fedalign_config(config)), facts=StrategyFacts()
)
"""FedAlign-MoE's server half; it releases what FedAvg does (the alignment scores travel
inside the update's secure sum)."""
