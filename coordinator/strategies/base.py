"""Aggregation strategies, coordinator side: from decoded secure sums to the next global state.

The coordinator sees one summed vector per channel (see ``clients.contract.layout``) and computes
only ratios of sums. :func:`aggregate_locally` runs the secure sums of one round in one process
(SecAgg+ via :func:`secagg.run_local`, CKKS via :mod:`secagg.ckks`) for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol
from typing import runtime_checkable

import numpy as np
import torch

from audit.context import StrategyFacts
from clients.contract.config import FederationConfig
from clients.contract.layout import CHANNEL_BOUND
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import ROUTING
from clients.contract.layout import WEIGHT
from clients.contract.layout import Channel
from clients.contract.layout import GlobalState
from clients.contract.layout import NoContribution
from clients.contract.layout import Segment
from clients.contract.layout import StrategyError
from clients.contract.layout import SubmissionLayout
from clients.contract.routing import RoutingStats
from clients.strategies.experts import EXPERT_COUNT
from clients.strategies.experts import EXPERT_WEIGHT
from clients.strategies.experts import ExpertPartition
from secagg import TooFewSurvivors
from secagg import run_local
from secagg.ckks import CkksAggregator
from secagg.ckks import CkksKeyHolder


class CoordinatorStrategy(Protocol):
    """Coordinator side of an aggregation strategy."""

    def layout(self, state: GlobalState) -> SubmissionLayout:
        """The round's layout: the same one the clients derive from the broadcast ``state``."""
        ...

    def aggregate(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        """The next global state from the decoded per-channel sums over the included clients."""
        ...


@runtime_checkable
class Initialises(CoordinatorStrategy, Protocol):
    """A strategy whose round-0 state carries public parts of its own (FedAMoLE's public
    assignment) on top of the seeded adapters."""

    def initial_state(self, state: GlobalState) -> GlobalState:
        """The round-0 broadcast from the seeded adapters and zero routing of ``state``."""
        ...


@runtime_checkable
class SelectionStage(CoordinatorStrategy, Protocol):
    """A strategy whose rounds may start with a selection stage (FedAMoLE's reverse
    selection): each institution sends noised, charged scores; the coordinator's choice from
    them goes back to every institution before it trains."""

    def wants_scores(self, state: GlobalState) -> bool:
        """Whether a round from ``state`` starts with the selection stage."""
        ...

    def decode_scores(self, state: GlobalState, data: bytes) -> np.ndarray:
        """One institution's scores from the wire (:class:`StrategyError` if malformed)."""
        ...

    def select(self, state: GlobalState, scores: Mapping[int, np.ndarray]) -> GlobalState:
        """``state`` with the choice made from the scores (client id -> scores)."""
        ...

    def selection(self, state: GlobalState) -> bytes:
        """The choice in ``state`` as the institutions receive it."""
        ...


@runtime_checkable
class EncryptedUpdates(CoordinatorStrategy, Protocol):
    """A strategy that also works with its deltas under CKKS (``expert_updates = "ckks"``).

    The coordinator reads only the mask channel's sum; it folds the encrypted delta sum into the
    encrypted global state as ``state += factors * ckks_sum[:len(factors)]``
    (:meth:`secagg.ckks.CkksEvaluator.scale_and_add`).
    """

    def encrypted_update_factors(
        self, state: GlobalState, sums: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        """Per value of the delta segments (which lead the ckks channel), its public factor."""
        ...

    def public_update(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        """The next state's public parts (routing read from the mask sum, extras); the adapters
        are left as they were (the coordinator cannot compute them)."""
        ...


def leading_deltas(layout: SubmissionLayout, state: GlobalState) -> list[Segment]:
    """The delta segments (state order), checked to lead the ckks channel."""
    deltas = [layout[DELTA_PREFIX + name] for name in state.adapters]
    leading = [s for s in layout.segments if s.channel == "ckks"][: len(deltas)]
    if leading != deltas:
        raise StrategyError("the ckks channel must start with the delta segments")
    return deltas


def summed_routing(old: RoutingStats, values: Mapping[str, np.ndarray]) -> RoutingStats:
    """The routing sum among unpacked ``values``, or ``old`` when it is absent (a CKKS sum the
    coordinator cannot read: the institutions decrypt it themselves)."""
    if ROUTING not in values:
        return old
    # True sums are non-negative; quantisation can push a zero slightly below.
    summed = np.maximum(values[ROUTING], 0.0)
    return RoutingStats.from_vector(summed, old.layer_names, old.num_experts, old.top_k)


def expert_weighted_update(
    state: GlobalState,
    values: Mapping[str, np.ndarray],
    *,
    min_count: int,
    min_weight: float,
) -> dict[str, torch.Tensor]:
    """``global += sum(w * delta) / sum(w)`` entry by entry, with each entry's own weight sum.

    Dense entries divide by the summed ``weight``; an expert's entries by its summed
    ``expert_weight``, and only where its summed ``expert_count`` reaches ``min_count`` and its
    weight sum ``min_weight``; other experts keep their global values. Raises
    :class:`NoContribution` when the dense weight sum is below ``min_weight`` (nobody took part).
    """
    if any(DELTA_PREFIX + n not in values for n in state.adapters):
        raise StrategyError(
            "a per-expert mean needs the sum of the channel that carries the deltas"
        )
    partition = ExpertPartition.of(state)
    total, divisor = expert_divisors(partition, values, min_count=min_count, min_weight=min_weight)
    adapters: dict[str, torch.Tensor] = {}
    for name, current in state.adapters.items():
        denominator = partition.entry_weights(name, total, divisor)
        delta = values[DELTA_PREFIX + name].reshape(tuple(current.shape)) / denominator
        new = current.detach().cpu().double() + torch.from_numpy(delta)
        adapters[name] = new.to(current.dtype)
    return adapters


def expert_divisors(
    partition: ExpertPartition,
    values: Mapping[str, np.ndarray],
    *,
    min_count: int,
    min_weight: float,
) -> tuple[float, np.ndarray]:
    """(dense weight sum, per (layer, expert) weight sum or inf where not updated).

    An expert is updated where its summed ``expert_count`` reaches ``min_count`` and its summed
    ``expert_weight`` reaches ``min_weight``. Raises :class:`NoContribution` when the dense
    weight sum is below ``min_weight``.
    """
    if any(name not in values for name in (WEIGHT, EXPERT_WEIGHT, EXPERT_COUNT)):
        raise StrategyError("a per-expert mean needs the sum of the mask channel (the weights)")
    shape = (partition.num_layers, partition.num_experts)
    total = float(values[WEIGHT][0])
    if total < min_weight:
        raise NoContribution(
            f"summed weight {total:.3g} is below {min_weight:.3g}: no client contributed; "
            "keep the state"
        )
    weights = np.asarray(values[EXPERT_WEIGHT]).reshape(shape)
    counts = np.asarray(values[EXPERT_COUNT]).reshape(shape)
    # Counts are integers; half a client's count absorbs the quantisation error.
    updated = (counts >= min_count - 0.5) & (weights >= min_weight)
    return total, np.where(updated, weights, np.inf)


def expert_update_factors(
    state: GlobalState,
    layout: SubmissionLayout,
    sums: Mapping[str, np.ndarray],
    *,
    min_count: int,
    min_weight: float,
) -> np.ndarray:
    """Under CKKS deltas, per value of the delta segments: ``bound / (its weight sum)``, 0 for
    an expert that is not updated (so its encrypted entries keep their value)."""
    deltas = leading_deltas(layout, state)
    partition = ExpertPartition.of(state)
    values = layout.unpack(sums, partial=True)
    total, divisor = expert_divisors(partition, values, min_count=min_count, min_weight=min_weight)
    return np.concatenate(
        [
            np.ravel(seg.bound / (CHANNEL_BOUND * partition.entry_weights(name, total, divisor)))
            for name, seg in zip(state.adapters, deltas, strict=True)
        ]
    )


@dataclass(frozen=True)
class LocalAggregate:
    """Decoded per-channel sums over ``included`` (the clients the mask channel accepted)."""

    sums: dict[Channel, np.ndarray]
    included: list[int]


def aggregate_locally(
    layout: SubmissionLayout,
    packed: Sequence[Mapping[str, np.ndarray]],
    *,
    threshold: int,
    bits: int = 16,
    modulus_bits: int = 32,
    dropouts: dict[int, str] | None = None,
    ckks: CkksKeyHolder | None = None,
) -> LocalAggregate:
    """Securely sum packed submissions (``layout.pack`` outputs, one per client) in-process.

    The mask channel runs a whole SecAgg+ round (``dropouts`` as in :func:`secagg.run_local`,
    codec ``clip=CHANNEL_BOUND``); the CKKS channel then sums, under ``ckks``'s key, only the
    clients the mask round included, so both sums cover the same clients. Without a mask
    channel, every client not in ``dropouts`` is included. Raises
    :class:`~secagg.errors.TooFewSurvivors` below ``threshold`` clients.
    """
    dropouts = dict(dropouts or {})
    sums: dict[Channel, np.ndarray] = {}
    if "mask" in layout.channels:
        result = run_local(
            [np.asarray(p["mask"]) for p in packed],
            threshold=threshold,
            dropouts=dropouts,
            clip=CHANNEL_BOUND,
            bits=bits,
            modulus_bits=modulus_bits,
        )
        sums["mask"], included = result.sum, list(result.included)
    else:
        included = [i for i in range(len(packed)) if i not in dropouts]
        if len(included) < threshold:
            raise TooFewSurvivors(f"{len(included)} clients left, threshold is {threshold}")
    if "ckks" in layout.channels:
        if ckks is None:
            raise StrategyError("the layout uses the ckks channel but no CkksKeyHolder was given")
        if not included:
            raise NoContribution("no client is left to sum on the ckks channel")
        aggregator = CkksAggregator(ckks.public_context())
        for i in included:
            aggregator.add(ckks.encrypt([np.asarray(packed[i]["ckks"])]))
        sums["ckks"] = ckks.decrypt(aggregator.sum())[0]
    return LocalAggregate(sums=sums, included=included)


def contributed_weight(values: Mapping[str, np.ndarray], min_weight: float) -> float:
    """The summed public weight ``sum(w)`` of the included clients.

    The weights are declared in the federation config (never derived from data), so this sum
    reveals nothing the coordinator could not compute from the config and the included clients;
    it stays in the secure sum so that every strategy's update is one ratio of sums (beside
    per-expert weight sums, which depend on private choices and must be summed securely).
    Raises :class:`~clients.contract.layout.NoContribution` when it is below half of the
    smallest public weight (``0.5 * min_weight``): nobody contributed and any ratio would be
    quantisation noise.
    """
    if WEIGHT not in values:
        raise StrategyError("the aggregate needs the sum of the mask channel, which carries w")
    total = float(values[WEIGHT][0])
    floor = 0.5 * min_weight
    if total < floor:
        raise NoContribution(
            f"summed weight {total:.3g} is below half the smallest weight ({floor:.3g}): "
            "no client contributed; keep the state"
        )
    return total


@dataclass(frozen=True)
class PerExpertCoordinator:
    """Server half of a strategy that moves each expert by the weighted mean over the
    institutions that updated it, and only when at least ``config.params.min_count`` did
    (FedAlign-MoE, FedMoE); dense entries by the mean over everyone included. With the deltas
    under CKKS the counts and weights are still read from the masked sum, and each encrypted
    delta entry is scaled by ``bound / (its weight sum)`` (0 for experts not updated)."""

    config: Any

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(state)

    def aggregate(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        values = self.layout(state).unpack(sums, partial=True)
        adapters = expert_weighted_update(
            state, values, min_count=self.config.params.min_count, min_weight=self._min_weight
        )
        public = self.public_update(state, sums)
        return GlobalState(adapters=adapters, routing=public.routing, extras=public.extras)

    def encrypted_update_factors(
        self, state: GlobalState, sums: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        return expert_update_factors(
            state, self.layout(state), sums,
            min_count=self.config.params.min_count, min_weight=self._min_weight,
        )  # fmt: skip

    def public_update(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        """The new routing statistics (and extras) from the masked sum alone."""
        values = self.layout(state).unpack(sums, partial=True)
        return GlobalState(state.adapters, summed_routing(state.routing, values), state.extras)

    @property
    def _min_weight(self) -> float:
        return 0.5 * self.config.min_weight


@dataclass(frozen=True)
class ServerHalf:
    """A strategy's server half as the registry holds it: how to build it from the config, and
    what the strategy releases and its coordinator sees (the privacy report's facts)."""

    build: Callable[[FederationConfig], CoordinatorStrategy]
    facts: StrategyFacts
