"""MoE-LoRA and PEFT's LoRA, both ways: a one-expert MoE-LoRA saved as a PEFT adapter that
``peft.PeftModel.from_pretrained`` loads, and a PEFT LoRA adapter a user already has as the
starting point of every expert.

With one expert and top-1 routing the gate is exactly 1, so MoE-LoRA computes
``base(x) + (alpha / r) B A x``, PEFT's LoRA at ``lora_alpha = alpha``. With E identical experts
and gates that sum to one (top-k renormalised) it computes the same, so a PEFT adapter copied
into every expert leaves the model's output unchanged: training then lets the experts diverge.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn

from clients.contract.config import ModelSection
from clients.models.locate import PEFT_FILES
from clients.models.moe_lora import MoELoRALinear
from clients.models.moe_lora import adapter_layers
from privacy.errors import UserError

PEFT_CONFIG, PEFT_WEIGHTS = PEFT_FILES
PEFT_PREFIX = "base_model.model."


class PeftBridgeError(UserError, ValueError):
    """A PEFT adapter that does not fit the configured MoE-LoRA adapters (names the field)."""


def save_as_peft(model: nn.Module, base: nn.Module, section: ModelSection, out: Path) -> Path:
    """Save ``model``'s one-expert MoE-LoRA adapters as a PEFT LoRA adapter of ``base`` (the
    same base model without adapters) in ``out``."""
    moe = section.moe
    layers = dict(adapter_layers(model))
    if moe.num_experts != 1 or any(not isinstance(m, MoELoRALinear) for m in layers.values()):
        raise PeftBridgeError("only dense one-expert MoE-LoRA adapters are PEFT LoRA adapters")
    lora = LoraConfig(
        r=moe.rank,
        lora_alpha=moe.alpha,
        target_modules=sorted(moe.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, layer in layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def init_from_peft(model: nn.Module, directory: str | Path, section: ModelSection) -> None:
    """Start every expert of ``model``'s dense MoE-LoRA layers from the PEFT LoRA adapter in
    ``directory`` (its ``adapter_config.json`` and ``adapter_model.safetensors``; no pickled
    checkpoints). Its rank must be ``[model.moe].rank``; its scale is carried into B."""
    directory = Path(directory)
    try:
        peft_config = json.loads((directory / PEFT_CONFIG).read_text(encoding="utf-8"))
        weights = load_file(str(directory / PEFT_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise PeftBridgeError(f"{directory}: not a readable PEFT adapter ({exc})") from None
    if peft_config.get("peft_type") != "LORA":
        raise PeftBridgeError(f"{directory}: a {peft_config.get('peft_type')} adapter, not LoRA")
    moe = section.moe
    if peft_config.get("r") != moe.rank:
        raise PeftBridgeError(
            f"{directory}: rank {peft_config.get('r')} differs from [model.moe].rank={moe.rank}"
        )
    scale = peft_config["lora_alpha"] / (
        moe.rank**0.5 if peft_config.get("use_rslora") else moe.rank
    )
    ratio = scale / (moe.alpha / moe.rank)
    layers = dict(adapter_layers(model))
    found = {
        k[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        for k in weights
        if k.endswith(".lora_A.weight")
    }
    missing = sorted(set(layers) - found)
    if missing or any(not isinstance(m, MoELoRALinear) for m in layers.values()):
        raise PeftBridgeError(
            f"{directory}: no LoRA weights for {missing[:3]} (the adapter must cover "
            "[model.moe].target_modules of a dense base)"
        )
    r = moe.rank
    with torch.no_grad():
        for name, layer in layers.items():
            a = weights[f"{PEFT_PREFIX}{name}.lora_A.weight"]
            b = weights[f"{PEFT_PREFIX}{name}.lora_B.weight"] * ratio
            for e in range(layer.num_experts):
                layer.lora_A.weight[e * r : (e + 1) * r].copy_(a)
                layer.lora_B.weight[:, e * r : (e + 1) * r].copy_(b)
