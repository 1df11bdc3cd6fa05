"""The institution process: connect, train each round, release only through secure aggregation.

:class:`Institution` follows the federation round protocol (``clients.contract.messages``): on
:class:`~clients.contract.messages.RoundStart` it loads the broadcast global state, checks its
privacy budget (declining the round when the release would exceed it), trains one round through the
configured strategy's learner (:mod:`clients.strategies.base`: the MoE-LoRA adapters under a sum
strategy of ``clients.contract.keys.CLIENT_STRATEGIES``, or FedAMoLE's or DDOME's own adapters),
packs the submission and runs the client side of SecAgg+ on the "mask" channel (plus the CKKS
channel, if any, sent just before the masked input). Evaluations run through the learner too (FedMoE
scores its sub-MoE, DDOME its chosen experts).

What a round releases is the learner's to say: the adapter update (DP-SGD) always; the routing
statistics (Gaussian mechanism, :mod:`clients.training.routing_release`) under the MoE-LoRA
strategies; FedAMoLE's expert keys. All of them are charged to the injected
:class:`~clients.runtime.ledger.PrivacyLedger` before the masked input leaves, and the ledger's
signed head goes to the coordinator first. A learner with a selection stage
(:class:`~clients.strategies.base.SelectsExperts`, FedAMoLE) first charges and sends its noised
scores (:class:`~clients.contract.messages.AffinityScores`) and trains once the coordinator's
:class:`~clients.contract.messages.Assignment` arrives. Per-expert weights, counts and scores
inside the sum are post-processing of these releases and public broadcasts, except DDOME's expert
counts (docs/fedamole-ddome.md, "Known limits"). Metrics are computed on private data and stay
local: one JSON line per event in ``run_dir/institutions/<name>/metrics.jsonl``.

Client ids are indices into ``[[institutions]]`` (:func:`clients.contract.keys.client_id`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dp_accounting
import msgspec
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy
from safetensors.torch import load as load_safetensors

from clients.contract.config import FederationConfig
from clients.contract.durable import atomic_write
from clients.contract.extras import ExtrasError, decode_extras
from clients.contract.framing import TransportError
from clients.contract.keys import (
    ROSTER_FILE,
    identity_keys,
    load_ckks_key_holder,
    load_institution_keys,
    load_roster,
)
from clients.contract.layout import (
    CHANNEL_BOUND,
    ROUTING,
    GlobalState,
    StrategyError,
    SubmissionLayout,
)
from clients.contract.messages import (
    AffinityScores,
    Assignment,
    CkksInput,
    Decline,
    Hello,
    RoundEnd,
    RoundStart,
    Shutdown,
)
from clients.contract.routing import RoutingStats
from clients.runtime.ledger import PrivacyLedger
from clients.runtime.transport import InstitutionEndpoint
from clients.strategies.base import LocalRound, SelectsExperts
from clients.strategies.registry import learner_for
from clients.training.trainer import Metrics
from privacy import DPTrainingFacts, Release, ReleaseRefused
from privacy.errors import UserError
from secagg.ckks import EncryptedBatch
from secagg.client import SecAggClient
from secagg.errors import SecAggError
from secagg.messages import KeyRoster, MaskedInput, RelayedShares, SurvivorSetRequest, UnmaskRequest

log = logging.getLogger(__name__)


HELLO_INTERVAL_S = 2.0
"""An institution that heard nothing for this long says Hello again, so a restarted coordinator
(which lost its routes, maybe mid-round) can reach it."""


POLL_S = 0.25


SECAGG_MESSAGES = (KeyRoster, RelayedShares, SurvivorSetRequest, UnmaskRequest)


METRICS_FILE = "metrics.jsonl"


MEMORY_FILE = "strategy-memory.safetensors"
"""The client strategy's memory between rounds (safetensors; it never leaves the institution)."""


class InstitutionError(UserError, RuntimeError):
    """The institution cannot start as its run directory stands (the message says what to do)."""


