"""The coordinator side of every strategy ``[aggregation].strategy`` can name.

The client sides are in ``clients.setup.CLIENT_STRATEGIES`` (FedAMoLE's and DDOME's in their
learners, ``clients.runtime.LEARNERS``); a new strategy registers in both.
"""

from __future__ import annotations

from collections.abc import Callable

from clients.config import FederationConfig
from clients.setup import (
    ddome_config,
    fedalign_config,
    fedamole_config,
    fedavg_config,
    fedmoe_config,
)
from coordinator.ddome import DDOMEStrategy
from coordinator.fedalign import FedAlignCoordinator
from coordinator.fedamole import FedAMoLEStrategy
from coordinator.fedmoe import FedMoECoordinator
from coordinator.strategy import CoordinatorStrategy, FedAvgCoordinator

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
