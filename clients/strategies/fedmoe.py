"""FedMoE, client side: a personal sub-MoE chosen on the client, modular per-expert aggregation.

Each client holds, per MoE layer, a subset of the experts (all dense entries always). During the
first ``warmup_rounds`` rounds it trains the full MoE and records its activation pattern p(l, e)
(its share of layer l's routed slots that went to e, from its noised routing statistics).
Afterwards, at the start of every round, it searches its sub-MoE: the largest coverage θ in
[0, 1] such that holding, in every layer, the fewest experts (most used first, at least
``top_k``) whose usage reaches θ fits its memory budget, found by binary search on θ as in the
paper. The budget of institution k is a_k · M_full and a sub-MoE costs
M(held) = D + Σ_l |held_l| · S_l, where S_l is one expert's adapter entries in layer l (LoRA A/B
and its router row), D the entries no expert owns (shared parts), M_full = D + E · Σ_l S_l;
a_k is ``memory_fractions[k]``, else ``memory_fraction``.

Revise and revert on a DP-noised validation signal: after local training the institution
computes v = (1/m) Σ_{i ≤ min(n, m)} clip(loss_i, 0, L_max) over its first m =
``validation_records`` validation blocks (L_max = ``loss_cap``) and adds Gaussian noise of std
sigma · L_max / m (:func:`validation_mechanism`). Sensitivity: m is public and each term lies in
[0, L_max]; adding or removing one validation block adds, removes or swaps one term of the sum
(the window holds the first m blocks), so v moves by at most L_max / m. The release is charged
with the round's other releases before the masked input leaves, and only the noised value is
kept, so every later choice is post-processing. When the noised loss did not drop by more than
``tolerance`` (stalled), the next round searches on p + λ p̄ (p̄ the broadcast global routing
distribution, λ raised by ``recommend_weight``): the federation's routing recommends experts. If
the next signal is not better than the one before the revision, the institution reverts to its
previous sub-MoE and λ.

Training and inference route only to held experts
(:func:`clients.models.routing_hooks.restrict_routing`) and the other experts' entries, router rows
included, are held fixed. The submission always has the full length: zeros, a zero weight and a
zero count for experts not held, so the sums hide which experts a client holds; the coordinator
updates an expert only from ``min_count`` >= 2 holders.

Paper mechanisms (STRATEGIES.md), one line each:

* sub-MoE per client under its memory limit M_k: as in the paper; budgets differ per institution
  and count held experts plus the shared parts.
* stage 1 full-MoE warm-up and activation pattern p(l, e): as in the paper (adapted for privacy:
  p is read from the DP-noised routing statistics).
* sub-model search, bisection on θ: as in the paper.
* modular aggregation (dense FedAvg over all, each expert over its holders): adapted for privacy:
  secure sums, and an expert held by fewer than ``min_count`` >= 2 institutions is not updated
  (the paper copies a single holder's expert).
* clients report p and validation accuracy to the server: adapted for privacy: p goes only into
  the secure sum; the validation signal is a DP-noised clipped mean loss that stays local.
* recommendation of similar clients' experts when accuracy stalls: adapted for privacy: the
  coordinator sees no client's p, so the stalled client mixes in the global routing distribution
  (a sum) instead of its top-K similar clients' patterns.
* revert if the recommendation does not help: as in the paper, judged on the noised signal.

"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field

import numpy as np
from torch import nn

from clients.contract.config import FederationConfig
from clients.contract.config import FedMoESection
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import ROUTING
from clients.contract.layout import WEIGHT
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.contract.layout import Submission
from clients.contract.layout import SubmissionLayout
from clients.contract.layout import check_routing_matches
from clients.models.routing_hooks import restrict_routing
from clients.strategies.base import TrainingPlan
from clients.strategies.base import checked_weight
from clients.strategies.experts import EXPERT_COUNT
from clients.strategies.experts import EXPERT_WEIGHT
from clients.strategies.experts import ExpertPartition
from clients.strategies.experts import expert_segments
from clients.strategies.experts import weighted_deltas
from clients.strategies.fedavg import FedAvgConfig
from clients.strategies.fedavg import checked_section
from clients.strategies.fedavg import extended_config
from clients.strategies.fedavg import moe_lora_half
from clients.training.trainer import LocalTrainingResult
from privacy import VALIDATION_SIGNAL
from privacy import GaussianMechanism


@dataclass(frozen=True)
class FedMoEConfig(FedAvgConfig):
    """Public parameters of FedMoE (both sides must hold the same): FedAvg's weights, bounds
    and channels, and ``params``, the ``[aggregation.fedmoe]`` section, whose fields and ranges
    are declared once in :class:`~clients.contract.config.FedMoESection` (``memory_fraction``:
    the default budget alpha * M_k, a client may be given its own; ``recommend_weight``: λ of
    the recommendation; ``search_steps``: bisections of θ).
    """

    params: FedMoESection = field(default_factory=FedMoESection)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "params", checked_section(self.params))

    def layout(self, state: GlobalState) -> SubmissionLayout:
        """The per-expert segments (``clients.strategies.experts.expert_segments``)."""
        return SubmissionLayout(
            expert_segments(
                state,
                self.delta_bound,
                self.routing_bound,
                self.delta_channel,
                self.routing_channel,
            )
        )


def check_fraction(name: str, value: object, *, low_open: bool) -> None:
    """Refuse a value outside (0, 1] (``low_open``) or [0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0 < value <= 1 if low_open else 0 <= value <= 1):  # type: ignore[operator]
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise StrategyError(f"{name} must be a number in {interval}, got {value!r}")


