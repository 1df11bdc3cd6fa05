"""A whole federation in one process, for experiments: real DP-SGD, real SecAgg+ and CKKS.

:func:`simulate` drives the SAME parts the federation processes run, over an in-memory link
(direct calls instead of sockets): every institution's learner
(``clients.strategies.registry.CLIENT_HALVES[name].learner``, as ``sealmoe institution`` builds
it) and the strategy's server half (``coordinator.strategies.registry.SERVER_HALVES``,
as ``coordinator.service`` builds it). One round, as in the runtime:

1. a selection stage when the server half wants one (FedAMoLE's reverse selection): each
   learner's noised scores, charged first, go to ``decode_scores``/``select``, and the
   ``selection`` bytes back to every learner's ``with_selection``;
2. every learner trains (:meth:`~clients.strategies.base.Learner.train`); its releases are
   charged to the institution's :class:`privacy.PrivacyBudget` before its submission is used
   (a refusal, :class:`privacy.BudgetExceeded`, ends the run);
3. the submissions are packed by the round's layout and securely summed
   (:func:`coordinator.strategies.base.aggregate_locally`: SecAgg+ for the mask channel, CKKS
   for the other), the server half forms the next state, and the CKKS routing sum is decoded on
   the institutions' side as they do (:func:`clients.runtime.broadcast.routing_from_channel`).

``local`` is the no-federation baseline: each institution trains its own MoE-LoRA adapters for
the same steps (FedAvg's learner, whose session changes nothing) and nothing leaves.

Privacy as in ``sealmoe run``: each institution's DP-SGD noise comes from
:func:`privacy.plan_dp_sgd` for ``rounds + spare_rounds`` rounds of every release its learner
makes per round (the local baseline, which releases nothing and is never retried, for
``rounds`` rounds of DP-SGD). The reported epsilon is the composition of every charged event.
Without DP (``private=False``) nothing is trained with DP-SGD or charged, and the other
releases get noise of multiplier :data:`NO_NOISE` (numerically exact). Without a network,
processes or keys on disk, but with the same numbers: it is for comparing strategies, not for
measuring the protocol's cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import dp_accounting
import msgspec
import numpy as np

from clients.contract.config import FederationConfig
from clients.contract.keys import client_id
from clients.contract.layout import ROUTING
from clients.contract.layout import GlobalState
from clients.contract.layout import NoContribution
from clients.contract.layout import Submission
from clients.contract.routing import RoutingStats
from clients.runtime.broadcast import routing_from_channel
from clients.strategies import fedavg
from clients.strategies.base import ClientHalf
from clients.strategies.base import Learner
from clients.strategies.base import SelectsExperts
from clients.strategies.ddome import EXPERT_COUNTS
from clients.strategies.fedamole import ASSIGNMENT
from clients.strategies.registry import CLIENT_HALVES
from clients.training.trainer import Metrics
from coordinator.strategies.base import CoordinatorStrategy
from coordinator.strategies.base import Initialises
from coordinator.strategies.base import SelectionStage
from coordinator.strategies.base import aggregate_locally
from coordinator.strategies.registry import SERVER_HALVES
from privacy import ADAPTER_UPDATE
from privacy import DPConfig
from privacy import PrivacyBudget
from privacy import Release
from privacy import plan_dp_sgd
from secagg.ckks import CkksKeyHolder

LOCAL = "local"
"""The no-federation baseline's name."""
NO_NOISE = 1e-9
"""The noise multiplier of the non-DP-SGD releases in runs without DP."""
LOCAL_HALF = fedavg.CLIENT_HALF
"""The local baseline trains FedAvg's learner (a session that changes nothing); nothing leaves."""


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One round: per institution its mean training loss; whether the aggregate was applied;
    public diagnostics of the new state (e.g. the global routing entropy); per institution its
    test metrics after the round, when asked for (a per-round test curve)."""

    round: int
    train_loss: dict[str, float]
    applied: bool
    diagnostics: dict[str, float] = dataclasses.field(default_factory=dict)
    test: dict[str, Metrics] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """Per institution: test metrics before and after, epsilon composed from every charged
    event (None without DP) and the charged releases as ``("<what>, round <r>", event)``; the
    last global state (the initial one for ``"local"``)."""

    strategy: str
    private: bool
    initial: dict[str, Metrics]
    final: dict[str, Metrics]
    epsilon: dict[str, float | None]
    charged: dict[str, list[tuple[str, dp_accounting.DpEvent]]]
    rounds: list[RoundRecord]
    state: GlobalState


def strategy_names() -> list[str]:
    """Every name :func:`simulate` accepts."""
    return [LOCAL, *sorted(set(CLIENT_HALVES) & set(SERVER_HALVES))]


def simulate(
    config: FederationConfig,
    strategy: str,
    *,
    private: bool = True,
    client_half: ClientHalf | None = None,
    test_every_round: bool = False,
) -> SimulationResult:
    """Run ``config.federation.rounds`` rounds of ``strategy`` and evaluate on every test split.

    ``private=False`` trains without DP-SGD and releases without noise worth the name (same
    steps). ``client_half`` replaces the strategy's registered client half (e.g. to give
    institutions different FedMoE memory budgets). ``test_every_round`` also evaluates every
    institution's test split after each round (:attr:`RoundRecord.test`; evaluation changes no
    state).
    """
    if strategy not in strategy_names():
        raise KeyError(f"unknown strategy {strategy!r}; known: {strategy_names()}")
    federation = Federation(_run_config(config, strategy, private), strategy, private, client_half)
    names = config.institution_names
    initial = {name: federation.evaluate(name) for name in names}
    rounds = []
    for index in range(config.federation.rounds):
        record = federation.round(index)
        if test_every_round:
            tested = {name: federation.evaluate(name) for name in names}
            record = dataclasses.replace(record, test=tested)
        rounds.append(record)
    final = (
        rounds[-1].test
        if test_every_round and rounds
        else {name: federation.evaluate(name) for name in names}
    )
    return SimulationResult(
        strategy,
        private,
        initial,
        final,
        {name: federation.budgets[name].spent() if private else None for name in names},
        federation.charged,
        rounds,
        federation.state,
    )


class Federation:
    """The institutions' learners and budgets, the server half and the global state, linked by
    direct calls. ``server`` is None for the local baseline."""

    def __init__(
        self,
        config: FederationConfig,
        strategy: str,
        private: bool,
        client_half: ClientHalf | None = None,
    ) -> None:
        self.config, self.private = config, private
        names = config.institution_names
        half = client_half or (LOCAL_HALF if strategy == LOCAL else CLIENT_HALVES[strategy])
        self.learners: dict[str, Learner] = {name: half.learner(config, name) for name in names}
        self.server: CoordinatorStrategy | None = (
            None if strategy == LOCAL else SERVER_HALVES[strategy].build(config)
        )
        self.state = half.initial_state(config)
        if isinstance(self.server, Initialises):
            self.state = self.server.initial_state(self.state)
        self.budgets = {name: _budget(config, name) for name in names}
        self.charged: dict[str, list[tuple[str, dp_accounting.DpEvent]]] = {n: [] for n in names}
        self.dp = {name: self._plan(name) if private else None for name in names}
        self.ckks = CkksKeyHolder.generate(config.aggregation.ckks.params())
        self.threshold, _ = config.secagg.resolved(len(names))

    def _plan(self, name: str) -> DPConfig:
        """The runtime's DP-SGD plan (the local baseline: its rounds of DP-SGD alone)."""
        learner, train = self.learners[name], self.config.training
        rounds = self.config.federation.rounds
        federated = self.server is not None
        return plan_dp_sgd(
            self.config.dp_config(name),
            sample_rate=min(1.0, train.batch_size / int(learner.data["train"].shape[0])),
            steps_per_round=train.local_steps,
            rounds=rounds + self.config.privacy.spare_rounds if federated else rounds,
            per_round=learner.per_round_events() if federated else (),
        )

    def charge(self, name: str, releases: Sequence[Release]) -> None:
        """Charge ``releases`` to institution ``name``'s budget before they are used (raises
        :class:`privacy.BudgetExceeded`, charging nothing, beyond it); nothing without DP."""
        if not self.private or not releases:
            return
        self.budgets[name].charge([release.event for release in releases])
        self.charged[name].extend(
            (f"{r.what}, round {r.federation_round}", r.event) for r in releases
        )

    def evaluate(self, name: str) -> Metrics:
        """Institution ``name``'s test metrics under the current state (the local baseline:
        its own adapters)."""
        learner = self.learners[name]
        if self.server is not None:
            learner.load_adapters(self.state.adapters)
        return learner.evaluate(self.state, "test")

    def round(self, index: int) -> RoundRecord:
        """Round ``index`` (also its round id: nothing is retried): select, train, charge, sum."""
        before = self.state
        states = self._selection(index) if self._selects() else dict.fromkeys(self.learners, before)
        losses, submissions = {}, []
        for name, learner in self.learners.items():
            if self.server is not None:
                learner.load_adapters(states[name].adapters)
            local = learner.train(states[name], self.dp[name], index, index)
            if self.server is None:  # nothing leaves but the (DP) adapters
                self.charge(name, [r for r in local.releases if r.what == ADAPTER_UPDATE])
            else:
                self.charge(name, local.releases)
                local.after_charge()
            losses[name] = local.metrics["loss"]
            submissions.append(local.submission)
        if self.server is None:
            return RoundRecord(index, losses, applied=False)
        applied = self._aggregate(submissions)
        return RoundRecord(index, losses, applied, _diagnostics(before, self.state))

    def _selects(self) -> bool:
        return (
            isinstance(self.server, SelectionStage)
            and self.server.wants_scores(self.state)
            and all(isinstance(learner, SelectsExperts) for learner in self.learners.values())
        )

    def _selection(self, index: int) -> dict[str, GlobalState]:
        """The selection stage: every learner's noised scores (charged first) over the wire
        format, the server half's choice, and each learner's state with that choice."""
        assert isinstance(self.server, SelectionStage)
        scores = {}
        for name, learner in self.learners.items():
            assert isinstance(learner, SelectsExperts)
            learner.load_adapters(self.state.adapters)
            raw = learner.scores(
                self.state, index, index, lambda release, n=name: self.charge(n, [release])
            )
            wire = np.ascontiguousarray(raw, dtype="<f8").tobytes()
            scores[client_id(self.config, name)] = self.server.decode_scores(self.state, wire)
        self.state = self.server.select(self.state, scores)
        selection = self.server.selection(self.state)
        return {
            name: learner.with_selection(self.state, selection)
            for name, learner in self.learners.items()
            if isinstance(learner, SelectsExperts)
        }

    def _aggregate(self, submissions: list[Submission]) -> bool:
        """Securely sum the submissions and move to the next state; False (state unchanged)
        when nobody contributed."""
        assert self.server is not None
        layout = self.server.layout(self.state)
        sec = self.config.secagg
        agg = aggregate_locally(
            layout, [layout.pack(s.values) for s in submissions], threshold=self.threshold,
            bits=sec.bits, modulus_bits=sec.modulus_bits,
            ckks=self.ckks if "ckks" in layout.channels else None,
        )  # fmt: skip
        try:
            new = self.server.aggregate(self.state, {"mask": agg.sums["mask"]})
        except NoContribution:
            return False
        if any(s.name == ROUTING and s.channel == "ckks" for s in layout.segments):
            # the institutions decrypt the routing sum, not the coordinator
            old = new.routing
            vector = np.maximum(routing_from_channel(layout, [agg.sums["ckks"]]), 0.0)
            routing = RoutingStats.from_vector(vector, old.layer_names, old.num_experts, old.top_k)
            new = GlobalState(new.adapters, routing, new.extras)
        self.state = new
        return True


