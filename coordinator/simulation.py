"""A whole federation in one process, for experiments: real DP-SGD, real SecAgg+ and CKKS.

:func:`simulate` runs ``config``'s federation with any strategy by name, through one small
runner per kind of strategy (:data:`RUNNERS`) and one loop:

- the registered sum strategies (``fedavg``, ``fedalign``, ``fedmoe``): every institution trains
  its MoE-LoRA adapters with :func:`clients.training.trainer.train_local` inside its strategy's
  session, releases its routing statistics as the runtime does
  (:mod:`clients.training.routing_release`: one pass over its training blocks, Gaussian noise of
  the stated sensitivity) and submits; the submissions are summed by
  :func:`coordinator.strategies.base.aggregate_locally` (a full SecAgg+ round for the mask channel,
  CKKS for the other) and, as in the runtime, the institutions decode the CKKS routing sum
  themselves;
- ``fedamole`` and ``ddome``, with their own adapters, through their own in-process
  ``run_round`` (real SecAgg+); FedAMoLE's affinity scores and expert keys are noised releases;
- ``local``: each institution trains its own adapters for the same steps, nothing leaves.

Privacy as in ``sealmoe run``: each institution's DP-SGD noise is calibrated once
(:func:`privacy.calibrate_noise` with ``also=``) for ``rounds + spare_rounds`` rounds of every
release its strategy makes per round (the local baseline, which releases nothing and is never
retried, for ``rounds`` rounds of DP-SGD). Every release is charged, before it is used, to the
institution's :class:`HarnessLedger`, which refuses one beyond the budget; the reported epsilon
is the composition of every charged event. Without DP (``private=False``) nothing is noised or
charged. Without a network, processes or keys on disk, but with the same numbers: it is for
comparing strategies, not for measuring the protocol's cost.

One model is shared: each institution's adapters are loaded into it before it trains or is
evaluated.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import dp_accounting
import msgspec
import numpy as np
import torch

from clients.contract.config import FederationConfig
from clients.contract.layout import ROUTING, GlobalState, NoContribution, Submission
from clients.contract.routing import RoutingStats
from clients.data.sources import institution_data
from clients.models.build import build_model, build_model_with
from clients.models.ddome_lora import attach_ddome, common_embedding, ddome_state
from clients.models.fedamole_lora import (
    amole_layers,
    amole_state,
    attach_amole,
    load_amole_state,
    set_held,
)
from clients.models.moe_lora import adapter_state, load_adapter_state, routing_statistics
from clients.strategies.base import ClientStrategy, TrainingPlan, plain_session
from clients.strategies.ddome import (
    DDOMEClient,
    DDOMEState,
    ddome_anchor,
    ddome_config,
    evaluate_choice,
)
from clients.strategies.fedamole import FedAMoLEClient, FedAMoLEState, fedamole_config
from clients.strategies.registry import CLIENT_HALVES
from clients.training.routing_release import (
    block_normalised_statistics,
    private_routing_statistics,
    routing_mechanism,
)
from clients.training.trainer import Metrics, evaluate, train_local
from coordinator.strategies import ddome, fedamole
from coordinator.strategies.base import CoordinatorStrategy, aggregate_locally
from coordinator.strategies.registry import COORDINATOR_STRATEGIES
from privacy import BudgetExceeded, DPConfig, make_accountant
from secagg.ckks import CkksKeyHolder

LOCAL = "local"
"""The no-federation baseline's name."""
NO_NOISE = 1e-9
"""FedAMoLE's score and key noise multiplier in runs without DP."""

ClientFactory = Callable[[FederationConfig, str], ClientStrategy]


