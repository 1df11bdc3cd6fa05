"""The trained model in the institution's hands: kept at the end of a federation, loaded back
into a transformers model for ``generate``, and exported in PEFT's own format where it is one.

At the end of every federation each institution writes, under its own run directory,
``model/adapter_model.safetensors`` (the adapters it ended with, decrypted on the institution
under ``expert_updates = "ckks"``, and its personal parts: strategy memory and the public state
it was given, e.g. FedAMoLE's assignment) and ``model/adapter_config.json`` (what a reader
needs: the federation config, the base model's name, revision, dtype and the SHA-256 of its
weight files). :func:`from_pretrained` reads that directory in the style of PEFT's
``PeftModel.from_pretrained(base_model, directory)``.

A run whose adapters are plain LoRA (one expert, top-1, no shared expert, dense) exports in
PEFT's format (:func:`export_peft`), and an existing PEFT LoRA adapter can start every expert
(``[model] init_adapter``, :mod:`clients.models.peft_bridge`).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save
from torch import nn

from clients.contract.config import FederationConfig
from clients.contract.config import ModelSection
from clients.contract.durable import atomic_write
from clients.models.build import build_model_with
from clients.models.locate import locate_model
from clients.models.locate import weights_sha256
from clients.models.peft_bridge import save_as_peft
from clients.strategies.registry import client_half
from privacy.errors import UserError

MODEL_DIR = "model"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CARD = "adapter_config.json"
FORMAT = "sealmoe-adapters"
ADAPTERS = "adapters."
PERSONAL = "personal."


class TrainedModelError(UserError, ValueError):
    """A directory that is not a sealmoe adapter export, or a base model that does not match."""


def keep_trained_model(
    directory: Path,
    config: FederationConfig,
    institution: str,
    adapters: Mapping[str, torch.Tensor],
    personal: Mapping[str, np.ndarray],
) -> Path:
    """Write the institution's adapters and personal parts, with their card, to ``directory``."""
    tensors = {ADAPTERS + n: t.detach().cpu().contiguous() for n, t in adapters.items()}
    tensors |= {
        PERSONAL + n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in personal.items()
    }
    card = {
        "format": FORMAT,
        "version": 1,
        "institution": institution,
        "strategy": config.aggregation.strategy,
        "base_model": base_model_facts(config.model, config.federation.seed),
        "libraries": {
            lib: importlib.metadata.version(lib) for lib in ("torch", "transformers", "peft")
        },
        "federation_config": msgspec.to_builtins(config),
    }
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / ADAPTER_WEIGHTS, save(tensors))
    atomic_write(directory / ADAPTER_CARD, (json.dumps(card, indent=2) + "\n").encode())
    return directory


def base_model_facts(model: ModelSection, seed: int) -> dict[str, Any]:
    """The base model as a reader must find it: name, revision, dtype and the SHA-256 of its
    weight files (None for a built-in random model, which ``seed`` rebuilds)."""
    folder = locate_model(model.name, model.revision)
    return {
        "name": model.name,
        "revision": model.revision,
        "dtype": model.dtype,
        "sha256": None if folder is None else weights_sha256(folder),
        "seed": seed,
    }


def read_card(directory: str | Path) -> tuple[dict[str, Any], FederationConfig]:
    """A kept model's card and the federation config it records."""
    path = Path(directory) / ADAPTER_CARD
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainedModelError(f"{path}: no such file; pass a directory sealmoe wrote") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainedModelError(f"{path}: unreadable ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise TrainedModelError(f"{path}: not a {FORMAT} card (a PEFT adapter? use PEFT)")
    try:
        config = msgspec.convert(card["federation_config"], FederationConfig)
    except (KeyError, msgspec.ValidationError) as exc:
        raise TrainedModelError(f"{path}: bad federation_config ({exc})") from None
    return card, config


def from_pretrained(
    directory: str | Path, base_model: nn.Module | None = None
) -> tuple[nn.Module, Any]:
    """The kept adapters on a base model, in eval mode, and the base model's tokenizer.

    Without ``base_model`` the base is loaded as the card names it (its weight files must hash
    as recorded); with one, the adapters go onto it in place (the tokenizer is then None).
    """
    card, config = read_card(directory)
    half = client_half(config)
    if base_model is None:
        recorded = card["base_model"]["sha256"]
        if recorded is not None and base_model_facts(config.model, 0)["sha256"] != recorded:
            raise TrainedModelError(
                f"the base model {config.model.name!r} on this machine is not the one these "
                "adapters were trained on (its weight files hash differently)"
            )
        model, tokenizer = half.build_model(config)
    else:
        model, tokenizer = base_model, None
        half.attach(model, config)
    tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    adapters = {n[len(ADAPTERS) :]: t for n, t in tensors.items() if n.startswith(ADAPTERS)}
    half.load_adapters(model, adapters)
    return model.eval(), tokenizer


def personal_parts(directory: str | Path) -> dict[str, np.ndarray]:
    """The kept personal parts (strategy memory, the public state the institution was given)."""
    tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    return {n[len(PERSONAL) :]: t.numpy() for n, t in tensors.items() if n.startswith(PERSONAL)}


def is_plain_lora(config: FederationConfig) -> bool:
    """Whether the run's adapters are one dense LoRA per layer, which PEFT can hold."""
    moe = config.model.moe
    return (
        client_half(config).sum_strategy is not None  # the MoE-LoRA family
        and moe.num_experts == 1
        and moe.top_k == 1
        and not moe.shared_expert
        and moe.mode != "native"
    )


def export_model(directory: str | Path, out: str | Path) -> tuple[Path, str]:
    """Write a kept model to ``out``: PEFT's format for plain LoRA, else sealmoe's own (the
    card and weights as kept, the base model hashed). Returns ``out`` and the format's name."""
    card, config = read_card(directory)
    out = Path(out)
    if is_plain_lora(config):
        model, _ = from_pretrained(directory)
        base, _ = build_model_with(config, lambda m: None)
        save_as_peft(model, base, config.model, out)
        atomic_write(out / "sealmoe_card.json", (json.dumps(card, indent=2) + "\n").encode())
        return out, "peft"
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CARD):
        atomic_write(out / name, (Path(directory) / name).read_bytes())
    return out, FORMAT


def generate(directory: str | Path, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` by the kept model (a quick look, not a benchmark)."""
    model, tokenizer = from_pretrained(directory)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=getattr(tokenizer, "eos_token_id", None) or 0,
        )
    return tokenizer.decode(out[0, ids.shape[1] :].tolist())
