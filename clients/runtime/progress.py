"""An institution's local training progress, for whoever watches its run directory.

The institution process replaces ``run_dir/institutions/<name>/progress.json`` (atomically)
with the round it trains for and the local DP-SGD steps done out of the round's total; the
``sealmoe run`` launcher reads it to draw one bar per institution. Like the metrics file it
stays local (a launcher on the same machine reads it; nothing is sent). Writes are throttled
(the first and last step of a run always, between them at most one per ``interval_s``), so a
fast model does not turn every step into a file write.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


PROGRESS_FILE = "progress.json"


class StepProgressFile:
    """A step listener (``clients.training.trainer.report_steps``) that writes ``path``.

    ``round`` is the federation round the steps belong to (set by the institution's loop from
    each round's start message); ``clock`` is monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.round = 0
        self.interval_s = interval_s
        self.clock = clock
        self._last: float | None = None

    def __call__(self, step: int, steps: int) -> None:
        now = self.clock()
        due = self._last is None or now - self._last >= self.interval_s
        if not (step == 0 or step >= steps or due):
            return
        self._last = now
        line = {"round": self.round, "step": step, "steps": steps, "time": time.time()}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:  # replaced whole (a reader never sees half a line); no fsync: it is only progress
            tmp.write_text(json.dumps(line, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:  # progress is a courtesy: never stop training for it
            log.debug("cannot write %s: %s", self.path, exc)


def read_step_progress(path: str | Path) -> dict[str, Any] | None:
    """The progress an institution last wrote (None: none yet, or unreadable)."""
    try:
        line = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(line, dict):
        return None
    if not all(isinstance(line.get(k), int) for k in ("round", "step", "steps")):
        return None
    return line
