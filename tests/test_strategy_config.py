"""The ``fedalign``, ``fedmoe``, ``fedamole`` and ``ddome`` strategies in the federation config:
parameters reach both sides identically, and bad values are refused naming the field."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

from clients.contract.config import ConfigFileError
from clients.contract.config import parse_config
from clients.strategies.ddome import ddome_anchor
from clients.strategies.ddome import ddome_config
from clients.strategies.fedalign import FedAlignClient
from clients.strategies.fedamole import fedamole_config
from clients.strategies.fedmoe import FedMoEClient
from clients.strategies.registry import client_strategy
from coordinator.strategies.fedalign import FedAlignCoordinator
from coordinator.strategies.fedmoe import FedMoECoordinator
from coordinator.strategies.registry import coordinator_strategy

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"


@pytest.fixture
def raw() -> dict:
    return tomllib.loads(TINY.read_text())


def with_aggregation(raw: dict, **fields) -> dict:
    doc = copy.deepcopy(raw)
    doc["aggregation"].update(fields)
    return doc


def test_fedalign_parameters_reach_both_sides(raw):
    doc = with_aggregation(
        raw, strategy="fedalign", fedalign={"consistency": "expert_kl", "beta": 0.5}
    )
    for inst, weight in zip(doc["institutions"], (4.0, 2.0, 1.0)):
        inst["weight"] = weight
    config = parse_config(doc, "/x/fed.toml")
    client, coordinator = client_strategy(config, "comedies"), coordinator_strategy(config)
    assert isinstance(client, FedAlignClient) and isinstance(coordinator, FedAlignCoordinator)
    assert client.config == coordinator.config
    assert (client.config.params.consistency, client.config.params.beta) == ("expert_kl", 0.5)
    assert client.config.min_weight == 0.25  # the smallest declared weight over the largest
    assert client.config.routing_channel == "ckks"


def test_fedmoe_parameters_reach_both_sides(raw):
    doc = with_aggregation(raw, strategy="fedmoe", fedmoe={"memory_fraction": 0.25})
    config = parse_config(doc, "/x/fed.toml")
    client, coordinator = client_strategy(config, "tragedies"), coordinator_strategy(config)
    assert isinstance(client, FedMoEClient) and isinstance(coordinator, FedMoECoordinator)
    assert client.config == coordinator.config and client.memory_fraction == 0.25
    assert client_strategy(config, "comedies") is not client  # one object per institution


def test_fedamole_parameters_reach_its_config(raw):
    doc = with_aggregation(
        raw,
        strategy="fedamole",
        fedamole={"affinity_blocks": 4, "score_noise_multiplier": 3.0, "max_experts": 8},
    )
    config = fedamole_config(parse_config(doc, "/x/fed.toml"))
    assert (config.params.affinity_blocks, config.params.score_noise_multiplier) == (4, 3.0)
    assert config.num_clients == 3 and config.min_weight == 1.0  # equal weights by default
    assert config.params.max_experts == 4  # capped at [model.moe].num_experts
    assert (config.adapter.num_experts, config.adapter.rank) == (4, 4)  # [model.moe]'s shape


def test_ddome_parameters_and_anchors_reach_its_config(raw):
    doc = with_aggregation(raw, strategy="ddome", ddome={"gate_hidden": 16, "anchors": 2})
    parsed = parse_config(doc, "/x/fed.toml")
    config = ddome_config(parsed)
    assert config.adapter.gate_hidden == 16 and config.adapter.top_k == 2
    assert [ddome_anchor(parsed, n) for n in parsed.institution_names] == [0, 1, None]


@pytest.mark.parametrize(
    ("fields", "field", "text"),
    [
        ({"strategy": "fedprox"}, "$.aggregation.strategy", "'fedalign'"),
        ({"fedalign": {"consistency": "cos"}}, "$.aggregation.fedalign.consistency", "'js'"),
        ({"fedalign": {"beta": -1.0}}, "$.aggregation.fedalign.beta", ">= 0.0"),
        ({"fedalign": {"typo": 1}}, "$.aggregation.fedalign", "typo"),
        ({"fedmoe": {"min_count": 1}}, "$.aggregation.fedmoe.min_count", ">= 2"),
        ({"fedmoe": {"memory_fraction": 1.5}}, "$.aggregation.fedmoe.memory_fraction", "<= 1.0"),
        ({"fedamole": {"key_clip": 0.0}}, "$.aggregation.fedamole.key_clip", "> 0.0"),
        ({"fedamole": {"typo": 1}}, "$.aggregation.fedamole", "typo"),
        ({"ddome": {"anchor_coef": -1.0}}, "$.aggregation.ddome.anchor_coef", ">= 0.0"),
        ({"ddome": {"gate_hidden": 0}}, "$.aggregation.ddome.gate_hidden", ">= 1"),
        (
            {"strategy": "ddome", "expert_updates": "ckks"},
            "$.aggregation.expert_updates",
            "does not work with strategy = 'ddome'",
        ),
    ],
)
def test_bad_strategy_fields_are_named(raw, fields, field, text):
    with pytest.raises(ConfigFileError) as info:
        parse_config(with_aggregation(raw, **fields), "/x/fed.toml")
    assert info.value.field == field
    assert text in str(info.value)


@pytest.mark.parametrize(
    ("strategy", "params", "text"),
    [
        ("fedmoe", {"min_count": 4}, "exceeds the 3 institutions"),
        ("fedamole", {"clients_per_expert": 4}, "exceeds the 3 institutions"),
        ("fedamole", {"min_experts": 1}, "top_k=2"),
        ("fedamole", {"min_experts": 3}, "8 slots cannot give"),
        ("fedamole", {"clients_per_expert": 3, "max_experts": 3}, "12 slots do not fit"),
        ("ddome", {"anchors": 4}, "at most"),
        ("ddome", {"min_count": 4}, "exceeds the 3 institutions"),
        ("fedamole", {"affinity_blocks": 9}, "exceeds the 8 validation blocks"),
    ],
)
def test_the_chosen_strategys_unusable_parameters_are_named(raw, strategy, params, text):
    """Checks that need the roster or the model: the last parameter given is the one named."""
    with pytest.raises(ConfigFileError) as info:
        parse_config(with_aggregation(raw, strategy=strategy, **{strategy: params}), "/x/fed.toml")
    assert info.value.field == f"$.aggregation.{strategy}.{list(params)[-1]}"
    assert text in str(info.value)
