"""The one registry of the strategies' server halves: ``[aggregation].strategy`` -> its half.

The client halves are in :mod:`clients.strategies.registry`; a new strategy adds one module on
each side (its ``SERVER_HALF`` here: how to build it, and its privacy-report facts) and one line
in each registry. The service and the simulation build their server half from here.
"""

from __future__ import annotations

from audit.context import StrategyFacts
from clients.contract.config import FederationConfig
from coordinator.strategies import ddome
from coordinator.strategies import fedalign
from coordinator.strategies import fedamole
from coordinator.strategies import fedavg
from coordinator.strategies import fedmoe
from coordinator.strategies.base import CoordinatorStrategy
from coordinator.strategies.base import ServerHalf

SERVER_HALVES: dict[str, ServerHalf] = {
    "fedavg": fedavg.SERVER_HALF,
    "fedalign": fedalign.SERVER_HALF,
    "fedmoe": fedmoe.SERVER_HALF,
    "fedamole": fedamole.SERVER_HALF,
    "ddome": ddome.SERVER_HALF,
}


def coordinator_strategy(config: FederationConfig) -> CoordinatorStrategy:
    """The server half of the configured strategy."""
    return SERVER_HALVES[config.aggregation.strategy].build(config)


def strategy_facts(name: str) -> StrategyFacts:
    """The privacy-report facts of strategy ``name`` (``KeyError`` if it is not registered)."""
    return SERVER_HALVES[name].facts
