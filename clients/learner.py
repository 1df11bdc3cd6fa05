"""The local side of a strategy as the institution runtime drives it: model, data, one round.

The runtime (:mod:`clients.runtime`) owns the protocol: messages, the privacy ledger, SecAgg+
and metrics. A :class:`Learner` owns everything that depends on the strategy's model: building
it, loading the broadcast adapters, training one round, what that round releases and how the
model is evaluated. Three families implement it:

- :class:`MoELoRALearner`: the MoE-LoRA adapters with a sum strategy of
  ``clients.setup.CLIENT_STRATEGIES`` (FedAvg, FedAlign-MoE, FedMoE); every round releases the
  DP-SGD update and the noised routing statistics;
- ``clients.ddome_learner.DDOMELearner``: DDOME's gate and experts (DP-SGD only);
- ``clients.fedamole_learner.FedAMoLELearner``: FedAMoLE's experts; it also releases affinity
  scores in the clear before training (:class:`SelectsExperts`).

All releases a learner reports are charged by the runtime before the masked input leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Protocol, runtime_checkable

import dp_accounting
import numpy as np
import torch
from torch import nn

from clients.config import FederationConfig
from clients.moe_lora import adapter_state, load_adapter_state, routing_statistics
from clients.routing_release import SENSITIVITY_BASIS, private_routing_statistics, routing_mechanism
from clients.setup import build_strategy_model, client_strategy, institution_data
from clients.strategy import (
    ClientStrategy,
    GlobalState,
    RemembersRounds,
    StrategyError,
    Submission,
    SubmissionLayout,
)
from clients.trainer import Metrics, evaluate, train_local
from privacy import DPConfig, DPTrainingFacts, Release

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class LocalRound:
    """One round of local training: the submission to pack, training metrics by name (``loss``
    at least; private: they stay local), the DP-SGD facts and every release that goes out with
    the masked input (the DP-SGD update first)."""

    submission: Submission
    metrics: dict[str, float]
    facts: DPTrainingFacts | None
    releases: list[Release]


class RecordedCharges:
    """A :class:`clients.release.Charge` that only records: for strategy code that reports its
    releases through a hook while the runtime charges them (as :class:`~privacy.Release`)
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
        self,
        state: GlobalState,
        federation_round: int,
        round_id: int,
        charge: Callable[[Release], object],
    ) -> np.ndarray:
        """The noised scores (float64) to send. ``charge(release)`` runs before any noise is
        drawn; if it raises (a refusal), nothing is computed."""
        ...

    def with_selection(self, state: GlobalState, selection: bytes) -> GlobalState:
        """``state`` with the coordinator's broadcast selection (refused if malformed)."""
        ...


def device_of(config: FederationConfig) -> str | None:
    """``[training].device`` for the trainers (None: CUDA when available)."""
    device = config.training.device
    return None if device == "auto" else device


class MoELoRALearner:
    """MoE-LoRA adapters trained with :func:`clients.trainer.train_local` inside a sum
    strategy's session; the routing statistics are released (noised) every round."""

    def __init__(self, config: FederationConfig, name: str) -> None:
        self.config = config
        self.model, self.tokenizer = build_strategy_model(config)
        self.data: dict[str, torch.Tensor] = institution_data(config, name, self.tokenizer)
        self.strategy: ClientStrategy = client_strategy(config, name)
        self.routing = routing_mechanism(self.model, config.privacy.routing_noise_multiplier)

    def per_round_events(self) -> list[dp_accounting.DpEvent]:
        return [self.routing.dp_event()]

    def adapters(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def load_adapters(self, adapters: Mapping[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, adapters)

    def local_state(self) -> GlobalState:
        local = routing_statistics(self.model)
        return GlobalState.initial(
            self.adapters(), local.layer_names, local.num_experts, local.top_k
        )

    def extras_shapes(self, state: GlobalState) -> dict[str, tuple[int, ...]]:
        shapes = getattr(self.strategy, "extras_shapes", None)
        return shapes(state) if shapes is not None else {}

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.strategy.layout(state)

    def releases(
        self, state: GlobalState, facts: DPTrainingFacts, federation_round: int, round_id: int
    ) -> list[Release]:
        return [
            facts.release(federation_round, round_id),
            self.routing.release(federation_round, round_id, SENSITIVITY_BASIS),
        ]

    def train(
        self, state: GlobalState, dp: DPConfig, federation_round: int, round_id: int
    ) -> LocalRound:
        train = self.config.training
        blocks = self.data["train"]
        with self.strategy.session(self.model, state) as plan:
            result = train_local(
                self.model, blocks, dp=dp, steps=train.local_steps,
                batch_size=train.batch_size, lr=train.lr, device=device_of(self.config),
                extra_loss=plan.extra_loss, frozen=plan.frozen,
            )  # fmt: skip
            routing = private_routing_statistics(self.model, blocks, self.routing)
        result = replace(result, routing=routing)  # only the noised statistics go further
        submission = self.strategy.submit(state, result, num_examples=len(blocks))
        releases = (
            [] if result.facts is None
            else self.releases(state, result.facts, federation_round, round_id)
        )  # fmt: skip
        return LocalRound(submission, asdict(result.metrics), result.facts, releases)

    def evaluate(self, state: GlobalState, split: str) -> Metrics:
        with self.strategy.session(self.model, state):
            return evaluate(self.model, self.data[split], device=device_of(self.config))

    def memory(self) -> dict[str, np.ndarray]:
        return self.strategy.memory() if isinstance(self.strategy, RemembersRounds) else {}

    def restore(self, memory: Mapping[str, np.ndarray]) -> None:
        if isinstance(self.strategy, RemembersRounds):
            self.strategy.restore(memory)
        elif memory:
            raise StrategyError(f"the {self.config.aggregation.strategy} client keeps no memory")


class Stateless:
    """The memory of a learner whose rounds derive from the broadcast alone (DDOME, FedAMoLE)."""

    def memory(self) -> dict[str, np.ndarray]:
        return {}

    def restore(self, memory: Mapping[str, np.ndarray]) -> None:
        if memory:
            raise StrategyError(f"this strategy keeps no memory, got {sorted(memory)}")
