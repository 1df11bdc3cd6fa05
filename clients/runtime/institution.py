"""The institution process: a thin loop around the round logic, owning the socket and files.

:class:`Institution` loads what an institution starts from (its keys, the roster, the shared CKKS
key, the strategy's learner with its model and data, the strategy's memory from a previous run)
and serves the federation: it receives each coordinator message on its
:class:`~clients.runtime.transport.InstitutionEndpoint`, hands it to
:class:`~clients.runtime.rounds.InstitutionRounds` (the round protocol with no I/O: training,
budget checks, the write-ahead ledger charges, SecAgg+ and CKKS) and carries out what comes back,
in order (:mod:`clients.runtime.outputs`): sending messages, keeping the strategy's memory in
``run_dir/institutions/<name>/strategy-memory.safetensors`` before anything after it goes out, and
appending metrics (computed on private data, they stay local) to ``metrics.jsonl`` there, and
its local training steps to ``progress.json`` (:mod:`clients.runtime.progress`). It also
says Hello again after a silence, so a restarted coordinator can reach it.

Client ids are indices into ``[[institutions]]`` (:func:`clients.contract.keys.client_id`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_numpy

from clients.contract.caps import MessageCaps
from clients.contract.caps import institution_caps
from clients.contract.config import FederationConfig
from clients.contract.durable import atomic_write
from clients.contract.framing import TransportError
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import identity_keys
from clients.contract.keys import load_ckks_key_holder
from clients.contract.keys import load_institution_keys
from clients.contract.keys import load_roster
from clients.contract.layout import StrategyError
from clients.contract.messages import Hello
from clients.runtime.broadcast import adapters_from_arrays
from clients.runtime.broadcast import routing_from_channel
from clients.runtime.ledger import PrivacyLedger
from clients.runtime.outputs import AppendMetrics
from clients.runtime.outputs import Finished
from clients.runtime.outputs import Output
from clients.runtime.outputs import PersistMemory
from clients.runtime.outputs import Send
from clients.runtime.pinned import pinned_settings
from clients.runtime.progress import PROGRESS_FILE
from clients.runtime.progress import StepProgressFile
from clients.runtime.rounds import InstitutionRounds
from clients.runtime.rounds import RoundSettings
from clients.runtime.trained_model import MODEL_DIR
from clients.runtime.trained_model import keep_trained_model
from clients.runtime.transport import InstitutionEndpoint
from clients.strategies.registry import learner_for
from clients.training.trainer import report_steps
from privacy.budget import plan_dp_sgd
from privacy.errors import UserError

__all__ = [
    "HELLO_INTERVAL_S",
    "MEMORY_FILE",
    "METRICS_FILE",
    "PROGRESS_FILE",
    "Institution",
    "InstitutionError",
    "adapters_from_arrays",
    "routing_from_channel",
]

log = logging.getLogger(__name__)


HELLO_INTERVAL_S = 2.0
"""An institution that heard nothing for this long says Hello again, so a restarted coordinator
(which lost its routes, maybe mid-round) can reach it."""


POLL_S = 0.25


METRICS_FILE = "metrics.jsonl"


MEMORY_FILE = "strategy-memory.safetensors"
"""The client strategy's memory between rounds (safetensors; it never leaves the institution)."""


class InstitutionError(UserError, RuntimeError):
    """The institution cannot start as its run directory stands (the message says what to do)."""


