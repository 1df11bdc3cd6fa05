"""A whole federation in one process, for experiments: real DP-SGD, real SecAgg+ and CKKS.

:func:`simulate` runs ``config``'s federation with any registered strategy by name: every
institution trains its adapters with :func:`clients.trainer.train_local` (Opacus DP-SGD, noise
calibrated once for all rounds, as the runtime does), inside its strategy's session, and submits;
the submissions are summed by :func:`coordinator.strategy.aggregate_locally` (a full SecAgg+
round for the mask channel, CKKS for the other); the coordinator side turns the mask sum into the
next state and, as in the runtime, the institutions decode the CKKS routing sum themselves.
``"local"`` is the baseline without federation: each institution trains its own adapters for the
same steps under the same DP budget. Without a network, processes or keys on disk, but with the
same numbers: it is for comparing strategies, not for measuring the protocol's cost.

One model is shared: each institution's adapters are loaded into it before it trains or is
evaluated. Routing statistics enter the sums as training produced them (the runtime does the
same today; their noising is the audit module's release).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import msgspec
import numpy as np

from clients.config import FederationConfig
from clients.moe_lora import RoutingStats, adapter_state, load_adapter_state, routing_statistics
from clients.setup import CLIENT_STRATEGIES, build_model, institution_data
from clients.strategy import (
    ROUTING,
    ClientStrategy,
    GlobalState,
    NoContribution,
    Submission,
    TrainingPlan,
    plain_session,
)
from clients.trainer import Metrics, evaluate, train_local
from coordinator.registry import COORDINATOR_STRATEGIES
from coordinator.strategy import CoordinatorStrategy, aggregate_locally
from privacy import DPConfig, DPTrainingFacts
from privacy import epsilon as composed_epsilon
from secagg.ckks import CkksKeyHolder

LOCAL = "local"
"""The no-federation baseline's name."""


@dataclass(frozen=True)
class RoundRecord:
    """One round: per institution the training metrics; whether the aggregate was applied."""

    round: int
    train: dict[str, Metrics]
    applied: bool


@dataclass(frozen=True)
class SimulationResult:
    """Per institution: test metrics before and after, and epsilon spent (None without DP);
    the last global state (the initial one for ``"local"``)."""

    strategy: str
    private: bool
    initial: dict[str, Metrics]
    final: dict[str, Metrics]
    epsilon: dict[str, float | None]
    rounds: list[RoundRecord]
    state: GlobalState


def strategy_names() -> list[str]:
    """Every name :func:`simulate` accepts: ``"local"`` and the registered strategies."""
    return [LOCAL, *sorted(set(CLIENT_STRATEGIES) & set(COORDINATOR_STRATEGIES))]


def simulate(
    config: FederationConfig,
    strategy: str,
    *,
    private: bool = True,
    client_factory: Callable[[FederationConfig, str], ClientStrategy] | None = None,
) -> SimulationResult:
    """Run ``config.federation.rounds`` rounds of ``strategy`` and evaluate on every test split.

    ``private=False`` trains without DP-SGD (same steps). ``client_factory`` overrides the
    registered client side (e.g. to give institutions different FedMoE memory budgets).
    """
    if strategy not in strategy_names():
        raise KeyError(f"unknown strategy {strategy!r}; known: {strategy_names()}")
    config = _with_strategy(config, strategy)
    model, tokenizer = build_model(config)
    names = config.institution_names
    data = {name: institution_data(config, name, tokenizer) for name in names}
    train = config.training
    device = None if train.device == "auto" else train.device
    dp = {name: _dp(config, name, len(data[name]["train"])) if private else None for name in names}
    stats = routing_statistics(model)
    state = GlobalState.initial(
        adapter_state(model), stats.layer_names, stats.num_experts, stats.top_k
    )
    federated = strategy != LOCAL
    clients = (
        {name: (client_factory or CLIENT_STRATEGIES[strategy])(config, name) for name in names}
        if federated
        else {}
    )
    coordinator = COORDINATOR_STRATEGIES[strategy](config) if federated else None
    own = {name: dict(state.adapters) for name in names}  # the local baseline's adapters
    ckks = CkksKeyHolder.generate(config.aggregation.ckks.params())
    threshold, _ = config.secagg.resolved(len(names))

    def session(name: str, current: GlobalState) -> AbstractContextManager[TrainingPlan]:
        if not federated:
            load_adapter_state(model, own[name])
            return plain_session()
        load_adapter_state(model, current.adapters)
        return clients[name].session(model, current)

    def test_metrics(current: GlobalState) -> dict[str, Metrics]:
        out = {}
        for name in names:
            with session(name, current):
                out[name] = evaluate(model, data[name]["test"], device=device)
        return out

    initial = test_metrics(state)
    facts: dict[str, list[DPTrainingFacts]] = {name: [] for name in names}
    rounds: list[RoundRecord] = []
    for index in range(config.federation.rounds):
        metrics, submissions = {}, []
        for name in names:
            with session(name, state) as plan:
                result = train_local(
                    model, data[name]["train"], dp=dp[name], steps=train.local_steps,
                    batch_size=train.batch_size, lr=train.lr, device=device, progress=False,
                    extra_loss=plan.extra_loss, frozen=plan.frozen,
                )  # fmt: skip
            metrics[name] = result.metrics
            if result.facts is not None:
                facts[name].append(result.facts)
            if federated:
                n = len(data[name]["train"])
                submissions.append(clients[name].submit(state, result, n))
            else:
                own[name] = adapter_state(model)
        applied = False
        if federated:
            assert coordinator is not None
            state, applied = _aggregate(config, coordinator, state, submissions, threshold, ckks)
        rounds.append(RoundRecord(round=index, train=metrics, applied=applied))
    spent = {name: _spent(facts[name], dp[name], config.privacy.accountant) for name in names}
    final = test_metrics(state)
    return SimulationResult(strategy, private, initial, final, spent, rounds, state)


def _spent(facts: list[DPTrainingFacts], dp: DPConfig | None, accountant: str) -> float | None:
    """Epsilon of every round's DP-SGD release composed (None without DP)."""
    if dp is None:
        return None
    return composed_epsilon([f.dp_event() for f in facts], dp.target_delta, accountant)


def _with_strategy(config: FederationConfig, strategy: str) -> FederationConfig:
    if strategy == LOCAL:
        return config
    aggregation = msgspec.structs.replace(config.aggregation, strategy=strategy)
    return msgspec.structs.replace(config, aggregation=aggregation)


def _dp(config: FederationConfig, name: str, n_train: int) -> DPConfig:
    """The institution's DP-SGD config, calibrated once for every planned step (as the runtime)."""
    train = config.training
    return config.dp_config(name).calibrated(
        sample_rate=min(1.0, train.batch_size / n_train),
        total_steps=config.federation.rounds * train.local_steps,
    )


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
