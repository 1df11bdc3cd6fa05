"""FedAMoLE as the institution runtime drives it (:class:`clients.learner.Learner` with a
selection stage, :class:`clients.learner.SelectsExperts`).

Once experts have keys, a round starts with the reverse selection: the institution scores every
expert against the broadcast keys on its first ``affinity_blocks`` validation blocks, the
runtime charges the scores' Gaussian release, and the noised scores go to the coordinator,
which answers with the assignment. The institution then trains the shared parts and its
assigned experts with DP-SGD and submits, in one secure sum, its update and its DP-noised
expert keys (:class:`clients.fedamole.FedAMoLEClient`); the DP-SGD update and the keys are
charged together before the masked input leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import dp_accounting
import numpy as np
import torch

from clients.config import FederationConfig
from clients.fedamole import (
    ASSIGNMENT,
    FedAMoLEClient,
    FedAMoLEState,
    decode_assignment,
    state_from_global,
    state_shapes,
)
from clients.fedamole_lora import amole_layers, amole_state, load_amole_state, set_held
from clients.learner import LocalRound, RecordedCharges, Stateless, device_of
from clients.setup import build_strategy_model, client_id, fedamole_config, institution_data
from clients.strategy import GlobalState, StrategyError, SubmissionLayout
from clients.trainer import Metrics, evaluate
from privacy import (
    AFFINITY_SCORES,
    EXPERT_KEYS,
    DPConfig,
    DPTrainingFacts,
    GaussianMechanism,
    Release,
)

SCORE_BASIS = (
    "unit of privacy: one validation block among the affinity_blocks the embedding averages; "
    "each module's mean token projection (blocks clipped to embedding_clip) moves by at most "
    "2 embedding_clip / affinity_blocks, and each score row is the clipped keys (key_clip each) "
    "times it over sqrt(rank): L2 sensitivity sqrt(modules * experts) key_clip 2 "
    "embedding_clip / (affinity_blocks sqrt(rank))"
)
KEY_BASIS = (
    "unit of privacy: one validation block among the affinity_blocks each held expert's key "
    "averages (blocks clipped to key_clip): each key moves by at most 2 key_clip / "
    "affinity_blocks, so sqrt(held keys) times that in L2"
)


class FedAMoLELearner(Stateless):
    """Institution ``name``'s FedAMoLE adapters and data; its client id is its index."""

    def __init__(self, config: FederationConfig, name: str) -> None:
        self.config = config
        self.fedamole = fedamole_config(config)
        self.model, self.tokenizer = build_strategy_model(config)
        self.data: dict[str, torch.Tensor] = institution_data(config, name, self.tokenizer)
        self.client_id = client_id(config, name)
        self.client = FedAMoLEClient(self.fedamole, self.client_id, self.model)
        self.num_modules = len(amole_layers(self.model))

    def _state(self, state: GlobalState, federation_round: int = 0) -> FedAMoLEState:
        return state_from_global(self.fedamole, state, federation_round)

    def _score_mechanism(self) -> GaussianMechanism:
        cfg = self.fedamole
        return GaussianMechanism(
            cfg.score_noise_multiplier, cfg.score_sensitivity(self.num_modules), AFFINITY_SCORES
        )

    def _key_mechanism(self, held_keys: int) -> GaussianMechanism:
        cfg = self.fedamole
        return GaussianMechanism(
            cfg.key_noise_multiplier, cfg.key_sensitivity(held_keys), EXPERT_KEYS
        )

    def per_round_events(self) -> list[dp_accounting.DpEvent]:
        """Scores (none in the first round: planned for every round, an upper bound) and keys."""
        return [self._score_mechanism().dp_event(), self._key_mechanism(1).dp_event()]

    def adapters(self) -> dict[str, torch.Tensor]:
        return amole_state(self.model)

    def load_adapters(self, adapters: Mapping[str, torch.Tensor]) -> None:
        load_amole_state(self.model, adapters)

    def local_state(self) -> GlobalState:
        return GlobalState.initial(self.adapters(), (), self.fedamole.adapter.num_experts)

    def extras_shapes(self, state: GlobalState) -> dict[str, tuple[int, ...]]:
        return state_shapes(self.fedamole, self.num_modules)

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.fedamole.layout(self._state(state))

    def _held_keys(self, state: FedAMoLEState) -> int:
        return sum(len(experts) for experts in state.held(self.client_id).values())

    def releases(
        self, state: GlobalState, facts: DPTrainingFacts, federation_round: int, round_id: int
    ) -> list[Release]:
        keys = self._key_mechanism(self._held_keys(self._state(state)))
        return [
            facts.release(federation_round, round_id),
            keys.release(federation_round, round_id, KEY_BASIS),
        ]

    # ------------------------------------------------------------------ the selection stage

    def wants_scores(self, state: GlobalState) -> bool:
        return self._state(state).has_keys

    def score_release(self, state: GlobalState, federation_round: int, round_id: int) -> Release:
        return self._score_mechanism().release(federation_round, round_id, SCORE_BASIS)

    def scores(
        self,
        state: GlobalState,
        federation_round: int,
        round_id: int,
        charge: Callable[[Release], object],
    ) -> np.ndarray:
        release = self.score_release(state, federation_round, round_id)

        def charge_release(event: dp_accounting.DpEvent, what: str) -> None:
            if event != release.event:
                raise StrategyError(f"the scores' release {event} is not the planned one")
            charge(release)

        fedamole_state = self._state(state, federation_round)
        scores = self.client.affinity_scores(
            fedamole_state, self.data["validation"], charge_release
        )
        if scores is None:
            raise StrategyError("no expert has a key yet: this round has no selection stage")
        return scores

    def with_selection(self, state: GlobalState, selection: bytes) -> GlobalState:
        shape = state_shapes(self.fedamole, self.num_modules)[ASSIGNMENT]
        assignment = decode_assignment(selection, shape)
        if not assignment[:, :, self.client_id].any():
            raise StrategyError("the assignment gives this institution no expert")
        return self._state(state).with_assignment(assignment).to_global()

    # ------------------------------------------------------------------ training

    def train(
        self, state: GlobalState, dp: DPConfig, federation_round: int, round_id: int
    ) -> LocalRound:
        train = self.config.training
        fedamole_state = self._state(state, federation_round)
        update = self.client.train(
            fedamole_state, self.data["train"], self.data["validation"], dp=dp,
            steps=train.local_steps, batch_size=train.batch_size, lr=train.lr,
            device=device_of(self.config),
        )  # fmt: skip
        # The runtime charges the DP-SGD update and the keys (recorded here) together.
        recorded = RecordedCharges()
        submission = self.client.submit(fedamole_state, update, len(self.data["train"]), recorded)
        keys = self._key_mechanism(int(update.held.sum()))
        if [event for event, _ in recorded.events] != [keys.dp_event()]:
            raise StrategyError(f"FedAMoLE reported releases {recorded.events}, expected keys")
        releases = (
            [] if update.facts is None
            else [
                update.facts.release(federation_round, round_id),
                keys.release(federation_round, round_id, KEY_BASIS),
            ]
        )  # fmt: skip
        return LocalRound(submission, {"loss": update.mean_loss}, update.facts, releases)

    def evaluate(self, state: GlobalState, split: str) -> Metrics:
        set_held(self.model, self._state(state).held(self.client_id))
        return evaluate(self.model, self.data[split], device=device_of(self.config))
