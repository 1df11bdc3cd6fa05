"""FedAvg of adapter deltas weighted by public institution weights, and the MoE-LoRA learner.

A client submits its public weight ``w`` (declared in the federation config, the same every
round, see ``FederationConfig.public_weight``) and ``w * delta``; the coordinator sets
``delta = sum(w * delta) / sum(w)``. The MoE-LoRA learner
trains the adapters of :mod:`clients.models.moe_lora` with
:func:`clients.training.trainer.train_local` inside a sum strategy's session (FedAvg, FedAlign-MoE
or FedMoE) and releases its noised routing statistics every round.

Paper mechanisms (FedAvg, McMahan et al. 2017), one line each:

* several local steps per round on the client's data: adapted for privacy: the steps are DP-SGD
  (per-block clipping, Gaussian noise), on the LoRA adapters only.
* server average weighted by the number of examples n_k: adapted for privacy: n_k is private
  (two rounds' sums would give it away), so the weight is a public one declared per institution
  in the config (default: equal), and the coordinator reads only the secure sums of w·delta
  and w.
* random client sampling each round (fraction C): left out: every live institution takes part;
  rounds are few and a fixed roster keeps the secure-sum thresholds simple.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import replace
from functools import partial
from typing import TypeVar

import dp_accounting
import msgspec
import numpy as np
import torch

from clients.contract.config import FederationConfig
from clients.contract.layout import CHANNELS
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import ROUTING
from clients.contract.layout import WEIGHT
from clients.contract.layout import Channel
from clients.contract.layout import GlobalState
from clients.contract.layout import Segment
from clients.contract.layout import StrategyError
from clients.contract.layout import Submission
from clients.contract.layout import SubmissionLayout
from clients.contract.layout import check_routing_matches
from clients.data.sources import institution_data
from clients.models.build import build_model
from clients.models.build import moe_lora_config
from clients.models.moe_lora import adapter_state
from clients.models.moe_lora import attach
from clients.models.moe_lora import load_adapter_state
from clients.models.moe_lora import routing_statistics
from clients.models.peft_bridge import init_from_peft
from clients.strategies.base import ClientHalf
from clients.strategies.base import ClientStrategy
from clients.strategies.base import LocalRound
from clients.strategies.base import RemembersRounds
from clients.strategies.base import StepsOnValidation
from clients.strategies.base import TrainingPlan
from clients.strategies.base import checked_min_weight
from clients.strategies.base import checked_weight
from clients.strategies.base import device_of
from clients.strategies.base import plain_session
from clients.training.routing_release import SENSITIVITY_BASIS
from clients.training.routing_release import private_routing_statistics
from clients.training.routing_release import routing_mechanism
from clients.training.trainer import LocalTrainingResult
from clients.training.trainer import Metrics
from clients.training.trainer import block_losses
from clients.training.trainer import evaluate
from clients.training.trainer import train_local
from privacy import ROUTING_STATISTICS
from privacy import DPConfig
from privacy import DPTrainingFacts
from privacy import GaussianMechanism
from privacy import Release


@dataclass(frozen=True)
class FedAvgConfig:
    """Public parameters of weighted FedAvg of adapter deltas.

    A client submits its public weight ``w`` in (0, 1] and ``w * delta``; the coordinator sets
    ``delta = sum(w * delta) / sum(w)``. ``min_weight`` is the smallest public weight of the
    federation: a weight sum below half of it means nobody contributed. Delta entries beyond
    ``±delta_bound`` and routing values beyond ``±routing_bound`` (per client: a count can
    reach tokens * top_k) are clipped. The weight always travels on the mask channel: the
    coordinator must read ``sum(w)`` to form the ratio, also when the deltas go under CKKS (it
    then scales their encrypted sum by ``delta_bound / sum(w)`` without reading it).
    """

    min_weight: float = 1.0
    delta_bound: float = 0.1
    routing_bound: float = 1e6
    delta_channel: Channel = "mask"
    routing_channel: Channel = "ckks"

    def __post_init__(self) -> None:
        checked_min_weight(self.min_weight)
        for name in ("delta_bound", "routing_bound"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise StrategyError(f"{name} must be finite and > 0, got {value!r}")
        for name in ("delta_channel", "routing_channel"):
            if getattr(self, name) not in CHANNELS:
                raise StrategyError(
                    f"{name} must be one of {CHANNELS}, got {getattr(self, name)!r}"
                )

    def layout(self, state: GlobalState) -> SubmissionLayout:
        """``delta:<name>`` per adapter tensor (state order), ``weight``, then ``routing``."""
        deltas = [
            Segment(DELTA_PREFIX + name, int(t.numel()), self.delta_channel, self.delta_bound)
            for name, t in state.adapters.items()
        ]
        routing_len = len(state.routing.as_vector())
        return SubmissionLayout(
            (
                *deltas,
                Segment(WEIGHT, 1, "mask", 1.0),
                Segment(ROUTING, routing_len, self.routing_channel, self.routing_bound),
            )
        )


@dataclass(frozen=True)
class FedAvgClient:
    """Client side of FedAvg: submits ``w * delta``, ``w`` and the raw routing statistics.

    The routing statistics are submitted as given: a caller that must noise them (they are a
    release) passes a result whose ``routing`` is already noised and charged.
    """

    config: FedAvgConfig

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(state)

    def session(
        self, model: torch.nn.Module, state: GlobalState
    ) -> AbstractContextManager[TrainingPlan]:
        return plain_session()

    def submit(self, state: GlobalState, result: LocalTrainingResult, weight: float) -> Submission:
        check_routing_matches(result.routing, state.routing)
        layout = self.layout(state)
        weight = checked_weight(weight)
        ours = result.routing
        deltas = {
            DELTA_PREFIX + name: t.detach().cpu().double().numpy()
            for name, t in result.delta.items()
        }
        # Clipping applies to the delta itself, before weighting.
        raw = {**deltas, WEIGHT: np.array([weight]), ROUTING: ours.as_vector()}
        clipped = layout.clipped_fraction(raw)
        bound = self.config.delta_bound
        values = {name: weight * np.clip(d, -bound, bound) for name, d in deltas.items()}
        values[WEIGHT] = np.array([weight])
        values[ROUTING] = ours.as_vector()
        return Submission(values=values, clipped=clipped)


def fedavg_config(config: FederationConfig) -> FedAvgConfig:
    """The FedAvg parameters both sides use (they must be identical to agree on the layout)."""
    return FedAvgConfig(
        min_weight=config.smallest_public_weight(),
        delta_channel=config.aggregation.expert_updates,
        routing_channel=config.aggregation.routing_statistics,
    )


Extended = TypeVar("Extended", bound=FedAvgConfig)


def extended_config(
    config: FederationConfig, kind: type[Extended], section: msgspec.Struct
) -> Extended:
    """A strategy config that extends FedAvg's (same weights, bounds and channels) with its
    ``[aggregation.<name>]`` section as ``params``."""
    return kind(**dataclasses.asdict(fedavg_config(config)), params=section)


Section = TypeVar("Section", bound=msgspec.Struct)


def checked_section(section: Section) -> Section:
    """``section`` held to the types and ranges it declares (what loading the TOML file
    checks), for one built in code; :class:`StrategyError` naming the field otherwise."""
    try:
        return msgspec.convert(msgspec.structs.asdict(section), type(section))
    except msgspec.ValidationError as exc:
        raise StrategyError(f"{type(section).__name__}: {exc}") from None


class MoELoRALearner:
    """MoE-LoRA adapters trained with :func:`clients.training.trainer.train_local` inside a sum
    strategy's session; the routing statistics are released (noised) every round."""

    def __init__(self, config: FederationConfig, name: str, strategy: ClientStrategy) -> None:
        self.config = config
        self.model, self.tokenizer = build_model(config)
        self.data: dict[str, torch.Tensor] = institution_data(config, name, self.tokenizer)
        self.strategy = strategy
        self.weight = config.public_weight(name)  # public: the same every round, no data
        privacy = config.privacy
        self.routing = routing_mechanism(
            self.model, privacy.routing_noise_multiplier, privacy.routing_sample_rate
        )
        self.validation = (
            strategy.validation_mechanism() if isinstance(strategy, StepsOnValidation) else None
        )

    def per_round_events(self) -> list[dp_accounting.DpEvent]:
        extra = [] if self.validation is None else [self.validation.dp_event()]
        return moe_lora_round_releases(self.config) + extra

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
        out = [
            facts.release(federation_round, round_id),
            self.routing.release(federation_round, round_id, SENSITIVITY_BASIS),
        ]
        if self.validation is not None and isinstance(self.strategy, StepsOnValidation):
            basis = self.strategy.validation_basis
            out.append(self.validation.release(federation_round, round_id, basis))
        return out

    def train(
        self, state: GlobalState, dp: DPConfig, federation_round: int, round_id: int
    ) -> LocalRound:
        train = self.config.training
        blocks = self.data["train"]
        with self.strategy.session(self.model, state) as plan:
            result = train_local(
                self.model, blocks, dp=dp, steps=train.local_steps,
                batch_size=train.batch_size, lr=train.lr, device=device_of(self.config),
                physical_batch_size=train.physical_batch_size,
                extra_loss=plan.extra_loss, frozen=plan.frozen,
            )  # fmt: skip
            routing = private_routing_statistics(self.model, blocks, self.routing)
            signal = self._validation_signal()
        result = replace(result, routing=routing)  # only the noised statistics go further
        submission = self.strategy.submit(state, result, self.weight)
        releases = (
            [] if result.facts is None
            else self.releases(state, result.facts, federation_round, round_id)
        )  # fmt: skip
        local = LocalRound(submission, asdict(result.metrics), result.facts, releases)
        if signal is not None and isinstance(self.strategy, StepsOnValidation):
            return replace(local, after_charge=partial(self.strategy.observe, signal))
        return local

    def _validation_signal(self) -> float | None:
        """The strategy's validation signal on the model in session, noised (charged with this
        round's releases, before this round's masked input leaves); None without one."""
        if self.validation is None or not isinstance(self.strategy, StepsOnValidation):
            return None
        losses = block_losses(self.model, self.data["validation"], device=device_of(self.config))
        exact = self.strategy.validation_loss(losses.numpy())
        return float(self.validation.apply(np.array([exact]))[0])

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


