"""Aggregation strategies, client side, and the public description of a round's submission.

Under secure aggregation the coordinator learns only sums, so a strategy is split in two:
the client side turns local training into named vectors (already multiplied by its client-side
weights), and the coordinator side (``coordinator.strategy``) turns the SUMS of those vectors
into the next global state, computing nothing but ratios of sums.

Both sides derive the same :class:`SubmissionLayout` from public information (the broadcast
:class:`GlobalState` and the strategy's config). A layout is an ordered list of named
segments; each goes through one channel: ``"mask"`` (SecAgg+ fixed-point sum) or ``"ckks"``
(CKKS sum). :meth:`SubmissionLayout.pack` clips every segment to its public ``bound`` and divides
by it, so every packed value lies in ``[-CHANNEL_BOUND, CHANNEL_BOUND]``: the mask channel's
:class:`~secagg.codec.FixedPointCodec` uses ``clip=CHANNEL_BOUND``, and CKKS gets values in the
range its precision is documented for. The decoded sum of segment ``s`` over n clients is thus
off by at most ``n * s.bound * codec.max_error_per_client`` (mask) or
``n * s.bound * secagg.ckks.DEFAULT_ABS_ERROR_PER_SUMMAND`` (CKKS, default parameters).

Every channel of one round must be summed over the SAME set of clients (those the mask
channel included), or ratios of sums mix different populations.

First strategy: FedAvg of adapter deltas weighted by example counts, the weights inside the
secure sum (:class:`FedAvgClient`). Strategies that decide per expert (``clients.fedalign``,
``clients.fedmoe``) build on :mod:`clients.experts`; a strategy may shape local training through
:meth:`ClientStrategy.session` (an extra per-sample loss, entries held fixed, model hooks) and
keep its own client-side memory between rounds (a client strategy object lives as long as the
institution). Strategy-specific public aggregates travel in :attr:`GlobalState.extras`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

from clients.moe_lora import RoutingStats
from clients.trainer import ExtraLoss, LocalTrainingResult

Channel = Literal["mask", "ckks"]
CHANNELS: tuple[Channel, ...] = ("mask", "ckks")
CHANNEL_BOUND = 1.0
"""Every packed value lies in [-CHANNEL_BOUND, CHANNEL_BOUND] (the mask codec's ``clip``)."""

WEIGHT = "weight"
ROUTING = "routing"
DELTA_PREFIX = "delta:"


class StrategyError(ValueError):
    """A strategy was configured or used wrongly (the message says what)."""


class LayoutError(StrategyError):
    """Values do not match a :class:`SubmissionLayout` (the message names the segment)."""


class NoContribution(StrategyError):
    """The summed weight is zero: no included client contributed, so there is nothing to average.

    The coordinator should treat the round as aborted and keep the global state unchanged.
    """


@dataclass(frozen=True)
class Segment:
    """One named vector of a submission: ``length`` values in ``[-bound, bound]`` on ``channel``."""

    name: str
    length: int
    channel: Channel
    bound: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise LayoutError(f"segment name must be a non-empty string, got {self.name!r}")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise LayoutError(
                f"segment {self.name!r}: length must be an int >= 1, got {self.length!r}"
            )
        if self.channel not in CHANNELS:
            raise LayoutError(
                f"segment {self.name!r}: channel must be one of {CHANNELS}, got {self.channel!r}"
            )
        if not (isinstance(self.bound, (int, float)) and 0 < self.bound < float("inf")):
            raise LayoutError(
                f"segment {self.name!r}: bound must be finite and > 0, got {self.bound!r}"
            )


@dataclass(frozen=True)
class SubmissionLayout:
    """What every client submits in a round: ordered segments, packed into one vector per channel.

    Within a channel, segments are concatenated in layout order.
    """

    segments: tuple[Segment, ...]
    _index: dict[str, Segment] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        segments = tuple(self.segments)
        if not segments:
            raise LayoutError("a layout needs at least one segment")
        index: dict[str, Segment] = {}
        for seg in segments:
            if not isinstance(seg, Segment):
                raise LayoutError(f"layout entries must be Segment, got {type(seg).__name__}")
            if seg.name in index:
                raise LayoutError(f"segment name {seg.name!r} appears twice in the layout")
            index[seg.name] = seg
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "_index", index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> Segment:
        try:
            return self._index[name]
        except KeyError:
            raise LayoutError(f"the layout has no segment {name!r}") from None

    @property
    def channels(self) -> tuple[Channel, ...]:
        """The channels some segment uses, in :data:`CHANNELS` order."""
        return tuple(c for c in CHANNELS if any(s.channel == c for s in self.segments))

    def length(self, channel: Channel) -> int:
        """Length of ``channel``'s packed vector (0 if no segment uses it)."""
        return sum(s.length for s in self.segments if s.channel == channel)

    def _check_names(self, values: Mapping[str, object]) -> None:
        missing = [s.name for s in self.segments if s.name not in values]
        unexpected = [n for n in values if n not in self._index]
        if missing or unexpected:
            raise LayoutError(f"submission is missing segments {missing}, has unknown {unexpected}")

    def _flat(self, seg: Segment, value: object) -> np.ndarray:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise LayoutError(
                f"segment {seg.name!r} has dtype {array.dtype}, expected real numbers"
            )
        flat = array.astype(np.float64).ravel()
        if flat.size != seg.length:
            raise LayoutError(
                f"segment {seg.name!r} has {flat.size} values, the layout expects {seg.length}"
            )
        if not np.all(np.isfinite(flat)):
            raise LayoutError(f"segment {seg.name!r} holds NaN or infinite values")
        return flat

    def clipped_fraction(self, values: Mapping[str, object]) -> dict[str, float]:
        """Per segment, the fraction of values beyond ``±bound`` (those :meth:`pack` clips)."""
        self._check_names(values)
        return {
            s.name: float(np.mean(np.abs(self._flat(s, values[s.name])) > s.bound))
            for s in self.segments
        }

    def pack(self, values: Mapping[str, object]) -> dict[Channel, np.ndarray]:
        """One float64 vector per used channel: each segment clipped to ``±bound``, divided by it.

        ``values`` must hold exactly the layout's segment names, each with ``length`` real, finite
        values (any shape; flattened in C order); otherwise :class:`LayoutError`.
        """
        self._check_names(values)
        parts: dict[Channel, list[np.ndarray]] = {c: [] for c in self.channels}
        for seg in self.segments:
            flat = self._flat(seg, values[seg.name])
            parts[seg.channel].append(np.clip(flat, -seg.bound, seg.bound) / seg.bound)
        return {c: np.concatenate(p) * CHANNEL_BOUND for c, p in parts.items()}

    def unpack(
        self, channels: Mapping[str, np.ndarray], *, partial: bool = False
    ) -> dict[str, np.ndarray]:
        """Inverse of :meth:`pack` (for one submission or a sum of them): flat arrays by name.

        With ``partial``, only the given channels are unpacked (a coordinator cannot read a CKKS
        sum, so it unpacks the masked channel alone).
        """
        expected = set(self.channels)
        given = set(channels)
        if not (given <= expected if partial else given == expected):
            raise LayoutError(f"expected channels {sorted(expected)}, got {sorted(channels)}")
        out: dict[str, np.ndarray] = {}
        for channel in (c for c in self.channels if c in given):
            vector = np.asarray(channels[channel])
            if vector.dtype.kind not in "biuf" or vector.shape != (self.length(channel),):
                raise LayoutError(
                    f"channel {channel!r} vector has shape {vector.shape} and dtype "
                    f"{vector.dtype}, the layout expects ({self.length(channel)},) real numbers"
                )
            vector = vector.astype(np.float64) / CHANNEL_BOUND
            offset = 0
            for seg in (s for s in self.segments if s.channel == channel):
                out[seg.name] = vector[offset : offset + seg.length] * seg.bound
                offset += seg.length
        return {s.name: out[s.name] for s in self.segments if s.name in out}


@dataclass(frozen=True)
class GlobalState:
    """What the coordinator broadcasts each round: adapters, last round's summed routing, and
    ``extras``: named public aggregates a strategy derived from last round's secure sums (e.g.
    FedAlign-MoE's score statistics). Extras are ratios or sums over many clients, never one
    client's value, so they may travel in plaintext; a strategy without any leaves them empty.
    """

    adapters: dict[str, torch.Tensor]
    routing: RoutingStats
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def initial(
        cls,
        adapters: Mapping[str, torch.Tensor],
        layer_names: tuple[str, ...] | list[str],
        num_experts: int,
        top_k: int = 1,
    ) -> GlobalState:
        """Round-0 state: the given adapters, all-zero routing statistics, no extras."""
        layers = len(layer_names)
        return cls(
            adapters=dict(adapters),
            routing=RoutingStats(
                layer_names=tuple(layer_names),
                counts=np.zeros((layers, num_experts)),
                gate_sum=np.zeros((layers, num_experts)),
                tokens=np.zeros(layers),
                top_k=top_k,
            ),
        )

    @property
    def routing_distribution(self) -> np.ndarray:
        """p̄[l, e]: the federation's share of layer l's routed slots that went to expert e."""
        return self.routing.load


@dataclass(frozen=True)
class Submission:
    """One client's named segments and, per segment, the fraction of values clipped (to log)."""

    values: dict[str, np.ndarray]
    clipped: dict[str, float]


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
    malformed broadcast (``clients.extras``); one without it accepts no extras.
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

    def submit(
        self, state: GlobalState, result: LocalTrainingResult, num_examples: int
    ) -> Submission:
        """The named segments this client adds to the round's secure sums."""
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


def example_weight(num_examples: int, max_examples: int) -> float:
    """The public-capped example weight ``min(n, max_examples) / max_examples`` in [0, 1]."""
    n = num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise StrategyError(f"num_examples must be an int >= 0, got {n!r}")
    return min(n, max_examples) / max_examples


def check_routing_matches(ours: RoutingStats, theirs: RoutingStats) -> None:
    """Refuse local routing statistics whose layers or expert count differ from the global."""
    if ours.layer_names != theirs.layer_names or ours.num_experts != theirs.num_experts:
        raise LayoutError(
            f"local routing covers {ours.num_layers} layers x {ours.num_experts} experts "
            f"that differ from the global {theirs.num_layers} x {theirs.num_experts} "
            f"(or the layer names differ)"
        )


@dataclass(frozen=True)
class FedAvgConfig:
    """Public parameters of example-weighted FedAvg of adapter deltas.

    A client with n examples submits weight ``w = min(n, max_examples) / max_examples`` and
    ``w * delta``; the coordinator sets ``delta = sum(w * delta) / sum(w)``. Delta entries beyond
    ``±delta_bound`` and routing values beyond ``±routing_bound`` (per client: a count can
    reach tokens * top_k) are clipped. The weight always travels on the mask channel: the
    coordinator must read ``sum(w)`` to form the ratio, also when the deltas go under CKKS (it
    then scales their encrypted sum by ``delta_bound / sum(w)`` without reading it).
    """

    max_examples: int
    delta_bound: float = 0.1
    routing_bound: float = 1e6
    delta_channel: Channel = "mask"
    routing_channel: Channel = "ckks"

    def __post_init__(self) -> None:
        n = self.max_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise StrategyError(f"max_examples must be an int >= 1, got {n!r}")
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

    def submit(
        self, state: GlobalState, result: LocalTrainingResult, num_examples: int
    ) -> Submission:
        n = num_examples
        check_routing_matches(result.routing, state.routing)
        layout = self.layout(state)
        cap = self.config.max_examples
        weight = example_weight(n, cap)
        ours = result.routing
        deltas = {
            DELTA_PREFIX + name: t.detach().cpu().double().numpy()
            for name, t in result.delta.items()
        }
        # Clipping applies to the delta itself, before weighting.
        raw = {**deltas, WEIGHT: np.array([n / cap]), ROUTING: ours.as_vector()}
        clipped = layout.clipped_fraction(raw)
        bound = self.config.delta_bound
        values = {name: weight * np.clip(d, -bound, bound) for name, d in deltas.items()}
        values[WEIGHT] = np.array([weight])
        values[ROUTING] = ours.as_vector()
        return Submission(values=values, clipped=clipped)
