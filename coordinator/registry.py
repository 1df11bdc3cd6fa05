"""The coordinator side of every strategy ``[aggregation].strategy`` can name.

The client sides are in ``clients.setup.CLIENT_STRATEGIES``; a new strategy registers in both.
"""

from __future__ import annotations

from collections.abc import Callable

from clients.config import FederationConfig
from clients.setup import fedalign_config, fedavg_config, fedmoe_config
from coordinator.fedalign import FedAlignCoordinator
from coordinator.fedmoe import FedMoECoordinator
from coordinator.strategy import CoordinatorStrategy, FedAvgCoordinator

COORDINATOR_STRATEGIES: dict[str, Callable[[FederationConfig], CoordinatorStrategy]] = {
    "fedavg": lambda config: FedAvgCoordinator(fedavg_config(config)),
    "fedalign": lambda config: FedAlignCoordinator(fedalign_config(config)),
    "fedmoe": lambda config: FedMoECoordinator(fedmoe_config(config)),
}


def coordinator_strategy(config: FederationConfig) -> CoordinatorStrategy:
    """The coordinator side of the configured strategy."""
    return COORDINATOR_STRATEGIES[config.aggregation.strategy](config)
