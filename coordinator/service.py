"""The coordinator process: runs the federation's rounds over the authenticated transport.

Each round: wait for the institutions, broadcast the global adapter state (and the previous
round's summed routing statistics) in a :class:`~clients.contract.messages.RoundStart`, drive the
SecAgg+ stages with a timeout per stage while collecting the CKKS inputs, and turn the secure sums
into the next global state with the configured strategy's coordinator side
(:func:`coordinator.strategies.registry.coordinator_strategy`). A strategy with a selection stage
(FedAMoLE, :class:`~coordinator.strategies.base.SelectionStage`) first collects the institutions'
noised scores and sends its choice back before they train. Its public aggregates
(:attr:`~clients.contract.layout.GlobalState.extras`) go out with the next ``RoundStart`` and into
the round's checkpoint. The coordinator sees sums only (and FedAMoLE's noised, charged scores):
the masked channel decoded, the CKKS channel never (it relays the encrypted sum for the
institutions to decrypt). A round that falls below the threshold is recorded as aborted and
the next one starts. Progress survives ``kill -9``: see :mod:`coordinator.store`. Each
institution's signed ledger head (:class:`~privacy.head.LedgerHead`) is checked against its
roster identity key and kept in the run directory only if its proof shows that it extends the last
one kept (:mod:`audit.heads`), so a ledger later cut short, deleted or rewritten fails ``verify``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import msgspec
import numpy as np
from safetensors.torch import save

from audit.context import context_bytes
from audit.entry import head_signature_ok
from audit.heads import HeadFileError
from audit.heads import HeadRefused
from clients.contract.caps import MessageCaps
from clients.contract.caps import coordinator_caps
from clients.contract.config import FederationConfig
from clients.contract.extras import encode_extras
from clients.contract.framing import TransportError
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import client_id
from clients.contract.keys import identity_keys
from clients.contract.keys import load_ckks_public_context
from clients.contract.keys import load_coordinator_keys
from clients.contract.keys import load_roster
from clients.contract.layout import ROUTING
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.contract.layout import SubmissionLayout
from clients.contract.messages import AffinityScores
from clients.contract.messages import Assignment
from clients.contract.messages import CkksInput
from clients.contract.messages import Decline
from clients.contract.messages import Hello
from clients.contract.messages import RoundStart
from clients.contract.messages import Shutdown
from clients.contract.messages import round_id
from clients.strategies.registry import initial_state
from coordinator.facts import audit_facts
from coordinator.store import RoutingRelay
from coordinator.store import RunStore
from coordinator.strategies.base import EncryptedUpdates
from coordinator.strategies.base import Initialises
from coordinator.strategies.base import SelectionStage
from coordinator.strategies.registry import coordinator_strategy
from coordinator.transport import CoordinatorEndpoint
from coordinator.transport import run_secagg_round
from privacy.errors import UserError
from privacy.head import LedgerHead
from secagg.ckks import CkksAggregator
from secagg.ckks import CkksEvaluator
from secagg.ckks import EncryptedBatch
from secagg.ckks import context_params
from secagg.errors import SecAggError
from secagg.errors import TooFewSurvivors
from secagg.messages import MaskedInput
from secagg.server import SecAggServer

log = logging.getLogger(__name__)

SHUTDOWN_LINGER_S = 10.0


class CoordinatorError(UserError, RuntimeError):
    """The federation cannot run as configured (the message says what to change)."""


@dataclass(frozen=True)
class RoundOutcome:
    """What one attempt at a round came to (``error`` is None when it completed)."""

    federation_round: int
    attempt: int
    institutions: list[str]
    included: list[str]
    error: str | None
    seconds: float


class Coordinator:
    """Runs every round of ``config``'s federation; resumes from its run directory."""

    def __init__(self, config: FederationConfig) -> None:
        self.config = config
        self.keys = load_coordinator_keys(config.keys_dir)
        roster = load_roster(config.keys_dir / ROSTER_FILE)
        missing = set(config.institution_names) - {e.name for e in roster.institutions}
        if missing:
            raise CoordinatorError(f"institutions {sorted(missing)} are not in the roster: "
                                   "run `sealmoe keys` again")  # fmt: skip
        self.curve_keys = {e.name: e.curve_public for e in roster.institutions}
        self.identities = identity_keys(config, roster)
        self.identity_by_name = {e.name: e.identity_key for e in roster.institutions}
        aggregation = config.aggregation
        self.encrypts_updates = aggregation.expert_updates == "ckks"
        self.uses_ckks = self.encrypts_updates or aggregation.routing_statistics == "ckks"
        self.ckks_context = load_ckks_public_context(config.keys_dir) if self.uses_ckks else None
        self.evaluator = None
        if self.encrypts_updates:
            assert self.ckks_context is not None
            try:
                self.evaluator = CkksEvaluator(self.ckks_context)
            except SecAggError as exc:
                raise CoordinatorError(f"aggregation.ckks: {exc}") from None
        self.strategy = coordinator_strategy(config)
        if self.encrypts_updates and not isinstance(self.strategy, EncryptedUpdates):
            raise CoordinatorError(
                f"aggregation.expert_updates = 'ckks' does not work with aggregation.strategy = "
                f"{aggregation.strategy!r}: set expert_updates = 'mask'"
            )
        self.store = RunStore(config.run_dir)
        self.store.write_context(context_bytes(audit_facts(config)))

    def initial_state(self) -> GlobalState:
        """The round-0 global state: the seeded adapter initialisation, zero routing, and the
        strategy's own round-0 parts (FedAMoLE's public assignment)."""
        state = initial_state(self.config)
        if isinstance(self.strategy, Initialises):
            state = self.strategy.initial_state(state)
        return state

    def caps(self, state: GlobalState | None = None) -> MessageCaps:
        """What the coordinator accepts from each institution, sized to the round layout of
        ``state`` (default: the initial state; the adapter shapes, and so the layout, do not
        change between rounds), see :mod:`clients.contract.caps`."""
        state = self.initial_state() if state is None else state
        try:
            layout = self.strategy.layout(state)
        except StrategyError as exc:
            raise CoordinatorError(f"the round layout cannot be derived: {exc}") from None
        return coordinator_caps(self.config, layout)

    def run(self, stop: threading.Event | None = None) -> list[RoundOutcome]:
        """Run (or resume) the federation to its last round; tell the institutions it is over."""
        stop = stop or threading.Event()
        resume = self.store.resume()
        state = self.initial_state()
        encrypted: EncryptedBatch | None = None
        if isinstance(resume.adapters, EncryptedBatch):
            encrypted = resume.adapters
            state = GlobalState(state.adapters, state.routing, resume.extras)
        elif resume.adapters is not None:
            state = GlobalState(resume.adapters, state.routing, resume.extras)
        if resume.adapters is not None:
            log.info("resuming after round %d (attempt %d next)", resume.last_round,
                     resume.next_attempt)  # fmt: skip
        relay = resume.routing
        outcomes = []
        caps = self.caps(state)
        log.info("coordinator %s", caps.describe())
        with CoordinatorEndpoint(
            self.config.coordinator.bind, self.keys.curve_secret, self.keys.curve_public,
            self.curve_keys, caps.max_message_bytes, max_queued_bytes=caps.max_queued_bytes,
        ) as endpoint:  # fmt: skip
            aggregation = self.config.aggregation
            log.info("coordinator listening on %s; strategy %s, expert updates %s, routing "
                     "statistics %s", endpoint.address, aggregation.strategy,
                     aggregation.expert_updates, aggregation.routing_statistics)  # fmt: skip
            first = resume.last_round + 1
            for federation_round in range(first, self.config.federation.rounds + 1):
                if stop.is_set():
                    break
                attempt = resume.next_attempt if federation_round == first else 0
                names = self._gather(endpoint, stop)
                outcome, state, encrypted, relay = self._round(
                    endpoint, state, encrypted, relay, federation_round, attempt, names
                )
                outcomes.append(outcome)
            goodbye = Shutdown(
                reason="the federation finished its rounds",
                global_state=_state_bytes(state) if encrypted is None else b"",
                global_encrypted=encrypted,
                routing_plain=relay.plain,
                routing_encrypted=relay.encrypted,
                extras=encode_extras(state.extras),
            )
            for name in endpoint.connected:
                try:
                    endpoint.send(name, goodbye)
                except TransportError as exc:
                    log.info("could not say goodbye to %s: %s", name, exc)
            endpoint.close(linger_s=SHUTDOWN_LINGER_S)  # let the goodbyes leave
        return outcomes

    def _gather(self, endpoint: CoordinatorEndpoint, stop: threading.Event) -> list[str]:
        """Wait until every institution is connected, or the stage timeout passes."""
        deadline = time.monotonic() + self.config.coordinator.stage_timeout_s
        wanted = set(self.config.institution_names)
        while not wanted <= endpoint.connected and time.monotonic() < deadline:
            if stop.is_set():
                break
            received = endpoint.recv(min(0.5, max(deadline - time.monotonic(), 0.0)))
            if received is not None and isinstance(received[1], LedgerHead):
                self._accept_head(*received)
            elif received is not None and not isinstance(received[1], Hello):
                log.info("ignored %s from %s between rounds", type(received[1]).__name__,
                         received[0])  # fmt: skip
        return [n for n in self.config.institution_names if n in endpoint.connected]

    def _round(
        self,
        endpoint: CoordinatorEndpoint,
        state: GlobalState,
        encrypted: EncryptedBatch | None,
        relay: RoutingRelay,
        federation_round: int,
        attempt: int,
        names: list[str],
    ) -> tuple[RoundOutcome, GlobalState, EncryptedBatch | None, RoutingRelay]:
        """One attempt at a round. ``state`` holds the plaintext adapters, or, once
        ``encrypted`` (CKKS expert updates) is set, only their public shapes."""
        started = time.monotonic()
        rid = round_id(federation_round, attempt)
        layout = self.strategy.layout(state)
        self.store.started(federation_round, attempt, rid, names)
        log.info("round %d (attempt %d): %d institutions", federation_round, attempt, len(names))

        def fail(
            reason: str,
        ) -> tuple[RoundOutcome, GlobalState, EncryptedBatch | None, RoutingRelay]:
            log.warning("round %d aborted: %s", federation_round, reason)
            self.store.aborted(federation_round, attempt, reason)
            seconds = time.monotonic() - started
            outcome = RoundOutcome(federation_round, attempt, names, [], reason, seconds)
            return outcome, state, encrypted, relay

        minimum = self.config.secagg.minimum_participants(len(self.config.institutions))
        if len(names) < minimum:  # the institutions would decline it anyway
            return fail(f"{len(names)} institutions are online, a round needs at least "
                        f"{minimum} (secagg.min_participants)")  # fmt: skip
        ids = {client_id(self.config, n): n for n in names}
        try:
            params = self.config.secagg.round_params(
                rid, sorted(ids), os.urandom(32), layout.length("mask")
            )
        except SecAggError as exc:
            return fail(f"{len(names)} institutions cannot form a round: {exc}")
        global_bytes = _state_bytes(state) if encrypted is None else b""
        extras_bytes = encode_extras(state.extras)
        start = {
            name: RoundStart(
                params=params,
                client_id=cid,
                federation_round=federation_round,
                global_state=global_bytes,
                routing_plain=relay.plain,
                routing_encrypted=relay.encrypted,
                global_encrypted=encrypted,
                extras=extras_bytes,
            )
            for cid, name in ids.items()
        }
        server = SecAggServer(params, {i: self.identities[i] for i in ids})
        ckks_inputs: dict[int, EncryptedBatch] = {}
        uses_ckks = "ckks" in layout.channels
        selected = state

        def selection_stage() -> set[int]:
            nonlocal selected
            selected, dropped = self._selection_stage(endpoint, state, rid, ids)
            return dropped

        def on_message(name: str, cid: int, message: msgspec.Struct) -> bool:
            if isinstance(message, LedgerHead):
                self._accept_head(name, message)
                return True
            if isinstance(message, CkksInput):
                if message.round_id == rid and message.client_id == cid:
                    ckks_inputs.setdefault(cid, message.batch)
                else:
                    log.warning("ignored a CKKS input from %s for another round or id", name)
                return True
            if isinstance(message, MaskedInput) and uses_ckks and cid not in ckks_inputs:
                log.warning("refused the masked input of %s: its CKKS input did not come first",
                            name)  # fmt: skip
                return True
            return False

        try:
            mask_sum = run_secagg_round(
                endpoint, server, ids, self.config.coordinator.stage_timeout_s,
                start=start, on_message=on_message,
                before_stages=selection_stage if self._selects(state) else None,
                first_stage_timeout_s=self.config.coordinator.training_timeout_s,
            )  # fmt: skip
        except (SecAggError, StrategyError) as exc:
            return fail(str(exc))
        included = server.included
        try:
            ckks_sum = self._ckks_sum(ckks_inputs, included) if uses_ckks else None
            new_state, new_encrypted = selected, encrypted
            if self.encrypts_updates:
                new_encrypted = self._encrypted_update(selected, encrypted, mask_sum, ckks_sum)
                new_state = self._updates.public_update(selected, {"mask": mask_sum})
            else:
                new_state = self.strategy.aggregate(selected, {"mask": mask_sum})
            new_relay = self._routing_relay(layout, mask_sum, ckks_sum)
        except (StrategyError, SecAggError) as exc:
            return fail(f"aggregation failed: {exc}")
        seconds = time.monotonic() - started
        included_names = [ids[i] for i in included]
        self.store.completed(
            federation_round, attempt,
            new_state.adapters if new_encrypted is None else new_encrypted,
            new_relay, included_names, {"round": seconds}, extras=new_state.extras,
        )  # fmt: skip
        log.info("round %d completed with %s in %.1f s", federation_round, included_names, seconds)
        outcome = RoundOutcome(federation_round, attempt, names, included_names, None, seconds)
        return outcome, new_state, new_encrypted, new_relay

    def _selects(self, state: GlobalState) -> bool:
        return isinstance(self.strategy, SelectionStage) and self.strategy.wants_scores(state)

    def _selection_stage(
        self,
        endpoint: CoordinatorEndpoint,
        state: GlobalState,
        rid: int,
        ids: dict[int, str],
    ) -> tuple[GlobalState, set[int]]:
        """Collect the institutions' noised scores (until all answered or the stage timeout),
        make the strategy's choice from them and send it to those that scored.

        Returns the state with the choice and the client ids that did not score (they take no
        part in the round). Raises :class:`TooFewSurvivors` when fewer than the threshold
        scored; malformed scores are refused with a log line and count as none.
        """
        assert isinstance(self.strategy, SelectionStage)
        by_name = {name: cid for cid, name in ids.items()}
        waiting, scores = set(ids), {}
        deadline = time.monotonic() + self.config.coordinator.stage_timeout_s
        while waiting and time.monotonic() < deadline:
            received = endpoint.recv(max(deadline - time.monotonic(), 0.0))
            if received is None:
                continue
            name, message = received
            cid = by_name.get(name)
            if isinstance(message, LedgerHead):
                self._accept_head(name, message)
            elif cid is None or isinstance(message, Hello):
                continue
            elif isinstance(message, Decline) and (message.round_id, message.client_id) == (
                rid, cid,
            ):  # fmt: skip
                log.info("%s declined round %d: %s", name, rid, message.reason)
                waiting.discard(cid)
            elif isinstance(message, AffinityScores) and (message.round_id, message.client_id) == (
                rid, cid,
            ) and cid in waiting:  # fmt: skip
                waiting.discard(cid)
                try:
                    scores[cid] = self.strategy.decode_scores(state, message.scores)
                except StrategyError as exc:
                    log.warning("refused the scores of %s: %s", name, exc)
            else:
                log.warning("ignored %s from %s during the selection stage",
                            type(message).__name__, name)  # fmt: skip
        threshold = self.config.secagg.resolved(len(self.config.institutions))[0]
        if len(scores) < threshold:
            raise TooFewSurvivors(
                f"{len(scores)} institutions sent valid scores, the threshold is {threshold}"
            )
        selected = self.strategy.select(state, scores)
        choice = Assignment(round_id=rid, selection=self.strategy.selection(selected))
        for cid in scores:
            try:
                endpoint.send(ids[cid], choice)
            except TransportError as exc:
                log.warning("could not send the assignment to %s: %s", ids[cid], exc)
        log.info("round %d: selection made from the scores of %s", rid,
                 [ids[c] for c in sorted(scores)])  # fmt: skip
        return selected, set(ids) - set(scores)

    def _ckks_sum(self, inputs: dict[int, EncryptedBatch], included: list[int]) -> EncryptedBatch:
        """The CKKS channel summed over exactly the clients the masked sum included."""
        assert self.ckks_context is not None
        aggregator = CkksAggregator(self.ckks_context)
        for cid in included:
            aggregator.add(inputs[cid])
        return aggregator.sum()

    def _encrypted_update(
        self,
        state: GlobalState,
        encrypted: EncryptedBatch | None,
        mask_sum: np.ndarray,
        ckks_sum: EncryptedBatch | None,
    ) -> EncryptedBatch:
        """The next encrypted global state: ``factors * sum(w * delta) + state``, the public
        factors from the masked weight sums (FedAvg: ``bound / sum(w)``; per expert: ``bound`` over
        the expert's weight sum, 0 for an expert that is not updated).

        Before any round completed the state is the public initial adapters in plaintext.
        """
        assert self.evaluator is not None and ckks_sum is not None
        factors = self._updates.encrypted_update_factors(state, {"mask": mask_sum})
        base = encrypted
        if base is None:
            base = [t.detach().cpu().double().numpy() for t in state.adapters.values()]
        return self.evaluator.scale_and_add(ckks_sum, factors, base)

    @property
    def _updates(self) -> EncryptedUpdates:
        """The strategy as one that handles CKKS deltas (checked at construction)."""
        assert isinstance(self.strategy, EncryptedUpdates)
        return self.strategy

    def _accept_head(self, name: str, head: msgspec.Struct) -> None:
        """Keep ``name``'s ledger head if it is its own, validly signed, and provably extends
        the last one kept (:meth:`RunStore.save_head`); log and go on otherwise."""
        assert isinstance(head, LedgerHead)
        key = self.identity_by_name.get(name)
        if head.institution != name or key is None or not head_signature_ok(head, key):
            log.warning("refused a ledger head from %s: not validly signed by it", name)
            return
        try:
            self.store.save_head(head)
        except HeadRefused as exc:
            log.warning("refused a ledger head from %s at %d entries: %s", name, head.entries, exc)
        except HeadFileError as exc:
            log.error("refused a ledger head from %s: the kept heads do not read: %s", name, exc)

    def _routing_relay(
        self,
        layout: SubmissionLayout,
        mask_sum: np.ndarray,
        ckks_sum: EncryptedBatch | None,
    ) -> RoutingRelay:
        """What to relay as last round's routing: the ciphertexts of the CKKS sum that hold
        it (a window, not the whole channel), or the decoded masked floats."""
        if ROUTING not in layout:  # the strategy releases no routing statistics
            return RoutingRelay()
        routing = layout[ROUTING]
        if routing.channel == "ckks":
            assert ckks_sum is not None and self.ckks_context is not None
            offset = 0
            for seg in layout.segments:
                if seg is routing:
                    break
                offset += seg.length if seg.channel == "ckks" else 0
            slots = context_params(self.ckks_context).slot_count
            return RoutingRelay(encrypted=ckks_sum.window(offset, offset + routing.length, slots))
        routing = layout.unpack({"mask": mask_sum}, partial=True)["routing"]
        return RoutingRelay(plain=np.asarray(routing, dtype="<f8").tobytes())


def _state_bytes(state: GlobalState) -> bytes:
    """The global adapters as safetensors bytes (what institutions load; never pickle)."""
    return save({k: v.detach().cpu().contiguous() for k, v in state.adapters.items()})