class Institution:
    """One institution of the federation ``config``, called ``name``, charging ``ledger``.

    Construction loads keys, the roster, the shared CKKS key, the model and the data, and
    calibrates the DP-SGD noise once for the whole plan: (rounds + spare_rounds) rounds of
    local_steps DP-SGD steps, composed with as many routing-statistics releases.
    """

    def __init__(self, config: FederationConfig, name: str, *, ledger: PrivacyLedger) -> None:
        self.config = config
        self.name = name
        self.keys = load_institution_keys(config.keys_dir, name)
        self.roster = load_roster(config.keys_dir / ROSTER_FILE)
        self.identities = identity_keys(config, self.roster)
        self.ckks = load_ckks_key_holder(config.keys_dir, name)
        self.learner = learner_for(config, name)
        train = config.training
        n_train = int(self.data["train"].shape[0])
        self.sample_rate = min(1.0, train.batch_size / n_train)
        planned_rounds = config.federation.rounds + config.privacy.spare_rounds
        self.dp = plan_dp_sgd(
            config.dp_config(name),
            sample_rate=self.sample_rate,
            steps_per_round=train.local_steps,
            rounds=planned_rounds,
            per_round=self.learner.per_round_events(),
        )
        budget = config.budget(name)
        if (ledger.budget_epsilon, ledger.delta) != (budget.target_epsilon, budget.target_delta):
            raise ValueError(
                f"the ledger enforces ({ledger.budget_epsilon}, {ledger.delta}), the config "
                f"gives {name!r} ({budget.target_epsilon}, {budget.target_delta})"
            )
        self.ledger = ledger
        self.dir = Path(config.run_dir) / "institutions" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / METRICS_FILE
        self.memory_path = self.dir / MEMORY_FILE
        self.progress = StepProgressFile(self.dir / PROGRESS_FILE)
        if self.memory_path.exists():
            try:
                self.learner.restore(load_numpy(self.memory_path.read_bytes()))
            except (SafetensorError, StrategyError, OSError) as exc:
                raise InstitutionError(
                    f"{self.memory_path}: the strategy's memory cannot be restored ({exc}); "
                    "delete the file to let the strategy start afresh"
                ) from None
            log.info("%s: restored the strategy's memory from %s", name, self.memory_path)
        self.rounds = InstitutionRounds(
            name,
            self.learner,
            ledger,
            RoundSettings(self.dp, self.sample_rate, train.local_steps, pinned_settings(config)),
            identity=self.keys.identity,
            identities=self.identities,
            ckks=self.ckks,
        )
        self._endpoint: InstitutionEndpoint | None = None
        log.info(
            "%s: strategy %s; %d train / %d validation / %d test blocks; DP-SGD sigma=%.3f, "
            "q=%.4f; budget epsilon=%g (spent %.3f)",
            name, config.aggregation.strategy, n_train, len(self.data["validation"]),
            len(self.data["test"]), self.dp.noise_multiplier, self.sample_rate,
            budget.target_epsilon, self.ledger.spent(),
        )  # fmt: skip

    @property
    def model(self) -> torch.nn.Module:
        return self.learner.model

    @property
    def data(self) -> dict[str, torch.Tensor]:
        return self.learner.data

    # ------------------------------------------------------------------------------ main loop

    def run(self, stop: threading.Event | None = None) -> int:
        """Serve the federation until :class:`~clients.contract.messages.Shutdown` (or ``stop``);
        return 0."""
        cfg = self.config
        caps = self.caps()
        log.info("%s: %s", self.name, caps.describe())
        endpoint = InstitutionEndpoint(
            cfg.connect_address(self.name),
            self.keys.curve_secret,
            self.keys.curve_public,
            self.roster.coordinator.curve_public.encode(),
            caps.max_message_bytes,
            max_queued_bytes=caps.max_queued_bytes,
        )
        self._endpoint = endpoint
        try:
            self._send(Hello())
            self._carry_out(self.rounds.begin())
            last_heard = time.monotonic()
            while stop is None or not stop.is_set():
                message = endpoint.recv(POLL_S)
                if message is None:
                    if time.monotonic() - last_heard >= HELLO_INTERVAL_S:
                        self._send(Hello())
                        last_heard = time.monotonic()
                    continue
                last_heard = time.monotonic()
                if self._serve(message):
                    return 0
            log.info("%s: stopped", self.name)
            return 0
        finally:
            self._endpoint = None
            endpoint.close()

    def caps(self) -> MessageCaps:
        """What this institution accepts from the coordinator, sized to the broadcasts of its
        strategy's rounds (adapters, layout and extras shapes), see
        :mod:`clients.contract.caps`."""
        state = self.learner.local_state()
        layout = self.learner.layout(state)
        return institution_caps(self.config, state, layout, self.learner.extras_shapes(state))

    def _serve(self, message: object) -> bool:
        """Hand one coordinator message to the round logic and carry out its outputs; True once
        the federation is over."""
        self.progress.round = getattr(message, "federation_round", self.progress.round)
        with report_steps(self.progress):  # local steps -> progress.json, for the launcher
            outputs = self.rounds.handle(message)
        return self._carry_out(outputs)

    def _carry_out(self, outputs: list[Output]) -> bool:
        """Carry out ``outputs`` in order; True if one of them says the federation is over.

        Memory that cannot be kept stops the rest of the batch (nothing after it may go out as
        if it were kept): the round logic declines the round instead.
        """
        pending = list(outputs)
        finished = False
        while pending:
            output = pending.pop(0)
            if isinstance(output, Send):
                self._send(output.message)
            elif isinstance(output, PersistMemory):
                try:
                    atomic_write(self.memory_path, output.data, mode=0o600)
                except Exception as exc:
                    log.exception("%s: cannot keep the strategy's memory", self.name)
                    pending = self.rounds.local_failure(exc)
            elif isinstance(output, AppendMetrics):
                with self.metrics_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(output.line, sort_keys=True) + "\n")
            elif isinstance(output, Finished):
                self._keep_trained_model(output.extras)
                finished = True
            else:
                raise TypeError(f"unknown output {output!r}")
        return finished

    def _keep_trained_model(self, extras: dict[str, np.ndarray]) -> None:
        """Write the model this institution ends with under its run directory (a failure is
        logged: the federation is over either way)."""
        personal = {**self.learner.memory(), **{f"extras.{k}": v for k, v in extras.items()}}
        directory = self.dir / MODEL_DIR
        try:
            keep_trained_model(directory, self.config, self.name, self.learner.adapters(), personal)
        except Exception:
            log.exception("%s: cannot keep the trained model in %s", self.name, directory)
            return
        log.info("%s: trained model kept in %s", self.name, directory)

    def _send(self, message: msgspec.Struct) -> None:
        """Send, counting bytes for this round's metrics; transport errors are logged."""
        assert self._endpoint is not None
        try:
            self._endpoint.send(message)
        except TransportError as exc:
            log.warning("%s: could not send %s: %s", self.name, type(message).__name__, exc)
            return
        self.rounds.sent(message)