def smallest_cover(pattern: np.ndarray, theta: float, minimum: int) -> np.ndarray:
    """Per layer, the fewest experts (most used first; ties by index) whose usage reaches
    ``theta`` of the layer's total, and never fewer than ``minimum``: bool (L, E)."""
    pattern = np.maximum(np.asarray(pattern, dtype=np.float64), 0.0)
    held = np.zeros(pattern.shape, dtype=bool)
    for layer, row in enumerate(pattern):
        order = np.argsort(-row, kind="stable")
        total = row.sum()
        cumulative = np.cumsum(row[order])
        reached = np.nonzero(cumulative >= theta * total - 1e-12)[0]
        size = int(reached[0]) + 1 if reached.size else row.size
        held[layer, order[: max(size, minimum)]] = True
    return held


def sub_moe_memory(held: np.ndarray, sizes: np.ndarray, dense: float) -> float:
    """M(held) = D + Σ_l |held_l| · S_l: adapter entries held (module docstring)."""
    return dense + float((np.asarray(held).sum(axis=1) * sizes).sum())


def search_sub_moe(
    pattern: np.ndarray,
    sizes: np.ndarray,
    budget: float,
    minimum: int,
    steps: int,
    dense: float = 0.0,
) -> tuple[np.ndarray, float]:
    """(held experts, θ): the largest coverage θ whose smallest cover fits ``budget``.

    ``sizes[l]``: parameters of one expert of layer l; ``dense``: the entries every sub-MoE
    holds. Memory grows with θ, so θ is bisected. If even θ = 0 (``minimum`` experts per layer)
    exceeds the budget, that cover is returned with θ = 0: a layer cannot route with fewer
    experts than top_k.
    """

    def memory(held: np.ndarray) -> float:
        return sub_moe_memory(held, sizes, dense)

    best = smallest_cover(pattern, 0.0, minimum)
    if memory(full := smallest_cover(pattern, 1.0, minimum)) <= budget:
        return full, 1.0
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = 0.5 * (low + high)
        held = smallest_cover(pattern, mid, minimum)
        if memory(held) <= budget:
            low, best = mid, held
        else:
            high = mid
    return best, low


def validation_mechanism(params: FedMoESection) -> GaussianMechanism:
    """The Gaussian mechanism of the validation signal: sensitivity L_max / m (module docstring)."""
    return GaussianMechanism(
        noise_multiplier=params.validation_noise_multiplier,
        l2_sensitivity=params.loss_cap / params.validation_records,
        what=VALIDATION_SIGNAL,
    )


