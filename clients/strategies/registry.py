"""The one registry of the strategies' client halves: ``[aggregation].strategy`` -> its half.

Adding a strategy means one module in :mod:`clients.strategies` (its config, layout, learner
and ``CLIENT_HALF``) and one line here, plus its server half in :mod:`coordinator.strategies`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from clients.contract.config import FederationConfig
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.strategies import ddome
from clients.strategies import fedalign
from clients.strategies import fedamole
from clients.strategies import fedavg
from clients.strategies import fedmoe
from clients.strategies.base import ClientHalf
from clients.strategies.base import ClientStrategy
from clients.strategies.base import Learner

CLIENT_HALVES: dict[str, ClientHalf] = {
    "fedavg": fedavg.CLIENT_HALF,
    "fedalign": fedalign.CLIENT_HALF,
    "fedmoe": fedmoe.CLIENT_HALF,
    "fedamole": fedamole.CLIENT_HALF,
    "ddome": ddome.CLIENT_HALF,
}


def client_half(config: FederationConfig) -> ClientHalf:
    """The configured strategy's client half."""
    return CLIENT_HALVES[config.aggregation.strategy]


def client_strategy(config: FederationConfig, name: str) -> ClientStrategy:
    """Institution ``name``'s client-side object of the configured sum strategy."""
    make = client_half(config).sum_strategy
    if make is None:
        raise StrategyError(
            f"strategy {config.aggregation.strategy!r} has its own learner, no sum strategy"
        )
    return make(config, name)


def build_strategy_model(config: FederationConfig) -> tuple[nn.Module, Any]:
    """The base model with the configured strategy's adapters, and its tokenizer."""
    return client_half(config).build_model(config)


def initial_state(config: FederationConfig) -> GlobalState:
    """The round-0 global state every party derives from the config."""
    return client_half(config).initial_state(config)


def learner_for(config: FederationConfig, name: str) -> Learner:
    """Institution ``name``'s learner for the configured strategy."""
    return client_half(config).learner(config, name)
