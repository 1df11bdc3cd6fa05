"""DDOME as the institution runtime drives it (:class:`clients.learner.Learner`).

The institution embeds every split once with the frozen common expert, then each round
chooses its experts from the broadcast gate, trains the gate and those experts with DP-SGD and
submits the full-length vector (:class:`clients.ddome.DDOMEClient`). The DP-SGD update is its
only release: the per-expert 0/1 counts are post-processing inside the same secure sum.
"""

from __future__ import annotations

from collections.abc import Mapping

import dp_accounting
import torch

from clients.config import FederationConfig
from clients.ddome import EXPERT_COUNTS, DDOMEClient, DDOMEState, evaluate_choice
from clients.ddome_lora import common_embedding, ddome_state, load_ddome_state
from clients.learner import SPLITS, LocalRound, Stateless, device_of
from clients.setup import build_strategy_model, ddome_anchor, ddome_config, institution_data
from clients.strategy import GlobalState, SubmissionLayout
from clients.trainer import Metrics, select_device
from privacy import DPConfig, DPTrainingFacts, Release


class DDOMELearner(Stateless):
    """Institution ``name``'s DDOME gate and experts, its data and their common embeddings."""

    def __init__(self, config: FederationConfig, name: str) -> None:
        self.config = config
        self.ddome = ddome_config(config)
        self.model, self.tokenizer = build_strategy_model(config)
        self.data: dict[str, torch.Tensor] = institution_data(config, name, self.tokenizer)
        self.client = DDOMEClient(self.ddome, self.model, ddome_anchor(config, name))
        self.model.to(select_device(device_of(config)))
        self.embeddings = {s: common_embedding(self.model, self.data[s]) for s in SPLITS}

    def _state(self, state: GlobalState, federation_round: int = 0) -> DDOMEState:
        return DDOMEState.from_global(state, self.ddome.adapter.num_experts, federation_round)

    def per_round_events(self) -> list[dp_accounting.DpEvent]:
        return []

    def adapters(self) -> dict[str, torch.Tensor]:
        return ddome_state(self.model)

    def load_adapters(self, adapters: Mapping[str, torch.Tensor]) -> None:
        load_ddome_state(self.model, adapters)

    def local_state(self) -> GlobalState:
        return GlobalState.initial(self.adapters(), (), self.ddome.adapter.num_experts)

    def extras_shapes(self, state: GlobalState) -> dict[str, tuple[int, ...]]:
        return {EXPERT_COUNTS: (self.ddome.adapter.num_experts,)}

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.ddome.layout(self._state(state))

    def releases(
        self, state: GlobalState, facts: DPTrainingFacts, federation_round: int, round_id: int
    ) -> list[Release]:
        return [facts.release(federation_round, round_id)]

    def train(
        self, state: GlobalState, dp: DPConfig, federation_round: int, round_id: int
    ) -> LocalRound:
        train = self.config.training
        ddome_state_ = self._state(state, federation_round)
        update = self.client.train(
            ddome_state_, self.data["train"], self.embeddings["train"], dp=dp,
            steps=train.local_steps, batch_size=train.batch_size, lr=train.lr,
            device=device_of(self.config),
        )  # fmt: skip
        submission = self.client.submit(ddome_state_, update, len(self.data["train"]))
        releases = (
            [] if update.facts is None
            else self.releases(state, update.facts, federation_round, round_id)
        )  # fmt: skip
        return LocalRound(submission, {"loss": update.mean_loss}, update.facts, releases)

    def evaluate(self, state: GlobalState, split: str) -> Metrics:
        chosen = self.client.choose(self._state(state), self.embeddings["train"])
        return evaluate_choice(self.model, self.data[split], self.embeddings[split], chosen)
