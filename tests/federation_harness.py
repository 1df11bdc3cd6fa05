"""A whole federation in this process: the coordinator here, each institution in a thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from clients.contract.config import FederationConfig
from clients.runtime.institution import Institution
from coordinator.app.wiring import make_institution
from coordinator.service import Coordinator
from coordinator.service import RoundOutcome


def run_in_threads(
    config: FederationConfig, prepare: Callable[[Institution], None] | None = None
) -> tuple[list[RoundOutcome], list[Institution]]:
    """Run every round; threads are named after their institution. ``prepare(inst)`` runs on
    each institution before it starts; each must leave on the coordinator's Shutdown."""
    coordinator = Coordinator(config)
    institutions = [make_institution(config, name) for name in config.institution_names]
    for inst in institutions:
        if prepare is not None:
            prepare(inst)
    stop = threading.Event()
    threads = [
        threading.Thread(target=inst.run, args=(stop,), name=inst.name) for inst in institutions
    ]
    for t in threads:
        t.start()
    try:
        outcomes = coordinator.run()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "an institution missed the Shutdown"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    return outcomes, institutions


Recorded = dict[tuple[int, str], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
"""(round, institution) -> (the broadcast extras it received, the values it submitted)."""


def record_submissions(monkeypatch, cls: type) -> Recorded:
    """(round, institution) -> (the broadcast extras it received, the values it submitted)."""
    recorded: Recorded = {}
    original = cls.submit

    def submit(self, state, result, weight):
        submission = original(self, state, result, weight)
        name = threading.current_thread().name
        r = 1 + sum(1 for (_, n) in recorded if n == name)
        recorded[(r, name)] = (
            {k: v.copy() for k, v in state.extras.items()},
            {k: np.array(v, copy=True) for k, v in submission.values.items()},
        )
        return submission

    monkeypatch.setattr(cls, "submit", submit)
    return recorded


Frames = dict[str, list[tuple[int, int]]]
"""Per receiving side ("coordinator", "institution"): (frame bytes, the endpoint's cap)."""


def record_frames(monkeypatch) -> Frames:
    """Every frame either side's endpoint decodes, with the cap it was decoded under."""
    import clients.runtime.transport as institution_transport
    import coordinator.transport as coordinator_transport

    seen: Frames = {"coordinator": [], "institution": []}
    for side, module in (("coordinator", coordinator_transport),
                         ("institution", institution_transport)):  # fmt: skip
        original = module.decode_frame

        def decode_frame(frame, decode, max_message_bytes, _side=side, _original=original):
            seen[_side].append((len(frame), max_message_bytes))
            return _original(frame, decode, max_message_bytes)

        monkeypatch.setattr(module, "decode_frame", decode_frame)
    return seen


def assert_caps_admit(config: FederationConfig, seen: Frames) -> None:
    """Both sides ran under computed caps below the config's maximum, and every frame of the
    run fitted under the cap of the endpoint that received it (institutions' caps may differ
    by the few bytes their measured ciphertext sizes differ by)."""
    for side, frames in seen.items():
        assert frames, f"no frame reached the {side}"
        for size, cap in frames:
            assert size < cap < config.coordinator.max_message_bytes, (side, size, cap)
        assert max(cap for _, cap in frames) < config.coordinator.max_message_bytes // 16
