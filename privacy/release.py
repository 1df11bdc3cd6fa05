"""What leaves an institution, described apart from the math that prices it.

A :class:`Release` names the round, what was released and the mechanism as a dp-accounting
``DpEvent`` with the public parameters behind it. A ledger records releases and prices their
composition with :func:`privacy.epsilon`; nothing here computes epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from types import MappingProxyType
from typing import Final

import dp_accounting

from privacy.errors import PrivacyConfigError

ADAPTER_UPDATE: Final = "adapter-update"
ROUTING_STATISTICS: Final = "routing-statistics"
AFFINITY_SCORES: Final = "affinity-scores"
EXPERT_KEYS: Final = "expert-keys"
EXPERT_CHOICE: Final = "expert-choice"
VALIDATION_SIGNAL: Final = "validation-signal"
WHAT: Final = (
    ADAPTER_UPDATE,
    ROUTING_STATISTICS,
    AFFINITY_SCORES,
    EXPERT_KEYS,
    EXPERT_CHOICE,
    VALIDATION_SIGNAL,
)
"""The kinds of release an institution makes (the only values ``Release.what`` accepts)."""

Parameter = int | float | str


@dataclass(frozen=True)
class Release:
    """One release of round ``federation_round`` (attempt ``round_id``), priced by ``event``.

    ``parameters`` are the public facts a reader needs to judge the mechanism (noise
    multiplier, sampling rate, steps, clipping bound, sensitivity, ...): numbers and strings.
    """

    federation_round: int
    round_id: int
    what: str
    event: dp_accounting.DpEvent
    parameters: Mapping[str, Parameter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("federation_round", "round_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PrivacyConfigError(f"{name} must be an int >= 0, got {value!r}")
        if self.what not in WHAT:
            raise PrivacyConfigError(f"what must be one of {WHAT}, got {self.what!r}")
        if not isinstance(self.event, dp_accounting.DpEvent):
            raise PrivacyConfigError(f"event must be a DpEvent, got {type(self.event).__name__}")
        params = dict(self.parameters)
        for key, value in params.items():
            ok = isinstance(value, str) or (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
            if not isinstance(key, str) or not ok:
                raise PrivacyConfigError(
                    f"parameter {key!r} must map a name to a finite number or a string, "
                    f"got {value!r}"
                )
        object.__setattr__(self, "parameters", MappingProxyType(params))
