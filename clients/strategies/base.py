"""What every strategy's client half provides, as the institution runtime drives it.

A :class:`Learner` owns everything that depends on the strategy's model: building it, loading
the broadcast adapters, training one round, what that round releases and how the model is
evaluated. The MoE-LoRA strategies (FedAvg, FedAlign-MoE, FedMoE) share one learner
(:class:`clients.strategies.fedavg.MoELoRALearner`) and differ in a :class:`ClientStrategy`,
which shapes local training through :meth:`ClientStrategy.session` (an extra per-sample loss,
entries held fixed, model hooks) and turns its result into a submission. FedAMoLE and DDOME
bring their own adapters and learners.

All releases a learner reports are charged by whoever drives the round before the masked
input leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from contextlib import AbstractContextManager
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from typing import Protocol
from typing import runtime_checkable

import dp_accounting
import numpy as np
import torch
from torch import nn

from clients.contract.config import FederationConfig
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.contract.layout import Submission
from clients.contract.layout import SubmissionLayout
from clients.data.sources import institution_data
from clients.models.build import build_model_with
from clients.models.lora_experts import ExpertShape
from clients.training.trainer import ExtraLoss
from clients.training.trainer import LocalTrainingResult
from clients.training.trainer import Metrics
from privacy import DPConfig
from privacy import DPTrainingFacts
from privacy import GaussianMechanism
from privacy import Release

ChargeRelease = Callable[[Release], object]
"""Charges a release to the institution's ledger before it happens (raises if refused)."""


@dataclass(frozen=True)
class TrainingPlan:
    """How a strategy shapes one round of local training (``train_local``'s matching arguments).

    ``extra_loss``: a per-sample term added to the loss; ``frozen``: per adapter tensor, a bool
    mask of entries held at their starting values. Empty by default (plain local training).
    """

    extra_loss: ExtraLoss | None = None
    frozen: dict[str, torch.Tensor] | None = None


@contextmanager
def plain_session() -> Iterator[TrainingPlan]:
    """The session of a strategy that changes nothing about local training or inference."""
    yield TrainingPlan()


class ClientStrategy(Protocol):
    """Client side of an aggregation strategy.

    Per round, after loading the broadcast adapters: ``with strategy.session(model, state) as
    plan: train_local(..., extra_loss=plan.extra_loss, frozen=plan.frozen)``, then
    :meth:`submit`. Evaluation runs inside a session too, so a strategy that restricts the model
    (FedMoE's sub-MoE) scores the model the institution actually uses.

    A strategy that reads :attr:`GlobalState.extras` also has ``extras_shapes(state) ->
    dict[str, tuple[int, ...]]``: the names and shapes it expects, so the runtime can refuse a
    malformed broadcast (``clients.contract.extras``); one without it accepts no extras.
    """

    def layout(self, state: GlobalState) -> SubmissionLayout:
        """The round's layout, derived from the broadcast state and public config only."""
        ...

    def session(
        self, model: torch.nn.Module, state: GlobalState
    ) -> AbstractContextManager[TrainingPlan]:
        """Install what this round's training and inference need on ``model`` (after the global
        adapters were loaded into it) and yield the training plan; undo it on exit."""
        ...

    def submit(self, state: GlobalState, result: LocalTrainingResult, weight: float) -> Submission:
        """The named segments this client adds to the round's secure sums; ``weight`` is the
        institution's public weight (declared in the config, never derived from data)."""
        ...


@runtime_checkable
class RemembersRounds(Protocol):
    """A client strategy with memory between rounds (FedAlign-MoE's last broadcast adapters,
    FedMoE's activation pattern), which the runtime keeps on disk so that a restarted
    institution goes on where it stopped. The memory never leaves the institution."""

    def memory(self) -> dict[str, np.ndarray]:
        """The memory as named float64 arrays (empty before the first round)."""
        ...

    def restore(self, memory: Mapping[str, np.ndarray]) -> None:
        """Take back what :meth:`memory` returned (:class:`StrategyError` if it does not fit)."""
        ...


@runtime_checkable
class StepsOnValidation(Protocol):
    """A client strategy steered by a DP-noised validation signal (FedMoE's revise and revert).

    The learner computes per-block validation losses, asks :meth:`validation_loss` for the
    exact signal, adds :meth:`validation_mechanism`'s noise, reports the release with the
    round's others (charged before the masked input leaves) and hands the noised value to
    :meth:`observe`; nothing un-noised is kept."""

    validation_basis: str
    """Why the mechanism's sensitivity holds, in words (ledger and report)."""

    def validation_mechanism(self) -> GaussianMechanism:
        """The signal's Gaussian mechanism (sensitivity and noise multiplier)."""
        ...

    def validation_loss(self, losses: np.ndarray) -> float:
        """The exact signal from per-block validation losses."""
        ...

    def observe(self, signal: float) -> None:
        """Take this round's noised signal."""
        ...