VALIDATION_BASIS = (
    "unit of privacy: one validation block; the signal is the sum over the first m (public) "
    "validation blocks of each block's loss clipped to [0, L_max], divided by m: adding or "
    "removing a block adds, removes or swaps one term, so L2 sensitivity L_max / m"
)


def clipped_mean_loss(losses: np.ndarray, records: int, cap: float) -> float:
    """v = (1/m) Σ_{i ≤ min(n, m)} clip(loss_i, 0, L_max), m = ``records``, L_max = ``cap``."""
    kept = np.asarray(losses, dtype=np.float64)[:records]
    return float(np.clip(kept, 0.0, cap).sum() / records)


class FedMoEClient:
    """Client side of FedMoE. Remembers, between rounds, its activation pattern, the last noised
    validation signal and the state of a revision (λ, the signal and sub-MoE before it); its
    sub-MoE is a function of them and the broadcast routing (``held``: the last one used).
    ``memory_fraction`` is this institution's budget a_k (default: the config's)."""

    def __init__(self, config: FedMoEConfig, memory_fraction: float | None = None) -> None:
        self.config = config
        self.memory_fraction = (
            config.params.memory_fraction if memory_fraction is None else memory_fraction
        )
        check_fraction("memory_fraction", self.memory_fraction, low_open=True)
        self.rounds_seen = 0
        self.pattern: np.ndarray | None = None
        self.held: np.ndarray | None = None
        self.lam = 0.0
        self.signal = float("nan")
        self.trial: tuple[float, float, np.ndarray] | None = None
        """While a revision is on trial: (signal, λ, sub-MoE) before it."""
        self.revert_to: np.ndarray | None = None
        """The sub-MoE to use next round after a reverted revision."""

    validation_basis = VALIDATION_BASIS

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(state)

    def validation_mechanism(self) -> GaussianMechanism:
        return validation_mechanism(self.config.params)

    def validation_loss(self, losses: np.ndarray) -> float:
        """The exact signal from per-block validation losses (noised by the caller)."""
        params = self.config.params
        return clipped_mean_loss(losses, params.validation_records, params.loss_cap)

    def observe(self, signal: float) -> None:
        """Take this round's noised validation signal (after :meth:`submit`): keep or revert a
        revision on trial, or start one if the loss stalled."""
        previous, self.signal, self.revert_to = self.signal, float(signal), None
        if self.rounds_seen < self.config.params.warmup_rounds or self.held is None:
            return
        tolerance = self.config.params.tolerance
        if self.trial is not None:
            before, lam, held = self.trial
            self.trial = None
            if not self.signal < before - tolerance:
                self.lam, self.revert_to = lam, held
            return
        stalled = np.isfinite(previous) and not self.signal < previous - tolerance
        step = self.config.params.recommend_weight
        if stalled and step > 0 and self.lam < 1.0:
            self.trial = (self.signal, self.lam, self.held.copy())
            self.lam = min(1.0, self.lam + step)

    def memory(self) -> dict[str, np.ndarray]:
        """Rounds seen, the last activation pattern (from its noised routing statistics), λ and
        the noised signal, and the revision on trial or the sub-MoE to revert to (if any)."""
        if self.pattern is None:
            return {}
        out = {
            "rounds_seen": np.array([float(self.rounds_seen)]),
            "pattern": self.pattern,
            "lam_signal": np.array([self.lam, self.signal]),
        }
        if self.trial is not None:
            out["trial"] = np.array(self.trial[:2])
            out["trial_held"] = self.trial[2].astype(np.float64)
        if self.revert_to is not None:
            out["revert_to"] = self.revert_to.astype(np.float64)
        return out

    def restore(self, memory: Mapping[str, np.ndarray]) -> None:
        if not memory:
            return
        required = {"rounds_seen", "pattern", "lam_signal"}
        allowed = required | {"trial", "trial_held", "revert_to"}
        if not required <= set(memory) <= allowed or ("trial" in memory) != (
            "trial_held" in memory
        ):
            raise StrategyError(f"FedMoE memory must hold {sorted(required)}, got {sorted(memory)}")
        self.rounds_seen = int(memory["rounds_seen"][0])
        self.pattern = np.asarray(memory["pattern"], dtype=np.float64)
        self.lam, self.signal = (float(x) for x in memory["lam_signal"])
        self.trial = None
        if "trial" in memory:
            before, lam = (float(x) for x in memory["trial"])
            self.trial = (before, lam, np.asarray(memory["trial_held"]) > 0.5)
        self.revert_to = np.asarray(memory["revert_to"]) > 0.5 if "revert_to" in memory else None

    def select(self, state: GlobalState) -> np.ndarray:
        """This round's sub-MoE (bool (L, E)): everything during warm-up, the previous one after
        a reverted revision, else the search on the own pattern plus λ times the global one."""
        partition = ExpertPartition.of(state)
        shape = (partition.num_layers, partition.num_experts)
        if self.rounds_seen < self.config.params.warmup_rounds or self.pattern is None:
            return np.ones(shape, dtype=bool)
        if self.revert_to is not None and self.revert_to.shape == shape:
            return self.revert_to.copy()
        pattern = self.pattern + self.lam * state.routing_distribution
        sizes, dense = expert_sizes(partition, state)
        budget = self.memory_fraction * (dense + float(sizes.sum()) * shape[1])
        held, _ = search_sub_moe(
            pattern, sizes, budget, state.routing.top_k, self.config.params.search_steps, dense
        )
        return held

    @contextmanager
    def session(self, model: nn.Module, state: GlobalState) -> Iterator[TrainingPlan]:
        """Routes only to the held experts and holds the others' entries fixed."""
        self.held = self.select(state)
        frozen = ExpertPartition.of(state).expert_mask(self.held)
        with restrict_routing(model, self.held):
            yield TrainingPlan(frozen=frozen)

    def submit(self, state: GlobalState, result: LocalTrainingResult, weight: float) -> Submission:
        check_routing_matches(result.routing, state.routing)
        partition = ExpertPartition.of(state)
        held = self.select(state)  # the session's choice: nothing it depends on changed since
        self.held = held
        w = checked_weight(weight)
        weights = w * held.astype(np.float64)
        values = weighted_deltas(partition, result.delta, w, weights, self.config.delta_bound)
        raw = {
            **{
                k: result.delta[k.removeprefix(DELTA_PREFIX)].detach().cpu().double().numpy()
                for k in values
            },
            WEIGHT: np.array([w]),
            EXPERT_WEIGHT: weights.ravel(),
            EXPERT_COUNT: held.astype(np.float64).ravel(),
            ROUTING: result.routing.as_vector(),
        }
        clipped = self.layout(state).clipped_fraction(raw)
        values.update({k: v for k, v in raw.items() if not k.startswith(DELTA_PREFIX)})
        self.pattern = np.asarray(result.routing.load, dtype=np.float64)
        self.rounds_seen += 1
        return Submission(values=values, clipped=clipped)


def expert_sizes(partition: ExpertPartition, state: GlobalState) -> tuple[np.ndarray, float]:
    """(S_l: entries of one expert per layer, D: entries no expert owns) of the adapters."""
    sizes = np.zeros(partition.num_layers)
    for owner in partition.owners.values():
        sizes[owner.layer] += float((owner.experts == 0).sum())
    total = float(sum(t.numel() for t in state.adapters.values()))
    return sizes, total - float(sizes.sum()) * partition.num_experts


def fedmoe_config(config: FederationConfig) -> FedMoEConfig:
    """FedMoE's parameters from ``[aggregation.fedmoe]`` (identical on both sides)."""
    return extended_config(config, FedMoEConfig, config.aggregation.fedmoe)


def fedmoe_client(config: FederationConfig, institution: str) -> FedMoEClient:
    """Institution ``institution``'s client, with its own memory budget."""
    fraction = config.aggregation.fedmoe.fraction_of(institution)
    return FedMoEClient(fedmoe_config(config), memory_fraction=fraction)


CLIENT_HALF = moe_lora_half(
    fedmoe_client,
    extra_events=lambda config: [validation_mechanism(config.aggregation.fedmoe).dp_event()],
)