class HarnessLedger:
    """One institution's charges in the harness: every ``(what, DpEvent)`` that left it, in order.

    Called as a :class:`clients.training.release.Charge`. Like ``audit.Ledger`` it prices the new
    event with everything on record (one running accountant) and refuses
    (:class:`privacy.BudgetExceeded`) a release beyond the budget, so nothing is used that was
    not charged.
    """

    def __init__(self, budget_epsilon: float, delta: float, accountant: str) -> None:
        self.budget_epsilon, self.delta = budget_epsilon, delta
        self.charged: list[tuple[str, dp_accounting.DpEvent]] = []
        self._accountant = make_accountant(accountant)
        self._spent = 0.0

    def epsilon(self) -> float:
        """Epsilon of everything charged, composed (0 for nothing)."""
        return self._spent

    def __call__(self, event: dp_accounting.DpEvent, what: str) -> None:
        trial = copy.deepcopy(self._accountant)
        trial.compose(event)
        projected = float(trial.get_epsilon(self.delta))
        if projected > self.budget_epsilon:
            raise BudgetExceeded(self._spent, projected, self.budget_epsilon, self.delta)
        self._accountant, self._spent = trial, projected
        self.charged.append((what, event))


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One round: per institution its mean training loss; whether the aggregate was applied;
    public diagnostics of the new state (e.g. the global routing entropy)."""

    round: int
    train_loss: dict[str, float]
    applied: bool
    diagnostics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """Per institution: test metrics before and after, epsilon composed from every charged
    event (None without DP) and the charged releases; the last global state (the initial one
    for ``"local"``)."""

    strategy: str
    private: bool
    initial: dict[str, Metrics]
    final: dict[str, Metrics]
    epsilon: dict[str, float | None]
    charged: dict[str, list[tuple[str, dp_accounting.DpEvent]]]
    rounds: list[RoundRecord]
    state: Any


class _Runner(Protocol):
    """One strategy's federation: its data and state, what it releases per round besides
    DP-SGD, one round, and evaluation. ``retried``: a coordinator may retry its rounds, so the
    noise is calibrated for ``spare_rounds`` more (as in the runtime)."""

    data: dict[str, dict[str, torch.Tensor]]
    state: Any
    retried: bool

    def per_round(self) -> list[dp_accounting.DpEvent]:
        """The releases of one round besides DP-SGD (planned: the calibration covers them)."""
        ...

    def start(self, dp: dict[str, DPConfig | None], ledgers: dict[str, HarnessLedger]) -> None:
        """Take the calibrated DP configs and the ledgers (before the first round)."""
        ...

    def evaluate(self, name: str) -> Metrics:
        """Institution ``name``'s test metrics under the current state."""
        ...

    def round(self, index: int) -> RoundRecord:
        """Run round ``index``: train, release (charged), aggregate."""
        ...


def strategy_names() -> list[str]:
    """Every name :func:`simulate` accepts."""
    registered = set(CLIENT_HALVES) & set(COORDINATOR_STRATEGIES)
    return [LOCAL, *sorted(registered | set(RUNNERS))]


def simulate(
    config: FederationConfig,
    strategy: str,
    *,
    private: bool = True,
    client_factory: ClientFactory | None = None,
) -> SimulationResult:
    """Run ``config.federation.rounds`` rounds of ``strategy`` and evaluate on every test split.

    ``private=False`` trains without DP-SGD and releases without noise (same steps).
    ``client_factory`` overrides a sum strategy's registered client side (e.g. to give
    institutions different FedMoE memory budgets).
    """
    if strategy not in strategy_names():
        raise KeyError(f"unknown strategy {strategy!r}; known: {strategy_names()}")
    config = _with_strategy(config, strategy)
    runner = RUNNERS.get(strategy, _SumRunner)(config, strategy, private, client_factory)
    names = config.institution_names
    ledgers = {name: _ledger(config, name) for name in names}
    dp: dict[str, DPConfig | None] = dict.fromkeys(names)
    if private:
        planned = config.federation.rounds + (config.privacy.spare_rounds if runner.retried else 0)
        also = [dp_accounting.SelfComposedDpEvent(e, planned) for e in runner.per_round()]
        train = config.training
        for name in names:
            n_train = len(runner.data[name]["train"])
            dp[name] = _calibrated(
                config.dp_config(name),
                min(1.0, train.batch_size / n_train),
                planned * train.local_steps,
                tuple(also),
            )
    runner.start(dp, ledgers)
    initial = {name: runner.evaluate(name) for name in names}
    rounds = [runner.round(index) for index in range(config.federation.rounds)]
    final = {name: runner.evaluate(name) for name in names}
    spent = {name: ledgers[name].epsilon() if private else None for name in names}
    charged = {name: list(ledgers[name].charged) for name in names}
    return SimulationResult(strategy, private, initial, final, spent, charged, rounds, runner.state)


