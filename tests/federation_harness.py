"""A whole federation in this process: the coordinator here, each institution in a thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

from clients.contract.config import FederationConfig
from clients.runtime.institution import Institution
from coordinator.app.wiring import make_institution
from coordinator.service import Coordinator, RoundOutcome


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
