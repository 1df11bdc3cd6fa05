"""The server half of every strategy ``[aggregation].strategy`` can name, and what each releases.

The client halves are in ``clients.strategies.registry.CLIENT_HALVES``; a new strategy registers
in both, its report facts (``AUDIT_FACTS`` of its server-half module) here.
"""

from __future__ import annotations

from collections.abc import Callable

from audit.context import StrategyFacts
from clients.contract.config import FederationConfig
from clients.strategies.ddome import ddome_config
from clients.strategies.fedalign import fedalign_config
from clients.strategies.fedamole import fedamole_config
from clients.strategies.fedavg import fedavg_config
from clients.strategies.fedmoe import fedmoe_config
from coordinator.strategies import ddome, fedalign, fedamole, fedavg, fedmoe
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


STRATEGY_FACTS: dict[str, StrategyFacts] = {
    "fedavg": fedavg.AUDIT_FACTS,
    "fedalign": fedalign.AUDIT_FACTS,
    "fedmoe": fedmoe.AUDIT_FACTS,
    "fedamole": fedamole.AUDIT_FACTS,
    "ddome": ddome.AUDIT_FACTS,
}
"""Per strategy, what it releases and what its coordinator sees (the privacy report's facts)."""


def strategy_facts(name: str) -> StrategyFacts:
    """The report facts of strategy ``name`` (``KeyError`` if it is not registered)."""
    return STRATEGY_FACTS[name]
