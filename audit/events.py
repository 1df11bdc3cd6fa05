"""dp-accounting ``DpEvent`` s to and from JSON, explicitly (never pickle).

The encoding is one JSON object per event, ``{"kind": ..., <fields>}``, nested for sampled and
composed events. :func:`event_from_json` is strict: an unknown kind, a missing or extra field, a
value of the wrong type or out of range, or nesting deeper than :data:`MAX_DEPTH` raises
:class:`EventFormatError` naming the path of the bad value (``$.event.events[1]``).
"""

from __future__ import annotations

import math
from typing import Any

import dp_accounting

MAX_DEPTH = 16


class EventFormatError(ValueError):
    """A JSON value is not an event this codec knows (the message names where and why)."""


def event_to_json(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """The JSON object of ``event``; raises :class:`EventFormatError` for unsupported kinds."""
    if isinstance(event, dp_accounting.NoOpDpEvent):
        return {"kind": "no_op"}
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
        return {"kind": "non_private"}
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return {"kind": "gaussian", "noise_multiplier": float(event.noise_multiplier)}
    if isinstance(event, dp_accounting.LaplaceDpEvent):
        return {"kind": "laplace", "noise_multiplier": float(event.noise_multiplier)}
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return {
            "kind": "poisson_sampled",
            "sampling_probability": float(event.sampling_probability),
            "event": event_to_json(event.event),
        }
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return {
            "kind": "self_composed",
            "count": int(event.count),
            "event": event_to_json(event.event),
        }
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return {"kind": "composed", "events": [event_to_json(e) for e in event.events]}
    raise EventFormatError(f"cannot record a {type(event).__name__} in a ledger")


_FIELDS = {
    "no_op": (),
    "non_private": (),
    "gaussian": ("noise_multiplier",),
    "laplace": ("noise_multiplier",),
    "poisson_sampled": ("sampling_probability", "event"),
    "self_composed": ("count", "event"),
    "composed": ("events",),
}


def event_from_json(value: Any, path: str = "$") -> dp_accounting.DpEvent:
    """The event a JSON value (as ``json.loads`` returns it) describes; strict, see module."""
    return _decode(value, path, 0)


def _decode(value: Any, path: str, depth: int) -> dp_accounting.DpEvent:
    if depth > MAX_DEPTH:
        raise EventFormatError(f"{path}: events nested deeper than {MAX_DEPTH}")
    if not isinstance(value, dict):
        raise EventFormatError(
            f"{path}: an event must be a JSON object, got {type(value).__name__}"
        )
    kind = value.get("kind")
    if kind not in _FIELDS:
        raise EventFormatError(
            f"{path}.kind: unknown event kind {kind!r}; known: {sorted(_FIELDS)}"
        )
    expected = {"kind", *_FIELDS[kind]}
    if set(value) != expected:
        missing, extra = sorted(expected - set(value)), sorted(set(value) - expected)
        raise EventFormatError(f"{path}: {kind} event has missing fields {missing}, extra {extra}")
    if kind == "no_op":
        return dp_accounting.NoOpDpEvent()
    if kind == "non_private":
        return dp_accounting.NonPrivateDpEvent()
    if kind == "gaussian":
        return dp_accounting.GaussianDpEvent(_positive(value, "noise_multiplier", path))
    if kind == "laplace":
        return dp_accounting.LaplaceDpEvent(_positive(value, "noise_multiplier", path))
    if kind == "poisson_sampled":
        q = _number(value, "sampling_probability", path)
        if not 0 <= q <= 1:
            raise EventFormatError(f"{path}.sampling_probability: must be in [0, 1], got {q!r}")
        inner = _decode(value["event"], f"{path}.event", depth + 1)
        return dp_accounting.PoissonSampledDpEvent(q, inner)
    if kind == "self_composed":
        count = value["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise EventFormatError(f"{path}.count: must be an integer >= 0, got {count!r}")
        inner = _decode(value["event"], f"{path}.event", depth + 1)
        return dp_accounting.SelfComposedDpEvent(inner, count)
    events = value["events"]
    if not isinstance(events, list):
        raise EventFormatError(f"{path}.events: must be a list, got {type(events).__name__}")
    return dp_accounting.ComposedDpEvent(
        [_decode(e, f"{path}.events[{i}]", depth + 1) for i, e in enumerate(events)]
    )


def _number(value: dict[str, Any], name: str, path: str) -> float:
    x = value[name]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise EventFormatError(f"{path}.{name}: must be a finite number, got {x!r}")
    return float(x)


def _positive(value: dict[str, Any], name: str, path: str) -> float:
    x = _number(value, name, path)
    if x <= 0:
        raise EventFormatError(f"{path}.{name}: must be > 0, got {x!r}")
    return x