@functools.lru_cache(maxsize=64)
def _calibrated(
    dp: DPConfig, sample_rate: float, total_steps: int, also: tuple[dp_accounting.DpEvent, ...]
) -> DPConfig:
    """``dp.calibrated(...)``, remembered: institutions and runs with one plan share it (the
    search composes the whole plan many times)."""
    return dp.calibrated(sample_rate=sample_rate, total_steps=total_steps, also=also)


def _ledger(config: FederationConfig, name: str) -> HarnessLedger:
    budget = config.budget(name)
    return HarnessLedger(budget.target_epsilon, budget.target_delta, config.privacy.accountant)


def _with_strategy(config: FederationConfig, strategy: str) -> FederationConfig:
    if strategy == LOCAL:
        return config
    aggregation = msgspec.structs.replace(config.aggregation, strategy=strategy)
    return msgspec.structs.replace(config, aggregation=aggregation)


def _device(config: FederationConfig) -> str | None:
    return None if config.training.device == "auto" else config.training.device


def _normalised_entropy(p: np.ndarray) -> float:
    """Mean over rows of the entropy of distribution rows of ``p``, divided by log(columns)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, None)
    p = p / p.sum(-1, keepdims=True)
    return float(np.mean(-(p * np.log(p)).sum(-1)) / np.log(p.shape[-1]))


# ---------------------------------------------------------------------- sum strategies and local


class _SumRunner:
    """MoE-LoRA strategies whose clients submit into secure sums, and the local baseline."""

    def __init__(
        self,
        config: FederationConfig,
        strategy: str,
        private: bool,
        client_factory: ClientFactory | None,
    ) -> None:
        self.config, self.strategy, self.private = config, strategy, private
        self.model, tokenizer = build_model(config)
        self.names = config.institution_names
        self.data = {n: institution_data(config, n, tokenizer) for n in self.names}
        self.routing = routing_mechanism(self.model, config.privacy.routing_noise_multiplier)
        stats = routing_statistics(self.model)
        self.state = GlobalState.initial(
            adapter_state(self.model), stats.layer_names, stats.num_experts, stats.top_k
        )
        self.federated = self.retried = strategy != LOCAL
        half = CLIENT_HALVES.get(strategy)
        factory = client_factory or (
            (lambda c, _: half.sum_strategy(c)) if half and half.sum_strategy else None
        )
        self.clients = {n: factory(config, n) for n in self.names} if self.federated else {}
        self.coordinator: CoordinatorStrategy | None = (
            COORDINATOR_STRATEGIES[strategy](config) if self.federated else None
        )
        self.own = {n: dict(self.state.adapters) for n in self.names}  # the local baseline's
        self.ckks = CkksKeyHolder.generate(config.aggregation.ckks.params())
        self.threshold, _ = config.secagg.resolved(len(self.names))

    def per_round(self) -> list[dp_accounting.DpEvent]:
        return [self.routing.dp_event()] if self.federated else []

    def start(self, dp: dict[str, DPConfig | None], ledgers: dict[str, HarnessLedger]) -> None:
        self.dp, self.ledgers = dp, ledgers

    def _session(self, name: str) -> AbstractContextManager[TrainingPlan]:
        if not self.federated:
            load_adapter_state(self.model, self.own[name])
            return plain_session()
        load_adapter_state(self.model, self.state.adapters)
        return self.clients[name].session(self.model, self.state)

    def evaluate(self, name: str) -> Metrics:
        with self._session(name):
            return evaluate(self.model, self.data[name]["test"], device=_device(self.config))

    def round(self, index: int) -> RoundRecord:
        train = self.config.training
        losses, submissions = {}, []
        for name in self.names:
            blocks = self.data[name]["train"]
            with self._session(name) as plan:
                result = train_local(
                    self.model, blocks, dp=self.dp[name], steps=train.local_steps,
                    batch_size=train.batch_size, lr=train.lr, device=_device(self.config),
                    progress=False, extra_loss=plan.extra_loss, frozen=plan.frozen,
                )  # fmt: skip
                if result.facts is not None:
                    self.ledgers[name](result.facts.dp_event(), "adapter update (DP-SGD)")
                if self.federated:  # routing statistics leave: noised and charged first
                    result = dataclasses.replace(result, routing=self._routing(name, blocks))
            losses[name] = result.metrics.loss
            if self.federated:
                submissions.append(self.clients[name].submit(self.state, result, len(blocks)))
            else:
                self.own[name] = adapter_state(self.model)
        if not self.federated:
            return RoundRecord(index, losses, applied=False)
        assert self.coordinator is not None
        self.state, applied = _aggregate(
            self.config, self.coordinator, self.state, submissions, self.threshold, self.ckks
        )
        entropy = _normalised_entropy(self.state.routing_distribution)
        return RoundRecord(index, losses, applied, {"routing_entropy": entropy})

    def _routing(self, name: str, blocks: torch.Tensor) -> RoutingStats:
        """The runtime's routing release: block-normalised statistics of every training block,
        with Gaussian noise (charged first) under DP, exact without."""
        if not self.private:
            return block_normalised_statistics(self.model, blocks)
        self.ledgers[name](self.routing.dp_event(), "routing statistics (Gaussian)")
        return private_routing_statistics(self.model, blocks, self.routing)


def _aggregate(
    config: FederationConfig,
    coordinator: CoordinatorStrategy,
    state: GlobalState,
    submissions: list[Submission],
    threshold: int,
    ckks: CkksKeyHolder,
) -> tuple[GlobalState, bool]:
    """One round's secure sums and the next state; the state unchanged when nobody contributed."""
    layout = coordinator.layout(state)
    packed = [layout.pack(s.values) for s in submissions]
    sec = config.secagg
    uses_ckks = "ckks" in layout.channels
    agg = aggregate_locally(
        layout, packed, threshold=threshold, bits=sec.bits, modulus_bits=sec.modulus_bits,
        ckks=ckks if uses_ckks else None,
    )  # fmt: skip
    try:
        new = coordinator.aggregate(state, {"mask": agg.sums["mask"]})
    except NoContribution:
        return state, False
    if layout[ROUTING].channel == "ckks":  # the institutions decrypt it, not the coordinator
        old = new.routing
        summed = np.maximum(layout.unpack({"ckks": agg.sums["ckks"]}, partial=True)[ROUTING], 0)
        routing = RoutingStats.from_vector(summed, old.layer_names, old.num_experts, old.top_k)
        new = GlobalState(new.adapters, routing, new.extras)
    return new, True


