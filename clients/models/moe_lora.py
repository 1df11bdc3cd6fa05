"""Mixture-of-LoRA-Experts adapters for HuggingFace causal LMs, shaped for DP-SGD.

Two ways to adapt a model (``MoELoRAConfig.mode``):

* **dense** (Llama-style bases such as SmolLM2): each target ``nn.Linear`` becomes
  ``base(x) + s * sum_e g_e(x) B_e A_e x`` (+ ``s * B_s A_s x`` for an optional shared expert),
  with a router ``Linear(in, E) -> softmax -> top-k -> renormalise``. All experts live in two
  ``nn.Linear`` layers, ``A_all: in -> E*r`` and ``B_all: E*r -> out``; the gate scales each
  expert's r-block in between, which equals the sum above. Experts are computed densely per token
  (cheap at rank r) so every trainable parameter sits in a stock ``nn.Linear`` whose input keeps
  the sample on dimension 0: Opacus' own grad samplers then give exact per-sample gradients.
  Sparse dispatch (gathering the routed tokens of a whole batch) would silently break that.
* **native** (Mixtral / Qwen2-MoE / OLMoE, fused 3-D expert weights): the sparse MoE block is
  replaced by a wrapper that keeps the batch dimension, routes with the model's own (frozen)
  router plus a trainable zero-initialised router delta ``Linear(H, E)``, and adds LoRA to every
  expert's fused gate/up projection and down projection. The per-expert LoRA factors are
  :class:`RoutedLinear` modules (each token slot uses the weight of its routed expert); a custom
  Opacus grad sampler, registered here, computes their per-sample gradients. Expert compute stays
  sparse (top-k), as in the base model. Qwen2-MoE's shared expert stays frozen.

``B`` factors and the router delta start at zero, so attaching changes no output. Every layer
keeps routing statistics in non-persistent buffers (no grad) and the differentiable
load-balance loss of its last forward.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from typing import Literal

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clients.contract.routing import RoutingStats
from clients.models.adapter_state import copy_state
from clients.models.adapter_state import layer_parameters
from clients.models.adapter_state import load_state
from clients.models.lora_experts import ExpertShape
from clients.models.lora_experts import replace_module
from clients.models.lora_experts import target_linears

Mode = Literal["auto", "dense", "native"]


_NATIVE_BLOCKS = frozenset(
    {"MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "OlmoeSparseMoeBlock"}
)


_FORMAT = "sealmoe-adapter-state-v1"


class MoELoRAError(Exception):
    """Base class of the errors raised by :mod:`clients.models.moe_lora`."""


class MoELoRAConfigError(MoELoRAError, ValueError):
    """A configuration field has an unusable value (the message names the field)."""


class UnsupportedModelError(MoELoRAError, TypeError):
    """The model cannot carry the requested adapters (no targets, unknown MoE block, ...)."""


class NotAttachedError(MoELoRAError, RuntimeError):
    """An operation needs MoE-LoRA adapters but the model has none (or no forward ran yet)."""


class AdapterStateError(MoELoRAError, ValueError):
    """An adapter state does not fit the model: missing/unexpected names or wrong shapes."""


@dataclass(frozen=True)
class MoELoRAConfig(ExpertShape):
    """What to attach, and how.

    ``mode``: "auto" picks "native" when the model has a supported sparse MoE block, else "dense".
    In native mode only ``rank`` and ``alpha`` apply: the number of experts, top-k and the
    adapted projections come from the model, and ``target_modules`` / ``shared_expert`` are
    not used. ``load_balance_coef`` is the weight a trainer gives :func:`load_balance_loss`.
    """

    error: ClassVar[type[Exception]] = MoELoRAConfigError
    nonnegative: ClassVar[tuple[str, ...]] = ("load_balance_coef",)

    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj")
    shared_expert: bool = False
    load_balance_coef: float = 0.01
    mode: Mode = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("auto", "dense", "native"):
            self._fail(f"mode must be 'auto', 'dense' or 'native', got {self.mode!r}")


class _RoutedLayer(nn.Module):
    """Shared routing bookkeeping: statistics buffers and the last load-balance loss."""

    def _init_routing(self, num_experts: int, top_k: int, device: torch.device) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.register_buffer(
            "routing_counts",
            torch.zeros(num_experts, dtype=torch.float64, device=device),
            persistent=False,
        )
        self.register_buffer(
            "routing_gate_sum",
            torch.zeros(num_experts, dtype=torch.float64, device=device),
            persistent=False,
        )
        self.register_buffer(
            "routing_tokens", torch.zeros((), dtype=torch.float64, device=device), persistent=False
        )
        self.last_load_balance: torch.Tensor | None = None
        self.last_router_probs: torch.Tensor | None = None

    def _route(self, logits: torch.Tensor, renormalize: bool) -> tuple[torch.Tensor, ...]:
        """Softmax (fp32) -> top-k; records statistics and the per-sample Switch loss.

        Returns ``(top_values, top_indices)`` with shapes ``(..., k)``.
        """
        probs = torch.softmax(logits.float(), dim=-1)
        self.last_router_probs = probs
        top_values, top_indices = torch.topk(probs, self.top_k, dim=-1)
        if renormalize:
            top_values = top_values / top_values.sum(dim=-1, keepdim=True)
        selected = F.one_hot(top_indices, self.num_experts).sum(dim=-2).to(probs.dtype)
        with torch.no_grad():
            flat_probs = probs.reshape(-1, self.num_experts)
            self.routing_counts += selected.reshape(-1, self.num_experts).sum(0).double()
            self.routing_gate_sum += flat_probs.sum(0).double()
            self.routing_tokens += flat_probs.shape[0]
        # Switch loss E * sum_e f_e P_e per sample (dim 0): kept per sample so that it stays
        # compatible with per-sample clipping.
        batch = probs.shape[0] if probs.dim() > 1 else 1
        f = selected.reshape(batch, -1, self.num_experts).mean(1) / self.top_k
        p = probs.reshape(batch, -1, self.num_experts).mean(1)
        self.last_load_balance = self.num_experts * (f * p).sum(-1)
        return top_values, top_indices

    def __getstate__(self) -> dict:
        # The last loss is part of an autograd graph, which cannot be deep-copied or pickled.
        return {**super().__getstate__(), "last_load_balance": None, "last_router_probs": None}

    def reset_routing(self) -> None:
        self.routing_counts.zero_()
        self.routing_gate_sum.zero_()
        self.routing_tokens.zero_()


class MoELoRALinear(_RoutedLayer):
    """A frozen ``nn.Linear`` plus a routed mixture of LoRA experts (dense per-token compute)."""

    def __init__(self, base: nn.Linear, config: MoELoRAConfig) -> None:
        super().__init__()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        e, r = config.num_experts, config.rank
        self.base = base
        self.rank = r
        self.scaling = config.scaling
        self.router = nn.Linear(base.in_features, e, bias=False, **kw)
        self.lora_A = nn.Linear(base.in_features, e * r, bias=False, **kw)
        self.lora_B = nn.Linear(e * r, base.out_features, bias=False, **kw)
        nn.init.zeros_(self.lora_B.weight)
        if config.shared_expert:
            self.shared_A = nn.Linear(base.in_features, r, bias=False, **kw)
            self.shared_B = nn.Linear(r, base.out_features, bias=False, **kw)
            nn.init.zeros_(self.shared_B.weight)
        else:
            self.shared_A = self.shared_B = None
        self._init_routing(e, config.top_k, base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top_values, top_indices = self._route(self.router(x), renormalize=True)
        gates = torch.zeros(
            (*top_indices.shape[:-1], self.num_experts), dtype=x.dtype, device=x.device
        ).scatter(-1, top_indices, top_values.to(x.dtype))
        z = self.lora_A(x).unflatten(-1, (self.num_experts, self.rank)) * gates.unsqueeze(-1)
        out = self.base(x) + self.scaling * self.lora_B(z.flatten(-2))
        if self.shared_A is not None:
            out = out + self.scaling * self.shared_B(self.shared_A(x))
        return out


class RoutedLinear(nn.Module):
    """One linear map per expert, ``weight (E, out, in)``; slot i of x uses ``weight[idx[i]]``.

    ``forward(x (..., in), idx (...)) -> (..., out)``. Pass both positionally: the Opacus hook
    records positional inputs, and the registered grad sampler needs ``idx``.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_features, in_features, device=device, dtype=dtype)
        )
        bound = 1.0 / in_features**0.5  # the bound of nn.Linear's default (kaiming, a=sqrt(5))
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return _routed_linear(x, idx, self.weight)