def moe_lora_initial_state(config: FederationConfig) -> GlobalState:
    """Round 0 of the MoE-LoRA strategies: the seeded adapters (every expert started from
    ``[model] init_adapter`` if given), zero routing, no extras."""
    model, _ = build_model(config)
    if config.model.init_adapter is not None:
        init_from_peft(model, config.model.init_adapter, config.model)
    stats = routing_statistics(model)
    return GlobalState.initial(
        adapter_state(model), stats.layer_names, stats.num_experts, stats.top_k
    )


def moe_lora_round_releases(config: FederationConfig) -> list[dp_accounting.DpEvent]:
    """The MoE-LoRA strategies' other release each round: the noised routing statistics (the
    event does not depend on the sensitivity, which the noise is scaled to)."""
    privacy = config.privacy
    mechanism = GaussianMechanism(
        privacy.routing_noise_multiplier, 1.0, ROUTING_STATISTICS, privacy.routing_sample_rate
    )
    return [mechanism.dp_event()]


def moe_lora_half(
    strategy: Callable[[FederationConfig, str], ClientStrategy],
    extra_events: Callable[[FederationConfig], list[dp_accounting.DpEvent]] | None = None,
) -> ClientHalf:
    """The client half of a sum strategy on the MoE-LoRA adapters: ``strategy(config, name)`` is
    a new client-side object for institution ``name`` (strategies keep memory between rounds;
    FedMoE's budget differs per institution); ``extra_events``: what the strategy releases each
    round besides the routing statistics (it must match the learner's ``per_round_events``)."""

    def round_releases(config: FederationConfig) -> list[dp_accounting.DpEvent]:
        extra = [] if extra_events is None else extra_events(config)
        return moe_lora_round_releases(config) + extra

    return ClientHalf(
        attach=lambda model, config: attach(model, moe_lora_config(config.model.moe)),
        load_adapters=load_adapter_state,
        initial_state=moe_lora_initial_state,
        round_releases=round_releases,
        learner=lambda config, name: MoELoRALearner(config, name, strategy(config, name)),
        sum_strategy=strategy,
    )


CLIENT_HALF = moe_lora_half(lambda config, name: FedAvgClient(fedavg_config(config)))
