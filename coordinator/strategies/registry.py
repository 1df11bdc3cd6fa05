"""The coordinator side of every strategy ``[aggregation].strategy`` can name.

The client halves are in ``clients.strategies.registry.CLIENT_HALVES``; a new strategy registers
in both. The service and the simulation build their server half from here.
"""

from __future__ import annotations

from collections.abc import Callable

from clients.contract.config import FederationConfig
from clients.strategies.ddome import ddome_config
from clients.strategies.fedalign import fedalign_config
from clients.strategies.fedamole import fedamole_config
from clients.strategies.fedavg import fedavg_config
from clients.strategies.fedmoe import fedmoe_config
from coordinator.strategies.base import CoordinatorStrategy
from coordinator.strategies.ddome import DDOMEStrategy
from coordinator.strategies.fedalign import FedAlignCoordinator
from coordinator.strategies.fedamole import FedAMoLEStrategy
from coordinator.strategies.fedavg import FedAvgCoordinator
from coordinator.strategies.fedmoe import FedMoECoordinator

COORDINATOR_STRATEGIES: dict[str, Callable[[FederationConfig], CoordinatorStrategy]] = {
    "fedavg": lambda config: FedAvgCoordinator(fedavg_config(config)),
    "fedalign": lambda config: FedAlignCoordinator(fedalign_config(config)),
    "fedmoe": lambda config: FedMoECoordinator(fedmoe_config(config)),
    "fedamole": lambda config: FedAMoLEStrategy(fedamole_config(config)),
    "ddome": lambda config: DDOMEStrategy(ddome_config(config)),
}


def coordinator_strategy(config: FederationConfig) -> CoordinatorStrategy:
    """The coordinator side of the configured strategy."""
    return COORDINATOR_STRATEGIES[config.aggregation.strategy](config)