def _routed_linear(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros((*idx.shape, weight.shape[1]))
    for e in range(weight.shape[0]):
        mask = idx == e
        out[mask] = F.linear(x[mask], weight[e])
    return out


@register_grad_sampler(RoutedLinear)
def _routed_linear_grad_sample(
    layer: RoutedLinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of ``RoutedLinear.weight``: ``gs[n, e] = sum_{slots->e} g x^T``."""
    x, idx = activations[0].to(backprops.dtype), activations[1]
    n, e_count = x.shape[0], layer.weight.shape[0]
    g = backprops.reshape(n, -1, backprops.shape[-1])
    xs = x.reshape(n, -1, x.shape[-1])
    idx = idx.reshape(n, -1)
    grads = [
        torch.einsum("nso,nsi->noi", g * (idx == e).unsqueeze(-1).to(g.dtype), xs)
        for e in range(e_count)
    ]
    return {layer.weight: torch.stack(grads, dim=1)}


class NativeMoELoRA(_RoutedLayer):
    """Replaces a native sparse MoE block: its frozen router + a trainable delta, LoRA experts.

    Keeps the batch on dimension 0 throughout (the base block flattens tokens, which would break
    per-sample gradients).
    """

    def __init__(self, block: nn.Module, config: MoELoRAConfig) -> None:
        super().__init__()
        experts, gate = block.experts, block.gate
        kw = {"device": experts.down_proj.device, "dtype": experts.down_proj.dtype}
        e, hidden, inter = experts.down_proj.shape
        r = config.rank
        self.base = block
        self.scaling = config.scaling
        self.renormalize = bool(getattr(gate, "norm_topk_prob", True))
        self.router_delta = nn.Linear(hidden, e, bias=False, **kw)
        nn.init.zeros_(self.router_delta.weight)
        self.gate_up_A = RoutedLinear(e, hidden, r, **kw)
        self.gate_up_B = RoutedLinear(e, r, 2 * inter, **kw)
        self.down_A = RoutedLinear(e, inter, r, **kw)
        self.down_B = RoutedLinear(e, r, hidden, **kw)
        nn.init.zeros_(self.gate_up_B.weight)
        nn.init.zeros_(self.down_B.weight)
        self._init_routing(e, int(gate.top_k), experts.down_proj.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        block, experts = self.base, self.base.experts
        jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        if self.training and jitter > 0:
            hidden = hidden * torch.empty_like(hidden).uniform_(1.0 - jitter, 1.0 + jitter)
        base_logits = block.gate(hidden.reshape(-1, hidden.shape[-1]))[0]
        logits = base_logits.view(*hidden.shape[:-1], -1) + self.router_delta(hidden)
        weights, idx = self._route(logits, renormalize=self.renormalize)
        x = hidden.unsqueeze(-2).expand(*idx.shape, hidden.shape[-1])
        s = self.scaling
        gate_up = _routed_linear(x, idx, experts.gate_up_proj) + s * self.gate_up_B(
            self.gate_up_A(x, idx), idx
        )
        gate, up = gate_up.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        y = _routed_linear(h, idx, experts.down_proj) + s * self.down_B(self.down_A(h, idx), idx)
        out = (y * weights.to(y.dtype).unsqueeze(-1)).sum(dim=-2)
        if getattr(block, "shared_expert", None) is not None:
            shared = block.shared_expert(hidden)
            out = out + torch.sigmoid(block.shared_expert_gate(hidden)) * shared
        return out


_ADAPTERS = (MoELoRALinear, NativeMoELoRA)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside wrappers such as Opacus' ``GradSampleModule`` (``._module``)."""
    while isinstance(getattr(model, "_module", None), nn.Module):
        model = model._module
    return model


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, _RoutedLayer]]:
    """``(name, layer)`` of every MoE-LoRA layer, in model order."""
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, _ADAPTERS):
            yield name, module


