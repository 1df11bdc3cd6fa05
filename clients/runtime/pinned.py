"""The round settings an institution holds the coordinator to, from its own federation config.

A :class:`~clients.contract.messages.RoundStart` carries per-round data (round id, the invited
client ids, the graph seed, the global state) and settings (SecAgg+ neighbours k and threshold
t, the survivor check, clip, bits, modulus, which channel carries the expert updates and the
routing statistics). The settings are not the coordinator's to choose: every institution reads
the same config file, so it derives what each setting must be for the invited participants and
compares. :func:`round_differences` lists every setting that differs, with both values; the
round logic (:mod:`clients.runtime.rounds`) declines such a round before it loads, trains,
charges or sends anything, so an adversarial coordinator gets nothing derived from the data.

The mask channel's length is checked against the institution's own submission layout (which
its config's channels decide) before its keys are advertised, in the round logic.
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.contract.config import FederationConfig
from clients.contract.config import Protection
from clients.contract.config import SecAggSection
from clients.contract.messages import RoundStart


@dataclass(frozen=True)
class Difference:
    """One setting of a RoundStart that is not the institution's: ``field``, what the
    coordinator sent (``got``) and what the config says (``expected``)."""

    field: str
    got: object
    expected: object

    def __str__(self) -> str:
        return f"{self.field}: the coordinator sent {self.got!r}, the config says {self.expected!r}"


@dataclass(frozen=True)
class PinnedSettings:
    """What an institution's config fixes about every round (see :func:`pinned_settings`)."""

    secagg: SecAggSection
    min_participants: int
    expert_updates: Protection
    routing_statistics: Protection


def pinned_settings(config: FederationConfig) -> PinnedSettings:
    """The round settings ``config`` fixes."""
    return PinnedSettings(
        secagg=config.secagg,
        min_participants=config.secagg.minimum_participants(len(config.institutions)),
        expert_updates=config.aggregation.expert_updates,
        routing_statistics=config.aggregation.routing_statistics,
    )


def round_differences(pinned: PinnedSettings, start: RoundStart) -> list[Difference]:
    """Every setting of ``start`` that differs from ``pinned`` (empty: the round is as
    configured). Threshold and neighbours are compared with what the config gives for a
    round of the invited participants (their defaults depend on the count)."""
    params, sec = start.params, pinned.secagg
    out: list[Difference] = []
    n = len(params.client_ids)
    if n < pinned.min_participants:
        out.append(Difference("participants", n, f">= {pinned.min_participants}"))
    threshold, neighbours = sec.resolved(n)
    for field, got, expected in (
        ("neighbours", params.neighbours, neighbours),
        ("threshold", params.threshold, threshold),
        ("check_survivors", params.check_survivors, sec.check_survivors),
        ("clip", params.clip, sec.clip),
        ("bits", params.bits, sec.bits),
        ("modulus_bits", params.modulus_bits, sec.modulus_bits),
    ):
        if got != expected:
            out.append(Difference(field, got, expected))
    if start.client_id not in params.client_ids:
        out.append(Difference("client_id", start.client_id, "one of the invited ids"))
    # The broadcast's form shows the channels the coordinator runs. Expert updates under CKKS
    # come in plaintext only before the first completed round, so that case cannot be told.
    if pinned.expert_updates == "mask" and start.global_encrypted is not None:
        out.append(Difference("expert_updates", "ckks", "mask"))
    if pinned.routing_statistics == "mask" and start.routing_encrypted is not None:
        out.append(Difference("routing_statistics", "ckks", "mask"))
    if pinned.routing_statistics == "ckks" and start.routing_plain is not None:
        out.append(Difference("routing_statistics", "mask", "ckks"))
    return out