@dataclass
class _Round:
    """What an institution keeps about the round it is in."""

    start: RoundStart
    started: float = field(default_factory=time.monotonic)
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
        self.dp = config.dp_config(name).calibrated(
            sample_rate=self.sample_rate,
            total_steps=planned_rounds * train.local_steps,
            also=[
                dp_accounting.SelfComposedDpEvent(event, planned_rounds)
                for event in self.learner.per_round_events()
            ],
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
        if self.memory_path.exists():
            try:
                self.learner.restore(load_numpy(self.memory_path.read_bytes()))
            except (SafetensorError, StrategyError, OSError) as exc:
                raise InstitutionError(
                    f"{self.memory_path}: the strategy's memory cannot be restored ({exc}); "
                    "delete the file to let the strategy start afresh"
                ) from None
            log.info("%s: restored the strategy's memory from %s", name, self.memory_path)
        self._round: _Round | None = None
        self._endpoint: InstitutionEndpoint | None = None
        self._last_state: GlobalState | None = None
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
        endpoint = InstitutionEndpoint(
            cfg.connect_address(self.name),
            self.keys.curve_secret,
            self.keys.curve_public,
            self.roster.coordinator.curve_public.encode(),
            cfg.coordinator.max_message_bytes,
        )
        self._endpoint = endpoint
        try:
            self._send(Hello())
            self._record("initial", None, self._state(None), validation=True, test=True)
            last_heard = time.monotonic()
            while stop is None or not stop.is_set():
                message = endpoint.recv(POLL_S)
                if message is None:
                    if time.monotonic() - last_heard >= HELLO_INTERVAL_S:
                        self._send(Hello())
                        last_heard = time.monotonic()
                    continue
                last_heard = time.monotonic()
                if isinstance(message, Shutdown):
                    log.info(
                        "%s: coordinator shut the federation down: %s", self.name, message.reason
                    )
                    self._record("final", None, self._final_state(message), validation=False,
                                 test=True)  # fmt: skip
                    return 0
                self._dispatch(message)
            log.info("%s: stopped", self.name)
            return 0
        finally:
            self._endpoint = None
            endpoint.close()

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, RoundStart):
            self._on_round_start(message)
        elif isinstance(message, Assignment):
            self._on_assignment(message)
        elif isinstance(message, RoundEnd):
            self._on_round_end(message)
        elif isinstance(message, SECAGG_MESSAGES):
            self._on_secagg(message)
        else:
            log.warning("%s: ignored an unexpected %s", self.name, type(message).__name__)

    def _send(self, message: msgspec.Struct) -> None:
        """Send, counting bytes for this round's metrics; transport errors are logged."""
        assert self._endpoint is not None
        try:
            self._endpoint.send(message)
        except TransportError as exc:
            log.warning("%s: could not send %s: %s", self.name, type(message).__name__, exc)
            return
        if self._round is not None:
            self._round.bytes_sent += len(msgspec.msgpack.encode(message))

    # ------------------------------------------------------------------------------ a round

    def _on_round_start(self, start: RoundStart) -> None:
        if self._round is not None:
            log.warning(
                "%s: abandoning unfinished round %d for round %d",
                self.name, self._round.round_id, start.params.round_id,
            )  # fmt: skip
        self._round = current = _Round(start)
        fed_round = start.federation_round
        log.info("%s: round %d (id %d) started", self.name, fed_round, current.round_id)
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
        planned = DPTrainingFacts(
            noise_multiplier=self.dp.require_noise_multiplier(),
            sample_rate=self.sample_rate,
            steps=self.config.training.local_steps,
            max_grad_norm=self.dp.max_grad_norm,
            delta=self.ledger.delta,
        )
        try:
            selects = isinstance(self.learner, SelectsExperts) and self.learner.wants_scores(state)
            releases = self._releases(current, state, planned)
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
        """The selection stage: charge the scores (write-ahead), send the ledger head, then
        the noised scores; training waits for the coordinator's :class:`Assignment`."""
        assert isinstance(self.learner, SelectsExperts)

        def charge(release: Release) -> None:
            self.ledger.charge([release])
            self._send(self.ledger.head())

        fed_round = current.start.federation_round
        t0 = time.monotonic()
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
            current.seconds_training += time.monotonic() - t0
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
        t0 = time.monotonic()
        fed_round, rid = current.start.federation_round, current.round_id
        local = self.learner.train(state, self.dp, fed_round, rid)
        current.seconds_training += time.monotonic() - t0
        current.local = local
        log.info("%s: trained: loss %.3f", self.name, local.metrics["loss"])
        t0 = time.monotonic()
        clipped = {k: v for k, v in local.submission.clipped.items() if v > 0}
        if clipped:
            log.info("%s: clipped fractions %s", self.name, clipped)
        memory = self.learner.memory()
        if memory:  # kept before anything is sent, so a restart goes on from this round
            atomic_write(self.memory_path, save_numpy(memory), mode=0o600)
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
        current.client = SecAggClient(params, client_id, mask, self.keys.identity, self.identities)
        advertisement = current.client.advertise()
        current.seconds_crypto += time.monotonic() - t0
        self._send(advertisement)

    def _load_global(self, plain: bytes, encrypted: EncryptedBatch | None) -> None:
        """Load broadcast adapters (safetensors bytes, or the CKKS-encrypted state) if any."""
        if encrypted is not None:
            t0 = time.monotonic()
            arrays = self.ckks.decrypt(encrypted)
            if self._round is not None:
                self._round.seconds_crypto += time.monotonic() - t0
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
            t0 = time.monotonic()
            decrypted = self.ckks.decrypt(start.routing_encrypted)
            if self._round is not None:
                self._round.seconds_crypto += time.monotonic() - t0
            vector = routing_from_channel(layout, decrypted)
        else:
            return GlobalState(state.adapters, state.routing, extras)
        old = state.routing
        routing = RoutingStats.from_vector(
            np.maximum(vector, 0.0), old.layer_names, old.num_experts, old.top_k
        )
        return GlobalState(adapters=state.adapters, routing=routing, extras=extras)

    def _decline(self, reason: str) -> None:
        current = self._round
        assert current is not None
        current.declined = reason
        current.client = None
        self._send(
            Decline(round_id=current.round_id, client_id=current.start.client_id, reason=reason)
        )

    def _on_secagg(self, message: Any) -> None:
        current = self._round
        if current is None or current.client is None or message.round_id != current.round_id:
            log.info(
                "%s: ignored %s for round %d (not in it)",
                self.name, type(message).__name__, message.round_id,
            )  # fmt: skip
            return
        t0 = time.monotonic()
        try:
            reply = current.client.handle(message)
        except SecAggError as exc:
            log.warning("%s: round %d abandoned: %s", self.name, current.round_id, exc)
            current.client = None
            return
        finally:
            current.seconds_crypto += time.monotonic() - t0
        if isinstance(reply, MaskedInput) and not self._release(current):
            return
        self._send(reply)

    def _releases(
        self, current: _Round, state: GlobalState, facts: DPTrainingFacts
    ) -> list[Release]:
        """What this round releases with the masked input (the learner says: the adapter
        update, and e.g. the routing statistics)."""
        fed_round, rid = current.start.federation_round, current.round_id
        return self.learner.releases(state, facts, fed_round, rid)

    def _release(self, current: _Round) -> bool:
        """Charge the round's releases (write-ahead), send the signed ledger head, then the
        CKKS part; False if refused."""
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
        self._send(self.ledger.head())
        log.info("%s: charged the release: epsilon spent %.3f", self.name, self.ledger.spent())
        if current.ckks is not None:
            t0 = time.monotonic()
            batch = self.ckks.encrypt([current.ckks])
            current.seconds_crypto += time.monotonic() - t0
            self._send(
                CkksInput(round_id=current.round_id, client_id=current.start.client_id, batch=batch)
            )
        return True

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
        """Evaluate (inside the strategy's session for ``state``) and append one metrics line
        (local only: it is computed on private data)."""
        line: dict[str, Any] = {"event": event, "institution": self.name, "time": time.time()}
        if current is not None:
            train = current.local.metrics if current.local is not None else None
            wall = time.monotonic() - current.started
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
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
        shown = line.get("validation") or line.get("test")
        log.info(
            "%s: %s%s: %s perplexity %.2f, epsilon spent %.3f",
            self.name, event, f" {line['round']}" if "round" in line else "",
            "validation" if "validation" in line else "test",
            shown["perplexity"], line["epsilon_spent"],
        )  # fmt: skip


