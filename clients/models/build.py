"""The base model with adapters attached, built the same way on every party.

Base weights of the tiny models and the adapter initialisation both come from
``federation.seed`` (on a private torch RNG stream), so every party gets the same state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import torch

from clients.contract.config import FederationConfig
from clients.contract.config import MoESection
from clients.models.loaders import load_model
from clients.models.loaders import load_smollm2
from clients.models.loaders import load_tokenizer
from clients.models.loaders import model_skeleton
from clients.models.loaders import tiny_dense_model
from clients.models.loaders import tiny_moe_model
from clients.models.moe_lora import MoELoRAConfig
from clients.models.moe_lora import attach

TINY_MOE_KINDS = {  # with "tiny-dense", the names in clients.models.locate.TINY_MODELS
    "tiny-moe-mixtral": "mixtral",
    "tiny-moe-qwen2_moe": "qwen2_moe",
    "tiny-moe-olmoe": "olmoe",
}


BYTE_VOCAB = 256


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
    return build_model_with(config, lambda model: attach(model, moe_lora_config(config.model.moe)))


def build_model_with(
    config: FederationConfig, attach_adapters: Callable[[torch.nn.Module], object]
) -> tuple[torch.nn.Module, Any]:
    """The base model of ``[model].name`` with ``attach_adapters`` applied under
    ``federation.seed`` (a strategy with its own adapters, e.g. FedAMoLE's), and its tokenizer."""
    name = config.model.name
    seed = config.federation.seed
    dtype = getattr(torch, config.model.dtype)
    if name == "smollm2":
        model, tokenizer = load_smollm2(dtype=dtype)
    elif name == "tiny-dense":
        model, tokenizer = tiny_dense_model(vocab_size=BYTE_VOCAB, seed=seed), ByteTokenizer()
    elif name in TINY_MOE_KINDS:
        model = tiny_moe_model(TINY_MOE_KINDS[name], vocab_size=BYTE_VOCAB, seed=seed)
        tokenizer = ByteTokenizer()
    else:
        model, tokenizer = load_model(name, dtype=dtype, revision=config.model.revision)
    model.to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attach_adapters(model)
    return model, tokenizer


def moe_lora_config(section: MoESection) -> MoELoRAConfig:
    """``[model.moe]`` as the :class:`~clients.models.moe_lora.MoELoRAConfig` it describes."""
    return MoELoRAConfig(**msgspec.structs.asdict(section))


def build_tokenizer(config: FederationConfig) -> Any:
    """``[model]``'s tokenizer alone (no weights are read)."""
    if config.model.name == "tiny-dense" or config.model.name in TINY_MOE_KINDS:
        return ByteTokenizer()
    return load_tokenizer(config.model.name, revision=config.model.revision)


def trainable_parameter_count(
    config: FederationConfig, attach_adapters: Callable[[torch.nn.Module], object]
) -> int:
    """How many parameters training updates: ``attach_adapters`` on ``[model]``'s
    architecture, built with no weights (the tiny models are built, they are small)."""
    name, seed = config.model.name, config.federation.seed
    if name == "tiny-dense":
        model = tiny_dense_model(vocab_size=BYTE_VOCAB, seed=seed)
    elif name in TINY_MOE_KINDS:
        model = tiny_moe_model(TINY_MOE_KINDS[name], vocab_size=BYTE_VOCAB, seed=seed)
    else:
        model = model_skeleton(name, config.model.revision)
    attach_adapters(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