# ---------------------------------------------------------------------- FedAMoLE


class _FedAMoLERunner:
    """FedAMoLE: its adapters; scores and keys from the validation split (the auxiliary data).

    Without DP the scores and keys get noise of multiplier ``NO_NOISE`` (the client always adds
    some): numerically exact releases, as the other strategies' are then.
    """

    retried = True

    def __init__(
        self, config: FederationConfig, strategy: str, private: bool, _: ClientFactory | None
    ) -> None:
        self.config, self.private = config, private
        self.fed = fedamole_config(config)
        if not private:
            self.fed = dataclasses.replace(
                self.fed, score_noise_multiplier=NO_NOISE, key_noise_multiplier=NO_NOISE
            )
        self.model, tokenizer = build_model_with(
            config, lambda m: attach_amole(m, self.fed.adapter)
        )
        self.names = config.institution_names
        self.data = {n: institution_data(config, n, tokenizer) for n in self.names}
        self.coordinator = fedamole.FedAMoLECoordinator(self.fed)
        modules = [n for n, _ in amole_layers(self.model)]
        self.state: FedAMoLEState = self.coordinator.initial_state(amole_state(self.model), modules)
        self.threshold, _ = config.secagg.resolved(len(self.names))

    def per_round(self) -> list[dp_accounting.DpEvent]:
        """Scores (from round 1; planned for every round, an upper bound) and keys."""
        return [
            dp_accounting.GaussianDpEvent(self.fed.score_noise_multiplier),
            dp_accounting.GaussianDpEvent(self.fed.key_noise_multiplier),
        ]

    def start(self, dp: dict[str, DPConfig | None], ledgers: dict[str, HarnessLedger]) -> None:
        self.dp = [dp[n] for n in self.names]
        self.institutions = [
            fedamole.FedAMoLEInstitution(
                FedAMoLEClient(self.fed, i, self.model),
                self.data[n]["train"],
                self.data[n]["validation"],
                ledgers[n] if self.private else _uncharged,
            )
            for i, n in enumerate(self.names)
        ]

    def evaluate(self, name: str) -> Metrics:
        load_amole_state(self.model, self.state.adapters)
        set_held(self.model, self.state.held(self.names.index(name)))
        return evaluate(self.model, self.data[name]["test"], device=_device(self.config))

    def round(self, index: int) -> RoundRecord:
        before = self.state.assignment
        train, sec = self.config.training, self.config.secagg
        done = fedamole.run_round(
            self.coordinator, self.institutions, self.state, dp=self.dp,
            steps=train.local_steps, batch_size=train.batch_size, lr=train.lr,
            threshold=self.threshold, bits=sec.bits,
        )  # fmt: skip
        self.state = done.state
        losses = {n: done.updates[i].mean_loss for i, n in enumerate(self.names)}
        changed = float(np.mean(self.state.assignment != before))
        return RoundRecord(index, losses, True, {"assignment_changed": changed})