def _budget(config: FederationConfig, name: str) -> PrivacyBudget:
    budget = config.budget(name)
    return PrivacyBudget(budget.target_epsilon, budget.target_delta, config.privacy.accountant)


def _run_config(config: FederationConfig, strategy: str, private: bool) -> FederationConfig:
    """``config`` with ``strategy`` (except for the local baseline) and, without DP,
    :data:`NO_NOISE` for the releases besides DP-SGD."""
    aggregation = config.aggregation
    if strategy != LOCAL:
        aggregation = msgspec.structs.replace(aggregation, strategy=strategy)
    if not private:
        fedamole = msgspec.structs.replace(
            aggregation.fedamole, score_noise_multiplier=NO_NOISE, key_noise_multiplier=NO_NOISE
        )
        aggregation = msgspec.structs.replace(aggregation, fedamole=fedamole)
        privacy = msgspec.structs.replace(config.privacy, routing_noise_multiplier=NO_NOISE)
        config = msgspec.structs.replace(config, privacy=privacy)
    return msgspec.structs.replace(config, aggregation=aggregation)


def _diagnostics(before: GlobalState, after: GlobalState) -> dict[str, float]:
    """Public diagnostics of a round: FedAMoLE's share of the assignment that changed, DDOME's
    experts trained, else the global routing's normalised entropy."""
    if ASSIGNMENT in after.extras:
        changed = after.extras[ASSIGNMENT] != before.extras[ASSIGNMENT]
        return {"assignment_changed": float(np.mean(changed))}
    if EXPERT_COUNTS in after.extras:
        return {"experts_trained": float(np.count_nonzero(after.extras[EXPERT_COUNTS]))}
    return {"routing_entropy": _normalised_entropy(after.routing_distribution)}


def _normalised_entropy(p: np.ndarray) -> float:
    """Mean over rows of the entropy of distribution rows of ``p``, divided by log(columns)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, None)
    p = p / p.sum(-1, keepdims=True)
    return float(np.mean(-(p * np.log(p)).sum(-1)) / np.log(p.shape[-1]))
