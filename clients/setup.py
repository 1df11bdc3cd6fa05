"""What the coordinator and every institution must build identically from the shared config.

The model with its MoE-LoRA adapters (seeded, so the coordinator's initial adapter state is the
same everywhere), each institution's data (Shakespeare partition part i for the i-th entry of
``[[institutions]]``), the FedAvg parameters and the client-id <-> institution mapping. Both
sides import these functions, so a change here cannot make them disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from clients.config import FederationConfig
from clients.ddome import DDOMEConfig
from clients.ddome_lora import DDOMEAdapterConfig, attach_ddome, ddome_state
from clients.fedalign import FedAlignClient, FedAlignConfig
from clients.fedamole import FedAMoLEConfig
from clients.fedamole_lora import AMoLEConfig, amole_state, attach_amole
from clients.fedmoe import FedMoEClient, FedMoEConfig
from clients.keys import Roster
from clients.models import load_model, load_smollm2, tiny_dense_model, tiny_moe_model
from clients.moe_lora import adapter_state, attach, routing_statistics
from clients.shakespeare import institution_datasets, load_corpus, partition
from clients.strategy import ClientStrategy, FedAvgClient, FedAvgConfig, GlobalState

TINY_MOE_KINDS = {
    "tiny-moe-mixtral": "mixtral",
    "tiny-moe-qwen2_moe": "qwen2_moe",
    "tiny-moe-olmoe": "olmoe",
}
BYTE_VOCAB = 256

DEFAULT_MAX_EXAMPLES = 4096
"""Public FedAvg weight cap when ``[data.max_blocks].train`` is unset: an institution with more
training blocks gets the same weight as one with exactly this many. Small enough that the weight
of one block (1 / cap) stays well above the 16-bit mask quantisation step."""


class ByteTokenizer:
    """Bytes of UTF-8 text as token ids (vocabulary 256), for the tiny random models."""

    vocab_size = BYTE_VOCAB

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        """``{"input_ids": [byte, ...]}``, the shape HF tokenizers return."""
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: list[int]) -> str:
        """Inverse of ``__call__`` (invalid UTF-8 sequences become U+FFFD)."""
        return bytes(ids).decode("utf-8", errors="replace")


def build_model(config: FederationConfig) -> tuple[torch.nn.Module, Any]:
    """The base model of ``[model].name`` with MoE-LoRA adapters attached, and its tokenizer.

    Base weights of the tiny models and the adapter initialisation both come from
    ``federation.seed`` (on a private torch RNG stream), so every party gets the same state.
    """
    return build_model_with(config, lambda model: attach(model, config.model.moe.lora_config()))


def build_model_with(
    config: FederationConfig, attach_adapters: Callable[[torch.nn.Module], object]
) -> tuple[torch.nn.Module, Any]:
    """The base model of ``[model].name`` with ``attach_adapters`` applied under
    ``federation.seed`` (a strategy with its own adapters, e.g. FedAMoLE's), and its tokenizer."""
    name = config.model.name
    seed = config.federation.seed
    if name == "smollm2":
        model, tokenizer = load_smollm2()
    elif name == "tiny-dense":
        model, tokenizer = tiny_dense_model(vocab_size=BYTE_VOCAB, seed=seed), ByteTokenizer()
    elif name in TINY_MOE_KINDS:
        model = tiny_moe_model(TINY_MOE_KINDS[name], vocab_size=BYTE_VOCAB, seed=seed)
        tokenizer = ByteTokenizer()
    else:
        model, tokenizer = load_model(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attach_adapters(model)
    return model, tokenizer


def build_strategy_model(config: FederationConfig) -> tuple[torch.nn.Module, Any]:
    """The base model with the configured strategy's adapters (FedAMoLE's, DDOME's, or the
    MoE-LoRA adapters of every other strategy), and its tokenizer."""
    strategy = config.aggregation.strategy
    if strategy == "fedamole":
        adapter = fedamole_config(config).adapter
        return build_model_with(config, lambda model: attach_amole(model, adapter))
    if strategy == "ddome":
        experts = ddome_config(config).adapter
        return build_model_with(config, lambda model: attach_ddome(model, experts))
    return build_model(config)


def initial_state(config: FederationConfig) -> GlobalState:
    """The round-0 global state every party derives from the config: the seeded adapters of
    :func:`build_strategy_model`, zero routing statistics (none for FedAMoLE and DDOME, whose
    models do not route per token), no extras."""
    model, _ = build_strategy_model(config)
    strategy, experts = config.aggregation.strategy, config.model.moe.num_experts
    if strategy == "fedamole":
        return GlobalState.initial(amole_state(model), (), experts)
    if strategy == "ddome":
        return GlobalState.initial(ddome_state(model), (), experts)
    stats = routing_statistics(model)
    return GlobalState.initial(
        adapter_state(model), stats.layer_names, stats.num_experts, stats.top_k
    )


def institution_data(
    config: FederationConfig, name: str, tokenizer: Any
) -> dict[str, torch.Tensor]:
    """Institution ``name``'s token blocks per split ("train", "validation", "test").

    Part i of the Shakespeare partition for the i-th institution of ``[[institutions]]``.
    """
    names = config.institution_names
    if name not in names:
        raise KeyError(f"no institution {name!r} in the config; known: {names}")
    if config.data.source != "shakespeare":
        raise ValueError(f"data.source {config.data.source!r} is not supported")
    data = config.data
    parts = partition(
        load_corpus(),
        n_institutions=len(names),
        seed=data.seed,
        split=data.split,
        max_chars_per_institution=data.max_chars_per_institution,
    )
    part = parts[names.index(name)]
    caps = data.max_blocks.as_dict() or None
    return institution_datasets([part], tokenizer, data.block_len, caps)[part.name]


def fedavg_config(config: FederationConfig) -> FedAvgConfig:
    """The FedAvg parameters both sides use (they must be identical to agree on the layout)."""
    return FedAvgConfig(
        max_examples=config.data.max_blocks.train or DEFAULT_MAX_EXAMPLES,
        delta_channel=config.aggregation.expert_updates,
        routing_channel=config.aggregation.routing_statistics,
    )


def fedalign_config(config: FederationConfig) -> FedAlignConfig:
    """FedAlign-MoE's parameters from ``[aggregation.fedalign]`` (identical on both sides)."""
    base = fedavg_config(config)
    return FedAlignConfig(
        max_examples=base.max_examples,
        delta_channel=base.delta_channel,
        routing_channel=base.routing_channel,
        **msgspec.structs.asdict(config.aggregation.fedalign),
    )


def fedmoe_config(config: FederationConfig) -> FedMoEConfig:
    """FedMoE's parameters from ``[aggregation.fedmoe]`` (identical on both sides)."""
    base = fedavg_config(config)
    return FedMoEConfig(
        max_examples=base.max_examples,
        delta_channel=base.delta_channel,
        routing_channel=base.routing_channel,
        **msgspec.structs.asdict(config.aggregation.fedmoe),
    )


def fedamole_config(config: FederationConfig) -> FedAMoLEConfig:
    """FedAMoLE's parameters from ``[aggregation.fedamole]``, its adapter's shape from
    ``[model.moe]`` (``max_experts`` capped at ``num_experts``); client ids are the indices of
    ``[[institutions]]``."""
    moe, section = config.model.moe, config.aggregation.fedamole
    adapter = AMoLEConfig(
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        rank=moe.rank,
        alpha=moe.alpha,
        target_modules=moe.target_modules,
        load_balance_coef=moe.load_balance_coef,
    )
    fields = msgspec.structs.asdict(section)
    fields["max_experts"] = min(section.max_experts, moe.num_experts)
    return FedAMoLEConfig(
        adapter=adapter,
        num_clients=len(config.institutions),
        max_examples=fedavg_config(config).max_examples,
        **fields,
    )


def ddome_config(config: FederationConfig) -> DDOMEConfig:
    """DDOME's parameters from ``[aggregation.ddome]``, its experts' shape from ``[model.moe]``."""
    moe, section = config.model.moe, config.aggregation.ddome
    adapter = DDOMEAdapterConfig(
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        rank=moe.rank,
        alpha=moe.alpha,
        target_modules=moe.target_modules,
        gate_hidden=section.gate_hidden,
    )
    return DDOMEConfig(
        adapter=adapter,
        max_examples=fedavg_config(config).max_examples,
        delta_bound=section.delta_bound,
        min_count=section.min_count,
        anchor_coef=section.anchor_coef,
    )


def ddome_anchor(config: FederationConfig, name: str) -> int | None:
    """Institution ``name``'s DDOME anchor expert: its index among the first ``anchors``."""
    index = client_id(config, name)
    return index if index < config.aggregation.ddome.anchors else None


CLIENT_STRATEGIES: dict[str, Callable[[FederationConfig, str], ClientStrategy]] = {
    "fedavg": lambda config, name: FedAvgClient(fedavg_config(config)),
    "fedalign": lambda config, name: FedAlignClient(fedalign_config(config)),
    "fedmoe": lambda config, name: FedMoEClient(fedmoe_config(config)),
}
"""``[aggregation].strategy`` -> the client side for institution ``name`` (a new object per
institution: strategies keep client-side memory) of the strategies on the MoE-LoRA adapters.
New strategies register here and in ``coordinator.registry``. FedAMoLE and DDOME bring their
own adapters and round (``fedamole_config``, ``ddome_config``): the runtime drives them through
their learners (``clients.fedamole_learner``, ``clients.ddome_learner``)."""


def client_strategy(config: FederationConfig, name: str) -> ClientStrategy:
    """Institution ``name``'s client side of the configured strategy."""
    return CLIENT_STRATEGIES[config.aggregation.strategy](config, name)


def client_id(config: FederationConfig, name: str) -> int:
    """Institution ``name``'s SecAgg client id: its index in ``[[institutions]]``."""
    names = config.institution_names
    if name not in names:
        raise KeyError(f"no institution {name!r} in the config; known: {names}")
    return names.index(name)


def identity_keys(config: FederationConfig, roster: Roster) -> dict[int, Ed25519PublicKey]:
    """Client id -> registered Ed25519 identity key of every institution of the config."""
    return {
        client_id(config, name): roster.institution(name).identity_key
        for name in config.institution_names
    }
