"""What every adapter family (MoE-LoRA, FedAMoLE's, DDOME's) shares: the shape of its LoRA
experts, checked once, and zero-started expert factors."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import ClassVar
from typing import TypeVar

from torch import nn

from clients.contract.config import MoESection

Shape = TypeVar("Shape", bound="ExpertShape")


@dataclass(frozen=True)
class ExpertShape:
    """``num_experts`` LoRA experts of ``rank`` (scale ``alpha / rank``) on the linear layers
    named ``target_modules``; ``top_k`` of them act at a time. Checked when made: a bad field
    raises ``error`` with a message that names it (prefixed by ``field_prefix``). A family
    names its own further fields in ``positive_ints`` and ``nonnegative``."""

    error: ClassVar[type[Exception]] = ValueError
    field_prefix: ClassVar[str] = ""
    positive_ints: ClassVar[tuple[str, ...]] = ()
    nonnegative: ClassVar[tuple[str, ...]] = ()

    num_experts: int = 4
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] | None = None
    """Decoder layers whose target modules get experts (negative: from the last; None: all)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers or not all(isinstance(i, int) for i in self.layers):
                self._fail(f"layers must be a non-empty list of ints, got {self.layers!r}")
        for name in ("num_experts", "top_k", "rank", *self.positive_ints):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(f"{name} must be a positive int, got {value!r}")
        for name in self.nonnegative:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                self._fail(f"{name} must be a number >= 0, got {value!r}")
        if self.top_k > self.num_experts:
            self._fail(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            self._fail(f"alpha must be a positive number, got {self.alpha!r}")
        if not self.target_modules or not all(
            isinstance(t, str) and t for t in self.target_modules
        ):
            self._fail(f"target_modules must name at least one layer, got {self.target_modules!r}")

    @classmethod
    def from_moe(cls: type[Shape], moe: MoESection, **fields: Any) -> Shape:
        """This family's shape as ``[model.moe]`` declares it, with its own further fields."""
        return cls(
            num_experts=moe.num_experts,
            top_k=moe.top_k,
            rank=moe.rank,
            alpha=moe.alpha,
            target_modules=moe.target_modules,
            layers=moe.layers,
            **fields,
        )

    @property
    def scaling(self) -> float:
        """LoRA scale ``alpha / rank``."""
        return float(self.alpha) / self.rank

    def _fail(self, message: str) -> None:
        raise self.error(f"{self.field_prefix}{message}")


def expert_factors(base: nn.Linear, rank: int, count: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """``count`` LoRA factor pairs (A: in -> rank, B: rank -> out) on ``base``'s device and
    dtype; every B starts at zero, so the experts start as the identity change."""
    kw = {"device": base.weight.device, "dtype": base.weight.dtype}
    a = nn.ModuleList(nn.Linear(base.in_features, rank, bias=False, **kw) for _ in range(count))
    b = nn.ModuleList(nn.Linear(rank, base.out_features, bias=False, **kw) for _ in range(count))
    for layer in b:
        nn.init.zeros_(layer.weight)
    return a, b


def target_linears(
    model: nn.Module,
    target_modules: tuple[str, ...],
    error: type[Exception],
    layers: tuple[int, ...] | None = None,
) -> list[str]:
    """Names of the ``nn.Linear`` layers whose last name part is one of ``target_modules``, in
    model order, within the decoder layers ``layers`` (indices; negative ones count from the
    last; None: every layer); none raises ``error`` naming the linear layers the model has."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = [n for n in linears if n.rpartition(".")[2] in target_modules]
    if layers is not None:
        chosen = _resolved(layers, model, error)
        targets = [n for n in targets if _layer_index(n) in chosen]
    if not targets:
        raise error(
            f"no nn.Linear named any of {target_modules} in {type(model).__name__}; "
            f"its linear layers are named {sorted({n.rpartition('.')[2] for n in linears})}"
        )
    return targets


LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
"""Where a decoder layer's index sits in a module name (Llama, Mistral, Qwen, OLMo, ...)."""


def _layer_index(name: str) -> int | None:
    match = LAYER_INDEX.search(f".{name}")
    return None if match is None else int(match.group(1))


def _resolved(layers: tuple[int, ...], model: nn.Module, error: type[Exception]) -> set[int]:
    """``layers`` as non-negative indices of the model's decoder layers."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if count is None:
        raise error("layers needs a model whose config gives num_hidden_layers")
    out = set()
    for i in layers:
        if not -count <= i < count:
            raise error(f"layers: {i} is not a layer of a model with {count} layers")
        out.add(i % count)
    return out


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``root``'s submodule ``name`` was."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def wrap_targets(
    model: nn.Module, shape: ExpertShape, wrap: Callable[[nn.Linear], nn.Module]
) -> None:
    """Freeze the base model and replace every target linear layer ``l`` by ``wrap(l)``."""
    targets = target_linears(model, shape.target_modules, shape.error, shape.layers)
    model.requires_grad_(False)
    for name in targets:
        replace_module(model, name, wrap(model.get_submodule(name)))
