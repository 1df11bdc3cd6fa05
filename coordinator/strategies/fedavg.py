"""FedAvg, coordinator side: the weighted mean of the summed adapter deltas (the weights are the
institutions' public ones, declared in the federation config)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from audit.context import StrategyFacts
from clients.contract.layout import CHANNEL_BOUND
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.contract.layout import SubmissionLayout
from clients.strategies.fedavg import FedAvgConfig
from clients.strategies.fedavg import fedavg_config
from coordinator.strategies.base import ServerHalf
from coordinator.strategies.base import contributed_weight
from coordinator.strategies.base import leading_deltas
from coordinator.strategies.base import summed_routing


@dataclass(frozen=True)
class FedAvgCoordinator:
    """Coordinator side of FedAvg: ``global += sum(w * delta) / sum(w)``; routing summed.

    Raises :class:`~clients.contract.layout.NoContribution` when ``sum(w)`` is below half of the
    smallest public weight (``0.5 * min_weight``): nobody contributed and the ratio would be
    quantisation noise. The weights are public, so ``sum(w)`` tells the coordinator nothing it
    could not compute from the config and the included institutions.
    """

    config: FedAvgConfig

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(state)

    def aggregate(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        """The next state; without the routing channel's sum (a CKKS sum the coordinator cannot
        read), the routing statistics are left as they were."""
        values = self.layout(state).unpack(sums, partial=True)
        if any(DELTA_PREFIX + name not in values for name in state.adapters):
            raise StrategyError("FedAvg needs the sum of the channel that carries w*delta")
        total = contributed_weight(values, self.config.min_weight)
        adapters: dict[str, torch.Tensor] = {}
        for name, current in state.adapters.items():
            delta = values[DELTA_PREFIX + name].reshape(tuple(current.shape)) / total
            new = current.detach().cpu().double() + torch.from_numpy(delta)
            adapters[name] = new.to(current.dtype)
        return GlobalState(adapters=adapters, routing=summed_routing(state.routing, values))

    def encrypted_update_factors(
        self, state: GlobalState, sums: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        """Under CKKS deltas: per value of the delta segments, ``bound / sum(w)``.

        The delta segments lead the ckks channel (state order), so the coordinator computes
        ``state += factors * ckks_sum[:len(factors)]`` homomorphically
        (:meth:`secagg.ckks.CkksEvaluator.scale_and_add`) from the masked ``sum(w)`` alone.
        """
        layout = self.layout(state)
        deltas = leading_deltas(layout, state)
        total = contributed_weight(layout.unpack(sums, partial=True), self.config.min_weight)
        return np.concatenate(
            [np.full(s.length, s.bound / (CHANNEL_BOUND * total)) for s in deltas]
        )

    def public_update(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        values = self.layout(state).unpack(sums, partial=True)
        return GlobalState(state.adapters, summed_routing(state.routing, values), state.extras)


SERVER_HALF = ServerHalf(
    build=lambda config: FedAvgCoordinator(fedavg_config(config)), facts=StrategyFacts()
)
"""FedAvg's server half; it releases the update and the routing statistics."""