def _metrics(metrics: Metrics | None) -> dict[str, float] | None:
    return None if metrics is None else asdict(metrics)


def adapters_from_arrays(
    template: Mapping[str, torch.Tensor], arrays: Sequence[np.ndarray]
) -> dict[str, torch.Tensor]:
    """Decrypted global state (one array per adapter tensor, state order) as named tensors."""
    if len(arrays) != len(template):
        raise ValueError(
            f"the encrypted global state holds {len(arrays)} arrays, the model has "
            f"{len(template)} adapter tensors"
        )
    out: dict[str, torch.Tensor] = {}
    for (name, current), array in zip(template.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(
                f"encrypted global state: {name} has shape {tuple(array.shape)}, the model's "
                f"is {tuple(current.shape)}"
            )
        out[name] = torch.from_numpy(np.ascontiguousarray(array)).to(current.dtype)
    return out


def routing_from_channel(layout: SubmissionLayout, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The routing sum from a decrypted CKKS relay (``layout.pack`` scaling).

    The relay is a window of the channel's sum, ``((k,), (routing,))`` (see
    :meth:`secagg.ckks.EncryptedBatch.window`), or the whole channel as one array.
    """
    routing = layout[ROUTING]
    if len(arrays) == 2 and arrays[1].size == routing.length:
        return np.ravel(arrays[1]) / CHANNEL_BOUND * routing.bound
    values = np.concatenate([np.ravel(a) for a in arrays])
    channel = routing.channel
    if values.size != layout.length(channel):
        raise ValueError(
            f"decrypted routing has {values.size} values; expected a window of the "
            f"{routing.length} routing values or the {layout.length(channel)} of the "
            f"{channel!r} channel"
        )
    offset = 0
    for seg in layout.segments:
        if seg is routing:
            break
        if seg.channel == channel:
            offset += seg.length
    return values[offset : offset + routing.length] / CHANNEL_BOUND * routing.bound