def _uncharged(event: dp_accounting.DpEvent, what: str) -> None:
    """The charge hook of a run without DP: nothing is accounted."""


# ---------------------------------------------------------------------- DDOME


class _DDOMERunner:
    """DDOME: the gate and all experts broadcast, each institution's top-K chosen locally.

    It releases its DP-SGD update only (the per-expert counts travel un-noised inside the
    secure sum, see docs/fedamole-ddome.md)."""

    retried = True

    def __init__(
        self, config: FederationConfig, strategy: str, private: bool, _: ClientFactory | None
    ) -> None:
        self.config, self.private = config, private
        self.cfg = ddome_config(config)
        self.model, tokenizer = build_model_with(
            config, lambda m: attach_ddome(m, self.cfg.adapter)
        )
        self.names = config.institution_names
        self.data = {n: institution_data(config, n, tokenizer) for n in self.names}
        self.coordinator = ddome.DDOMECoordinator(self.cfg)
        self.state: DDOMEState = self.coordinator.initial_state(ddome_state(self.model))
        self.embedded = {  # the frozen common expert's embeddings, computed once per split
            n: {s: common_embedding(self.model, self.data[n][s]) for s in ("train", "test")}
            for n in self.names
        }
        self.threshold, _ = config.secagg.resolved(len(self.names))

    def per_round(self) -> list[dp_accounting.DpEvent]:
        return []

    def start(self, dp: dict[str, DPConfig | None], ledgers: dict[str, HarnessLedger]) -> None:
        self.dp = [dp[n] for n in self.names]
        self.institutions = [
            ddome.DDOMEInstitution(
                DDOMEClient(self.cfg, self.model, ddome_anchor(self.config, n)),
                self.data[n]["train"],
                self.embedded[n]["train"],
                ledgers[n] if self.private else _uncharged,
            )
            for n in self.names
        ]

    def evaluate(self, name: str) -> Metrics:
        client = DDOMEClient(self.cfg, self.model, ddome_anchor(self.config, name))
        chosen = client.choose(self.state, self.embedded[name]["train"])  # loads the state
        test = self.data[name]["test"]
        return evaluate_choice(self.model, test, self.embedded[name]["test"], chosen)

    def round(self, index: int) -> RoundRecord:
        train, sec = self.config.training, self.config.secagg
        done = ddome.run_round(
            self.coordinator, self.institutions, self.state, dp=self.dp,
            steps=train.local_steps, batch_size=train.batch_size, lr=train.lr,
            threshold=self.threshold, bits=sec.bits,
        )  # fmt: skip
        self.state = done.state
        losses = {n: done.updates[i].mean_loss for i, n in enumerate(self.names)}
        trained = float(np.count_nonzero(self.state.expert_counts))
        return RoundRecord(index, losses, True, {"experts_trained": trained})


RUNNERS: dict[str, Callable[[FederationConfig, str, bool, ClientFactory | None], _Runner]] = {
    "fedamole": _FedAMoLERunner,
    "ddome": _DDOMERunner,
}
"""Strategies with their own adapters and round; every other name (``"local"`` and the
strategies registered in ``clients.contract.keys.CLIENT_STRATEGIES`` and
``coordinator.strategies.registry``) runs on :class:`_SumRunner`."""
