"""The institution's side of the federation round protocol, as a state machine with no I/O.

:class:`InstitutionRounds` takes one coordinator message at a time and answers with what the
loop must do, in order (:mod:`clients.runtime.outputs`): messages to send, strategy memory to keep
on disk, metrics lines to append. It opens no socket and writes no file; it drives the learner
(training, evaluation), the SecAgg+ client and CKKS (pure compute), and charges the injected
:class:`~clients.runtime.ledger.PrivacyLedger` (write-ahead: the charge is durable when ``charge``
returns, so every release that follows it in the outputs is already accounted for).

The protocol (``clients.contract.messages``): on :class:`RoundStart` it first holds the round's
settings to its own config (:mod:`clients.runtime.pinned`: a round that differs is declined
with a log line naming the setting, before anything is loaded, trained, charged or sent), loads
the broadcast global state, checks the privacy budget (declining a round whose releases would
exceed it), and trains one round through the strategy's learner
(:mod:`clients.strategies.base`); a learner with a selection stage
(:class:`~clients.strategies.base.SelectsExperts`, FedAMoLE) first releases its noised scores and
trains once the :class:`Assignment` arrives. It then runs the client side of
SecAgg+ on the "mask" channel, plus the CKKS channel (if any) just before the masked input.

Ordering guarantees (privacy properties; the tests hold them):

- the round's releases are charged before the ledger head is sent, and the head goes out before
  the CKKS input and the masked input;
- FedAMoLE's scores are charged before any noise is drawn, and before they are sent;
- what the learner keeps from the round's noised releases (``LocalRound.after_charge``) is
  taken only once they are charged, and the strategy's memory is persisted
  (:class:`PersistMemory`) after the charge and before the head and the inputs go out;
- a refused charge sends the ledger head (recording the refusal) and then a :class:`Decline`;
- a RoundStart whose settings differ from the config (fewer participants than the minimum, other
  k, t, survivor check, clip, bits, modulus or channels) is answered by a Decline alone;
- malformed broadcasts (extras, assignment) are declined with a log line; the machine serves on;
- messages for another round id, or not awaited, are ignored with a log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.numpy import save as save_numpy
from safetensors.torch import load as load_safetensors

from clients.contract.extras import ExtrasError
from clients.contract.extras import decode_extras
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.contract.messages import AffinityScores
from clients.contract.messages import Assignment
from clients.contract.messages import CkksInput
from clients.contract.messages import Decline
from clients.contract.messages import RoundEnd
from clients.contract.messages import RoundStart
from clients.contract.messages import Shutdown
from clients.contract.routing import RoutingStats
from clients.runtime.broadcast import adapters_from_arrays
from clients.runtime.broadcast import routing_from_channel
from clients.runtime.ledger import PrivacyLedger
from clients.runtime.outputs import AppendMetrics
from clients.runtime.outputs import Finished
from clients.runtime.outputs import Output
from clients.runtime.outputs import PersistMemory
from clients.runtime.outputs import Send
from clients.runtime.pinned import PinnedSettings
from clients.runtime.pinned import round_differences
from clients.strategies.base import Learner
from clients.strategies.base import LocalRound
from clients.strategies.base import SelectsExperts
from clients.training.trainer import Metrics
from privacy import DPConfig
from privacy import DPTrainingFacts
from privacy import Release
from privacy import ReleaseRefused
from secagg.ckks import CkksKeyHolder
from secagg.ckks import EncryptedBatch
from secagg.client import SecAggClient
from secagg.errors import SecAggError
from secagg.messages import KeyRoster
from secagg.messages import MaskedInput
from secagg.messages import RelayedShares
from secagg.messages import SurvivorSetRequest
from secagg.messages import UnmaskRequest

log = logging.getLogger(__name__)


SECAGG_MESSAGES = (KeyRoster, RelayedShares, SurvivorSetRequest, UnmaskRequest)


@dataclass
class _Round:
    """What an institution keeps about the round it is in."""

    start: RoundStart
    started: float
    state: GlobalState | None = None
    client: SecAggClient | None = None
    ckks: np.ndarray | None = None
    local: LocalRound | None = None
    awaiting_selection: bool = False
    declined: str | None = None
    bytes_sent: int = 0
    seconds_training: float = 0.0
    seconds_crypto: float = 0.0

    @property
    def round_id(self) -> int:
        return self.start.params.round_id


@dataclass(frozen=True)
class RoundSettings:
    """The public, per-plan facts a round needs besides the learner and the ledger: the
    calibrated DP-SGD config, its sampling rate, the local steps per round, and the round
    settings the config pins (every RoundStart is held to them)."""

    dp: DPConfig
    sample_rate: float
    local_steps: int
    pinned: PinnedSettings


class InstitutionRounds:
    """Institution ``name``'s round logic: :meth:`begin` once, then :meth:`handle` each message.

    ``identity`` signs this institution's SecAgg+ keys; ``identities`` are every client's
    registered keys; ``ckks`` holds the shared CKKS key (decrypts broadcasts, encrypts the CKKS
    channel). ``clock`` (monotonic seconds) and ``wall_clock`` (epoch seconds) only time the
    metrics. The loop reports each message it managed to send through :meth:`sent` (it counts
    the round's bytes) and a :class:`PersistMemory` it could not carry out through
    :meth:`local_failure`.
    """

    def __init__(
        self,
        name: str,
        learner: Learner,
        ledger: PrivacyLedger,
        settings: RoundSettings,
        *,
        identity: Ed25519PrivateKey,
        identities: Mapping[int, Ed25519PublicKey],
        ckks: CkksKeyHolder,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.learner = learner
        self.ledger = ledger
        self.settings = settings
        self._identity = identity
        self._identities = dict(identities)
        self._ckks = ckks
        self._clock = clock
        self._wall_clock = wall_clock
        self._round: _Round | None = None
        self._last_state: GlobalState | None = None
        self._outputs: list[Output] = []  # of the call in progress, in the order decided

    # ------------------------------------------------------------------------------ interface

    def begin(self) -> list[Output]:
        """What to do on start-up, before any message: the initial metrics line."""
        return self._collect(
            lambda: self._record("initial", None, self._state(None), validation=True, test=True)
        )

    def handle(self, message: object) -> list[Output]:
        """The outputs for one coordinator message, in the order the loop must carry them out."""
        return self._collect(lambda: self._dispatch(message))

    def sent(self, message: msgspec.Struct) -> None:
        """The loop sent ``message``: count its bytes for the current round's metrics."""
        if self._round is not None:
            self._round.bytes_sent += len(msgspec.msgpack.encode(message))

    def local_failure(self, exc: BaseException) -> list[Output]:
        """The loop could not carry out an output of this round (e.g. keep the strategy's memory):
        decline the round rather than stall it; what followed that output is dropped."""
        current = self._round
        if current is None:
            return []
        log.error("%s: local failure in round %d: %s",
                  self.name, current.start.federation_round, exc)  # fmt: skip
        return self._collect(lambda: self._decline(f"local failure: {type(exc).__name__}: {exc}"))

    @property
    def round_id(self) -> int | None:
        """The id of the round in progress (None between rounds)."""
        return None if self._round is None else self._round.round_id

    @property
    def last_state(self) -> GlobalState | None:
        """The last broadcast state loaded (the Shutdown's, once it came): what the
        institution trained or evaluated under."""
        return self._last_state

    # ------------------------------------------------------------------------------ plumbing

    def _collect(self, step: Callable[[], None]) -> list[Output]:
        """Run ``step`` and return what it emitted (nothing half-collected survives a raise)."""
        self._outputs = []
        try:
            step()
            return self._outputs
        finally:
            self._outputs = []

    def _emit(self, output: Output) -> None:
        self._outputs.append(output)

    def _send(self, message: msgspec.Struct) -> None:
        self._emit(Send(message))

    def _dispatch(self, message: object) -> None:
        if isinstance(message, RoundStart):
            self._on_round_start(message)
        elif isinstance(message, Assignment):
            self._on_assignment(message)
        elif isinstance(message, RoundEnd):
            self._on_round_end(message)
        elif isinstance(message, SECAGG_MESSAGES):
            self._on_secagg(message)
        elif isinstance(message, Shutdown):
            self._on_shutdown(message)
        else:
            log.warning("%s: ignored an unexpected %s", self.name, type(message).__name__)

    # ------------------------------------------------------------------------------ a round

    def _on_round_start(self, start: RoundStart) -> None:
        if self._round is not None:
            log.warning(
                "%s: abandoning unfinished round %d for round %d",
                self.name, self._round.round_id, start.params.round_id,
            )  # fmt: skip
        self._round = current = _Round(start, started=self._clock())
        fed_round = start.federation_round
        log.info("%s: round %d (id %d) started", self.name, fed_round, current.round_id)
        differences = round_differences(self.settings.pinned, start)
        if differences:  # before anything is loaded, trained, charged or sent
            for difference in differences:
                log.warning("%s: declines round %d: its settings differ from the config: %s",
                            self.name, fed_round, difference)  # fmt: skip
            reason = "round settings differ from the config: " + "; ".join(map(str, differences))
            self._decline(reason[:1000])
            return
        try:
            state = self._global_state(start)
        except ExtrasError as exc:
            log.warning("%s: refused the broadcast extras of round %d: %s",
                        self.name, fed_round, exc)  # fmt: skip
            self._decline(f"malformed extras: {exc}")
            return
        except Exception as exc:
            log.exception("%s: cannot use the broadcast state", self.name)
            self._decline(f"cannot use the broadcast global state: {exc}")
            return
        current.state = self._last_state = state
        dp = self.settings.dp
        planned = DPTrainingFacts(
            noise_multiplier=dp.require_noise_multiplier(),
            sample_rate=self.settings.sample_rate,
            steps=self.settings.local_steps,
            max_grad_norm=dp.max_grad_norm,
            delta=self.ledger.delta,
        )
        try:
            selects = isinstance(self.learner, SelectsExperts) and self.learner.wants_scores(state)
            releases = self.learner.releases(state, planned, fed_round, current.round_id)
        except StrategyError as exc:
            log.warning("%s: cannot use the state of round %d: %s", self.name, fed_round, exc)
            self._decline(f"unusable broadcast state: {exc}")
            return
        try:  # refuse (and record it) before training for a round that cannot be released
            self.ledger.check(
                [*releases, *([self._scores_planned(current, state)] if selects else [])]
            )
        except ReleaseRefused as exc:
            log.warning("%s: declines round %d: %s", self.name, fed_round, exc)
            self._send(self.ledger.head())
            self._decline(str(exc))
            return
        if selects:
            self._send_scores(current, state)
            return
        self._train_guarded(current, state)

    def _scores_planned(self, current: _Round, state: GlobalState) -> Release:
        assert isinstance(self.learner, SelectsExperts)
        return self.learner.score_release(state, current.start.federation_round, current.round_id)

    def _send_scores(self, current: _Round, state: GlobalState) -> None:
        """The selection stage: charge the scores (write-ahead, before the learner draws any
        noise), send the ledger head, then the noised scores; training waits for the
        coordinator's :class:`Assignment`."""
        assert isinstance(self.learner, SelectsExperts)

        def charge(release: Release) -> None:
            self.ledger.charge([release])
            self._send(self.ledger.head())

        fed_round = current.start.federation_round
        t0 = self._clock()
        try:
            scores = self.learner.scores(state, fed_round, current.round_id, charge)
        except ReleaseRefused as exc:
            log.warning("%s: declines round %d at its scores: %s", self.name, fed_round, exc)
            self._send(self.ledger.head())
            self._decline(str(exc))
            return
        except Exception as exc:
            log.exception("%s: could not score the experts in round %d", self.name, fed_round)
            self._decline(f"local failure: {type(exc).__name__}: {exc}")
            return
        finally:
            current.seconds_training += self._clock() - t0
        current.awaiting_selection = True
        self._send(
            AffinityScores(
                round_id=current.round_id,
                client_id=current.start.client_id,
                scores=np.ascontiguousarray(scores, dtype="<f8").tobytes(),
            )
        )
        log.info("%s: sent its noised affinity scores for round %d", self.name, fed_round)

    def _on_assignment(self, message: Assignment) -> None:
        current = self._round
        if (
            current is None
            or not current.awaiting_selection
            or message.round_id != current.round_id
        ):
            log.info("%s: ignored an Assignment for round %d (not waiting for one)",
                     self.name, message.round_id)  # fmt: skip
            return
        current.awaiting_selection = False
        assert current.state is not None and isinstance(self.learner, SelectsExperts)
        try:
            state = self.learner.with_selection(current.state, message.selection)
        except Exception as exc:
            log.warning("%s: refused the assignment of round %d: %s",
                        self.name, current.start.federation_round, exc)  # fmt: skip
            self._decline(f"malformed assignment: {exc}")
            return
        current.state = self._last_state = state
        self._train_guarded(current, state)

    def _train_guarded(self, current: _Round, state: GlobalState) -> None:
        try:
            self._train_and_advertise(current, state)
        except Exception as exc:  # any local failure: decline rather than stall the round
            log.exception(
                "%s: local failure in round %d", self.name, current.start.federation_round
            )
            self._decline(f"local failure: {type(exc).__name__}: {exc}")

    def _train_and_advertise(self, current: _Round, state: GlobalState) -> None:
        t0 = self._clock()
        fed_round, rid = current.start.federation_round, current.round_id
        local = self.learner.train(state, self.settings.dp, fed_round, rid)
        current.seconds_training += self._clock() - t0
        current.local = local
        log.info("%s: trained: loss %.3f", self.name, local.metrics["loss"])
        t0 = self._clock()
        clipped = {k: v for k, v in local.submission.clipped.items() if v > 0}
        if clipped:
            log.info("%s: clipped fractions %s", self.name, clipped)
        layout = self.learner.layout(state)
        packed = layout.pack(local.submission.values)
        params, client_id = current.start.params, current.start.client_id
        mask = packed.get("mask")
        if mask is None or mask.size != params.vector_length:
            got = 0 if mask is None else mask.size
            raise ValueError(
                f"the round masks {params.vector_length} values, this layout packs {got}"
            )
        current.ckks = packed.get("ckks")
        current.client = SecAggClient(params, client_id, mask, self._identity, self._identities)
        advertisement = current.client.advertise()
        current.seconds_crypto += self._clock() - t0
        self._send(advertisement)

    def _on_secagg(self, message: Any) -> None:
        current = self._round
        if current is None or current.client is None or message.round_id != current.round_id:
            log.info(
                "%s: ignored %s for round %d (not in it)",
                self.name, type(message).__name__, message.round_id,
            )  # fmt: skip
            return
        t0 = self._clock()
        try:
            reply = current.client.handle(message)
        except SecAggError as exc:
            log.warning("%s: round %d abandoned: %s", self.name, current.round_id, exc)
            current.client = None
            return
        finally:
            current.seconds_crypto += self._clock() - t0
        if isinstance(reply, MaskedInput) and not self._release(current):
            return
        self._send(reply)

    def _release(self, current: _Round) -> bool:
        """Charge the round's releases (write-ahead), send the signed ledger head, then the
        CKKS part; False (and a Decline) if refused: the masked input must not follow."""
        local = current.local
        if local is None or local.facts is None:  # never releases what it cannot account for
            self._decline("local training reported no DP accounting facts")
            return False
        try:
            self.ledger.charge(local.releases)
        except ReleaseRefused as exc:
            log.warning("%s: declines round %d at release: %s", self.name, current.round_id, exc)
            self._send(self.ledger.head())
            self._decline(str(exc))
            return False
        local.after_charge()
        memory = self.learner.memory()
        if memory:  # kept before the release is sent, so a restart goes on from this round
            self._emit(PersistMemory(save_numpy(memory)))
        self._send(self.ledger.head())
        log.info("%s: charged the release: epsilon spent %.3f", self.name, self.ledger.spent())
        if current.ckks is not None:
            t0 = self._clock()
            batch = self._ckks.encrypt([current.ckks])
            current.seconds_crypto += self._clock() - t0
            self._send(
                CkksInput(round_id=current.round_id, client_id=current.start.client_id, batch=batch)
            )
        return True

    def _decline(self, reason: str) -> None:
        current = self._round
        assert current is not None
        current.declined = reason
        current.client = None
        self._send(
            Decline(round_id=current.round_id, client_id=current.start.client_id, reason=reason)
        )

    def _on_round_end(self, end: RoundEnd) -> None:
        current = self._round
        if current is None or end.round_id != current.round_id:
            log.info("%s: ignored RoundEnd of round %d (not in it)", self.name, end.round_id)
            return
        included = current.start.client_id in end.included
        fed_round = current.start.federation_round
        if end.error:
            log.warning("%s: round %d aborted: %s", self.name, fed_round, end.error)
        else:
            log.info(
                "%s: round %d ended; clients included: %s (this one: %s)",
                self.name, fed_round, end.included, "yes" if included else "no",
            )  # fmt: skip
        self._record("round", current, current.state, validation=True, test=False,
                     included=included)  # fmt: skip
        self._round = None

    def _on_shutdown(self, goodbye: Shutdown) -> None:
        log.info("%s: coordinator shut the federation down: %s", self.name, goodbye.reason)
        final = self._final_state(goodbye)
        self._record("final", None, final, validation=False, test=True)
        self._emit(Finished(dict(final.extras)))

    # ------------------------------------------------------------------------------ broadcasts

    def _load_global(self, plain: bytes, encrypted: EncryptedBatch | None) -> None:
        """Load broadcast adapters (safetensors bytes, or the CKKS-encrypted state) if any."""
        if encrypted is not None:
            t0 = self._clock()
            arrays = self._ckks.decrypt(encrypted)
            if self._round is not None:
                self._round.seconds_crypto += self._clock() - t0
            self.learner.load_adapters(adapters_from_arrays(self.learner.adapters(), arrays))
        elif plain:
            self.learner.load_adapters(load_safetensors(plain))

    def _state(self, previous: GlobalState | None) -> GlobalState:
        """The model's adapters as a global state, with ``previous``'s routing and extras
        (the learner's local state, without broadcast aggregates, if there is none)."""
        if previous is not None:
            return GlobalState(self.learner.adapters(), previous.routing, previous.extras)
        return self.learner.local_state()

    def _final_state(self, goodbye: Shutdown) -> GlobalState:
        """The model the federation produced, loaded: the Shutdown's state, or (if it cannot be
        used) the last broadcast's routing and extras with whatever adapters are loaded."""
        try:
            self._last_state = self._global_state(goodbye)
        except Exception as exc:
            log.warning("%s: cannot use the final state (%s); evaluating the last one",
                        self.name, exc)  # fmt: skip
            return self._state(self._last_state)
        return self._last_state

    def _global_state(self, start: RoundStart | Shutdown) -> GlobalState:
        """Load the broadcast adapters into the model; the routing statistics and checked
        extras it carries (:class:`~clients.contract.extras.ExtrasError` if they are malformed)."""
        self._load_global(start.global_state, start.global_encrypted)
        state = self._state(None)
        extras = decode_extras(start.extras, self.learner.extras_shapes(state))
        layout = self.learner.layout(state)
        if start.routing_plain is not None:
            vector = np.frombuffer(start.routing_plain, dtype="<f8")
        elif start.routing_encrypted is not None:
            t0 = self._clock()
            decrypted = self._ckks.decrypt(start.routing_encrypted)
            if self._round is not None:
                self._round.seconds_crypto += self._clock() - t0
            vector = routing_from_channel(layout, decrypted)
        else:
            return GlobalState(state.adapters, state.routing, extras)
        old = state.routing
        routing = RoutingStats.from_vector(
            np.maximum(vector, 0.0), old.layer_names, old.num_experts, old.top_k
        )
        return GlobalState(adapters=state.adapters, routing=routing, extras=extras)

    # ------------------------------------------------------------------------------ metrics

    def _record(
        self,
        event: str,
        current: _Round | None,
        state: GlobalState | None,
        *,
        validation: bool,
        test: bool,
        included: bool | None = None,
    ) -> None:
        """Evaluate (inside the strategy's session for ``state``) and emit one metrics line
        (local only: it is computed on private data)."""
        line: dict[str, Any] = {"event": event, "institution": self.name,
                                "time": self._wall_clock()}  # fmt: skip
        if current is not None:
            train = current.local.metrics if current.local is not None else None
            wall = self._clock() - current.started
            line.update(
                round=current.start.federation_round,
                round_id=current.round_id,
                included=included,
                declined=current.declined,
                train=train,
                bytes_sent=current.bytes_sent,
                seconds_training=current.seconds_training,
                seconds_crypto=current.seconds_crypto,
                seconds_network=max(0.0, wall - current.seconds_training - current.seconds_crypto),
            )
        state = state if state is not None else self._state(None)
        if validation:
            line["validation"] = _metrics(self.learner.evaluate(state, "validation"))
        if test:
            line["test"] = _metrics(self.learner.evaluate(state, "test"))
        line["epsilon_spent"] = self.ledger.spent()
        self._emit(AppendMetrics(line))
        shown = line.get("validation") or line.get("test")
        log.info(
            "%s: %s%s: %s perplexity %.2f, epsilon spent %.3f",
            self.name, event, f" {line['round']}" if "round" in line else "",
            "validation" if "validation" in line else "test",
            shown["perplexity"], line["epsilon_spent"],
        )  # fmt: skip


def _metrics(metrics: Metrics | None) -> dict[str, float | int] | None:
    return None if metrics is None else metrics.summary()