def _resolve_mode(model: nn.Module, config: MoELoRAConfig) -> Literal["dense", "native"]:
    has_native = any(type(m).__name__ in _NATIVE_BLOCKS for m in model.modules())
    if config.mode == "auto":
        return "native" if has_native else "dense"
    if config.mode == "native" and not has_native:
        raise UnsupportedModelError(
            f"mode='native' needs a sparse MoE block ({', '.join(sorted(_NATIVE_BLOCKS))}); "
            f"{type(model).__name__} has none"
        )
    return config.mode


def attach(model: nn.Module, config: MoELoRAConfig | None = None) -> nn.Module:
    """Add MoE-LoRA adapters in place, freeze every base parameter, and return the model."""
    config = config or MoELoRAConfig()
    if any(True for _ in adapter_layers(model)):
        raise UnsupportedModelError("model already carries MoE-LoRA adapters")
    mode = _resolve_mode(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "native":
        blocks = [n for n, m in model.named_modules() if type(m).__name__ in _NATIVE_BLOCKS]
        for name in blocks:
            replace_module(model, name, NativeMoELoRA(model.get_submodule(name), config))
    else:
        native_prefixes = tuple(
            f"{n}." for n, m in model.named_modules() if type(m).__name__ in _NATIVE_BLOCKS
        )
        targets = target_linears(model, config.target_modules, UnsupportedModelError, config.layers)
        inside = [n for n in targets if n.startswith(native_prefixes)]
        if inside:
            raise UnsupportedModelError(
                f"dense adapters on {inside[0]!r} would sit inside a native MoE block, whose "
                "flattened tokens break per-sample gradients; use mode='native' or other targets"
            )
        for name in targets:
            replace_module(model, name, MoELoRALinear(model.get_submodule(name), config))
    model.moe_lora_config = config
    return model


def get_config(model: nn.Module) -> MoELoRAConfig:
    """The config :func:`attach` used on this model."""
    config = getattr(_unwrap(model), "moe_lora_config", None)
    if not isinstance(config, MoELoRAConfig):
        raise NotAttachedError("model has no MoE-LoRA adapters; call attach() first")
    return config


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every adapter parameter, in a stable order (names as in state)."""
    yield from layer_parameters(adapter_layers(model))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of every adapter parameter, ordered, with names stable across clients."""
    state = copy_state(adapter_parameters(model))
    if not state:
        raise NotAttachedError("model has no MoE-LoRA adapters; call attach() first")
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the adapters (strict: same names and shapes; values are cast)."""
    params = dict(adapter_parameters(model))
    if not params:
        raise NotAttachedError("model has no MoE-LoRA adapters; call attach() first")
    load_state(params.items(), state, AdapterStateError)


def save_adapter_state(path: str | os.PathLike[str], state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` to a safetensors file atomically, keeping the key order in the metadata."""
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    metadata = {"format": _FORMAT, "order": json.dumps(list(tensors))}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_adapter_file(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_adapter_state`, in its original key order."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise AdapterStateError(f"{path} is not a sealmoe adapter-state file")
        order = json.loads(metadata["order"])
        keys = set(f.keys())
        if sorted(order) != sorted(keys):
            raise AdapterStateError(f"{path}: key order metadata does not match its tensors")
        return {name: f.get_tensor(name) for name in order}


def load_balance_loss(
    model: nn.Module, reduction: Literal["mean", "none"] = "mean"
) -> torch.Tensor:
    """Switch load-balance loss of the last forward, averaged over MoE layers (unscaled).

    Per layer and per sample (dim 0): ``E * sum_e f_e P_e`` with f_e the fraction of that sample's
    top-k slots routed to e and P_e its mean router probability (1 under uniform routing).
    ``reduction="none"`` returns the per-sample values ``[B]`` (e.g. for ghost clipping);
    "mean" their mean, a scalar. Either way it is a per-sample term, safe under per-sample
    clipping. The trainer multiplies it by ``config.load_balance_coef``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    losses = [layer.last_load_balance for _, layer in adapter_layers(model)]
    if not losses:
        raise NotAttachedError("model has no MoE-LoRA adapters; call attach() first")
    if any(loss is None for loss in losses):
        raise NotAttachedError("no forward pass has run since attach(); nothing to balance")
    per_sample = torch.stack(losses).mean(dim=0)
    return per_sample if reduction == "none" else per_sample.mean()


def router_probabilities(model: nn.Module) -> list[torch.Tensor]:
    """Per MoE layer, the full softmax router probabilities ``[B, T, E]`` (float32) of the last
    forward, differentiable: a strategy's per-sample term on the routers (e.g. a KL regularizer)
    builds on them, and its gradient reaches the router through the module output that Opacus'
    per-sample hooks watch."""
    probs = [layer.last_router_probs for _, layer in adapter_layers(model)]
    if not probs:
        raise NotAttachedError("model has no MoE-LoRA adapters; call attach() first")
    if any(p is None for p in probs):
        raise NotAttachedError("no forward pass has run since attach(); no router output yet")
    return probs  # type: ignore[return-value]


def routing_statistics(model: nn.Module) -> RoutingStats:
    """Routing counts accumulated since attach or the last :func:`reset_routing_statistics`."""
    layers = list(adapter_layers(model))
    if not layers:
        raise NotAttachedError("model has no MoE-LoRA adapters; call attach() first")
    return RoutingStats(
        layer_names=tuple(name for name, _ in layers),
        counts=torch.stack([m.routing_counts for _, m in layers]).cpu().numpy(),
        gate_sum=torch.stack([m.routing_gate_sum for _, m in layers]).cpu().numpy(),
        tokens=torch.stack([m.routing_tokens for _, m in layers]).cpu().numpy(),
        top_k=layers[0][1].top_k,
    )


def reset_routing_statistics(model: nn.Module) -> None:
    """Zero every layer's routing counters."""
    for _, layer in adapter_layers(model):
        layer.reset_routing()