def checked_weight(weight: float) -> float:
    """An institution's public weight (``FederationConfig.public_weight``: declared in the
    config, the same every round, never derived from data), held to (0, 1]."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
        raise StrategyError(f"weight must be a public number in (0, 1], got {weight!r}")
    return float(weight)


def checked_min_weight(min_weight: float) -> None:
    """The smallest public weight of the federation, held to (0, 1]."""
    if (
        isinstance(min_weight, bool)
        or not isinstance(min_weight, (int, float))
        or not (0 < min_weight <= 1)
    ):
        raise StrategyError(f"min_weight must be in (0, 1], got {min_weight!r}")


SPLITS = ("train", "validation", "test")


def _nothing_to_keep() -> None:
    """The default :attr:`LocalRound.after_charge`."""


@dataclass(frozen=True)
class LocalRound:
    """One round of local training: the submission to pack, training metrics by name (``loss``
    at least; private: they stay local), the DP-SGD facts and every release that goes out with
    the masked input (the DP-SGD update first).

    ``after_charge`` keeps what the learner learnt from this round's noised releases for later
    rounds (FedMoE's validation signal); whoever drives the round calls it only once the
    releases are charged, so a refused release steers nothing.
    """

    submission: Submission
    metrics: dict[str, float]
    facts: DPTrainingFacts | None
    releases: list[Release]
    after_charge: Callable[[], None] = _nothing_to_keep


class RecordedCharges:
    """A :class:`clients.training.release.Charge` that only records: for strategy code that reports
    its releases through a hook while the runtime charges them (as :class:`~privacy.Release`)
    before the masked input leaves."""

    def __init__(self) -> None:
        self.events: list[tuple[dp_accounting.DpEvent, str]] = []

    def __call__(self, event: dp_accounting.DpEvent, what: str) -> None:
        self.events.append((event, what))


class Learner(Protocol):
    """One strategy family's local model and round, behind the institution runtime."""

    model: nn.Module
    data: dict[str, torch.Tensor]

    def per_round_events(self) -> list[dp_accounting.DpEvent]:
        """What one round releases besides DP-SGD, to calibrate the DP-SGD noise for the plan."""
        ...

    def adapters(self) -> dict[str, torch.Tensor]:
        """The model's current adapters (the global state's names and order)."""
        ...

    def load_adapters(self, adapters: Mapping[str, torch.Tensor]) -> None:
        """Load broadcast adapters into the model."""
        ...

    def local_state(self) -> GlobalState:
        """The model's adapters as a state with no broadcast aggregates (zero routing, no
        extras): what the institution evaluates before the first broadcast."""
        ...

    def extras_shapes(self, state: GlobalState) -> dict[str, tuple[int, ...]]:
        """The broadcast extras this family reads, by name, with their shapes."""
        ...

    def layout(self, state: GlobalState) -> SubmissionLayout:
        """The round's submission layout (the coordinator derives the same one)."""
        ...

    def releases(
        self, state: GlobalState, facts: DPTrainingFacts, federation_round: int, round_id: int
    ) -> list[Release]:
        """What a round under ``state`` releases with the masked input, for the budget check
        before training (``facts`` are the planned DP-SGD facts)."""
        ...

    def train(
        self, state: GlobalState, dp: DPConfig, federation_round: int, round_id: int
    ) -> LocalRound:
        """Train one round from ``state`` (its adapters already loaded) and build the
        submission; nothing is charged or sent here."""
        ...

    def evaluate(self, state: GlobalState, split: str) -> Metrics:
        """Metrics on ``split`` of the model this institution uses under ``state``."""
        ...

    def memory(self) -> dict[str, np.ndarray]:
        """What the strategy remembers between rounds (kept on disk by the runtime; empty for
        a strategy that derives every round from the broadcast alone)."""
        ...

    def restore(self, memory: Mapping[str, np.ndarray]) -> None:
        """Take back :meth:`memory` after a restart."""
        ...


@runtime_checkable
class SelectsExperts(Protocol):
    """A learner whose round starts with a selection stage (FedAMoLE's reverse selection):
    it releases noised scores in the clear, and trains once the coordinator's choice arrives."""

    def wants_scores(self, state: GlobalState) -> bool:
        """Whether this round starts with the selection stage (not before any keys exist)."""
        ...

    def score_release(self, state: GlobalState, federation_round: int, round_id: int) -> Release:
        """The scores' release, for the budget check before the round."""
        ...

    def scores(
        self, state: GlobalState, federation_round: int, round_id: int, charge: ChargeRelease
    ) -> np.ndarray:
        """The noised scores (float64) to send. ``charge(release)`` runs before any noise is
        drawn; if it raises (a refusal), nothing is computed."""
        ...

    def with_selection(self, state: GlobalState, selection: bytes) -> GlobalState:
        """``state`` with the coordinator's broadcast selection (refused if malformed)."""
        ...


def device_of(config: FederationConfig) -> str | None:
    """``[training].device`` for the trainers (None: CUDA when available)."""
    return config.training.torch_device


@dataclass(frozen=True)
class ClientHalf:
    """A strategy's client half as the registry holds it: how its adapters go onto a base
    model (``attach``) and load a state (``load_adapters``), the round-0 state every party
    derives from the config, and institution ``name``'s learner."""

    attach: Callable[[nn.Module, FederationConfig], object]
    load_adapters: Callable[[nn.Module, Mapping[str, torch.Tensor]], None]
    initial_state: Callable[[FederationConfig], GlobalState]
    learner: Callable[[FederationConfig, str], Learner]
    round_releases: Callable[[FederationConfig], list[dp_accounting.DpEvent]]
    """What one round releases besides DP-SGD (the learner's ``per_round_events``), known from
    the config alone: the privacy plan is made before any model is loaded."""
    sum_strategy: Callable[[FederationConfig, str], ClientStrategy] | None = None
    """For a sum strategy on the MoE-LoRA adapters: a new client-side object for the named
    institution (one per institution: strategies keep memory between rounds, FedMoE's budget
    differs); None for a strategy with its own adapters and learner."""

    def build_model(self, config: FederationConfig) -> tuple[nn.Module, Any]:
        """The seeded base model of ``[model]`` with these adapters, and its tokenizer."""
        return build_model_with(config, lambda model: self.attach(model, config))


@dataclass(frozen=True)
class OwnAdapters:
    """The adapter family of a strategy that brings its own (FedAMoLE, DDOME): ``shape_of``
    gives its shape from the config, ``attach`` adds it to a base model, ``state`` lists its
    parameters (the global adapters) and ``load`` puts them back."""

    shape_of: Callable[[FederationConfig], ExpertShape]
    attach: Callable[[nn.Module, Any], object]
    state: Callable[[nn.Module], dict[str, torch.Tensor]]
    load: Callable[[nn.Module, Mapping[str, torch.Tensor]], None]

    def build(self, config: FederationConfig) -> tuple[nn.Module, Any]:
        """The seeded base model with these adapters, and its tokenizer."""
        shape = self.shape_of(config)
        return build_model_with(config, lambda model: self.attach(model, shape))

    def client_half(
        self,
        learner: Callable[[FederationConfig, str], Learner],
        round_releases: Callable[[FederationConfig], list[dp_accounting.DpEvent]],
    ) -> ClientHalf:
        """The strategy's client half: round 0 is the seeded adapters with no routing
        statistics (the model does not route per token)."""

        def initial_state(config: FederationConfig) -> GlobalState:
            model, _ = self.build(config)
            return GlobalState.initial(self.state(model), (), config.model.moe.num_experts)

        return ClientHalf(
            attach=lambda model, config: self.attach(model, self.shape_of(config)),
            load_adapters=self.load,
            initial_state=initial_state,
            learner=learner,
            round_releases=round_releases,
        )


class OwnAdaptersLearner:
    """What the learners of strategies with their own adapters (FedAMoLE, DDOME) share: the
    model with the family's adapters (the global adapters are their state), institution
    ``name``'s data, no routing statistics, and nothing remembered between rounds (every round
    derives from the broadcast alone)."""

    def __init__(self, config: FederationConfig, name: str, family: OwnAdapters) -> None:
        self.config = config
        self.family = family
        self.num_experts = family.shape_of(config).num_experts
        self.model, self.tokenizer = family.build(config)
        self.data: dict[str, torch.Tensor] = institution_data(config, name, self.tokenizer)
        self.weight = config.public_weight(name)  # public: the same every round, no data

    def adapters(self) -> dict[str, torch.Tensor]:
        return self.family.state(self.model)

    def load_adapters(self, adapters: Mapping[str, torch.Tensor]) -> None:
        self.family.load(self.model, adapters)

    def local_state(self) -> GlobalState:
        return GlobalState.initial(self.adapters(), (), self.num_experts)

    def memory(self) -> dict[str, np.ndarray]:
        return {}

    def restore(self, memory: Mapping[str, np.ndarray]) -> None:
        if memory:
            raise StrategyError(f"this strategy keeps no memory, got {sorted(memory)}")
