"""The public description of a round's submission, shared by both sides.

Under secure aggregation the coordinator learns only sums, so a strategy is split in two: the
client side turns local training into named vectors (already multiplied by its client-side
weights), and the coordinator side turns the SUMS of those vectors into the next global state,
computing nothing but ratios of sums.

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
channel included), or ratios of sums mix different populations. Strategy-specific public
aggregates travel in :attr:`GlobalState.extras`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Literal

import numpy as np

from clients.contract.routing import RoutingStats

if TYPE_CHECKING:
    import torch

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


def check_routing_matches(ours: RoutingStats, theirs: RoutingStats) -> None:
    """Refuse local routing statistics whose layers or expert count differ from the global."""
    if ours.layer_names != theirs.layer_names or ours.num_experts != theirs.num_experts:
        raise LayoutError(
            f"local routing covers {ours.num_layers} layers x {ours.num_experts} experts "
            f"that differ from the global {theirs.num_layers} x {theirs.num_experts} "
            f"(or the layer names differ)"
        )
