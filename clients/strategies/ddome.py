"""DDOME under secure aggregation, client side: noised expert choice, joint training, sums.

Every client downloads the gate and ALL experts; which ones it picks is a DP release:

1. It embeds its data once with the frozen common expert (:func:`common_embedding`).
2. Each round it sums the broadcast gate's probabilities over its training blocks, adds
   Gaussian noise (L2 sensitivity :data:`CHOICE_SENSITIVITY` = 1, charged as an
   ``expert-choice`` release before anything that depends on it leaves) and takes the top-K of
   the noised sum (an anchor client, if configured, always takes its anchor expert first and
   also pulls the gate towards it).
3. It trains the gate and those K experts jointly with DP-SGD on the MoE output.
4. It submits, in one secure sum, the FULL vector: ``w`` and ``w * delta`` for the gate and for
   every expert (exact zeros for experts it did not train), and per expert ``w`` and a 0/1
   count. The coordinator learns how many clients trained each expert, never which; an expert
   moves only when at least ``min_count`` (>= 2) trained it.

An institution that never trained picks its experts zero-shot (:func:`zero_shot`): top-K by
the gate's mean probability on its embeddings, and per sample the best of those, no labels
(nothing leaves it: no noise).

The paper's mechanisms (``../shared/STRATEGIES.md``), one line each:

- Frozen common expert embeds the data once: as in the paper (the frozen base model's hidden state).
- M whole-model experts: adapted for privacy: LoRA experts on one shared base, so DP-SGD and the
  secure sum cover every expert tensor.
- Gate scores all experts, aggregated over samples, top-K per client: adapted for privacy: the
  aggregate is the gate-probability sum, released with Gaussian noise (sensitivity 1, charged).
- Joint gate-expert training on the MoE output: as in the paper, with DP-SGD.
- Anchor clients train their expert and pull the gate towards it: as in the paper.
- Server FedAvg of the gate over all clients, of each expert over its trainers: adapted for
  privacy: one full-vector secure sum (zeros for untrained experts), ratios only, an expert moves
  only with >= ``min_count`` trainers.
- Zero-shot top-K for an unseen client, best expert per sample: as in the paper (local, no release).

:class:`DDOMELearner` is what drives those steps (a :class:`~clients.strategies.base.Learner`):
it embeds every split once; its releases are the noised choice and the DP-SGD update.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

import dp_accounting
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from clients.contract.config import DDOMESection
from clients.contract.config import FederationConfig
from clients.contract.keys import client_id
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import WEIGHT
from clients.contract.layout import GlobalState
from clients.contract.layout import LayoutError
from clients.contract.layout import Segment
from clients.contract.layout import StrategyError
from clients.contract.layout import Submission
from clients.contract.layout import SubmissionLayout
from clients.models.ddome_lora import DDOMEAdapterConfig
from clients.models.ddome_lora import attach_ddome
from clients.models.ddome_lora import chosen_gates
from clients.models.ddome_lora import common_embedding
from clients.models.ddome_lora import ddome_state
from clients.models.ddome_lora import expert_of
from clients.models.ddome_lora import gate_logits
from clients.models.ddome_lora import load_ddome_state
from clients.models.ddome_lora import mixture_logits
from clients.models.ddome_lora import per_sample_loss
from clients.models.ddome_lora import set_trainable
from clients.models.ddome_lora import top_experts
from clients.models.padding import token_loss
from clients.strategies.base import SPLITS
from clients.strategies.base import LocalRound
from clients.strategies.base import OwnAdapters
from clients.strategies.base import OwnAdaptersLearner
from clients.strategies.base import RecordedCharges
from clients.strategies.base import checked_min_weight
from clients.strategies.base import checked_weight
from clients.strategies.base import device_of
from clients.strategies.experts import EXPERT_COUNT
from clients.strategies.experts import EXPERT_WEIGHT
from clients.strategies.fedavg import checked_section
from clients.strategies.fedavg import fedavg_config
from clients.training.release import Charge
from clients.training.release import gaussian_release
from clients.training.trainer import Metrics
from clients.training.trainer import StepSettings
from clients.training.trainer import evaluate_with
from clients.training.trainer import select_device
from clients.training.trainer import train_steps
from privacy import EXPERT_CHOICE
from privacy import DPConfig
from privacy import DPTrainingFacts
from privacy import GaussianMechanism
from privacy import Release


@dataclass(frozen=True)
class DDOMEConfig:
    """Public parameters: the adapter, the smallest public institution weight ``min_weight``
    (FedAvg's, see :class:`~clients.strategies.fedavg.FedAvgConfig`), and ``params``,
    the ``[aggregation.ddome]`` section (fields and ranges declared once in
    :class:`~clients.contract.config.DDOMESection`: ``delta_bound`` clips the deltas,
    ``min_count`` is how many clients must train an expert in a round for it to move,
    ``anchor_coef`` weighs an anchor client's gate loss)."""

    adapter: DDOMEAdapterConfig
    min_weight: float = 1.0
    params: DDOMESection = field(default_factory=DDOMESection)

    def __post_init__(self) -> None:
        checked_min_weight(self.min_weight)
        object.__setattr__(self, "params", checked_section(self.params))

    def layout(self, state: DDOMEState) -> SubmissionLayout:
        """``weight``, ``delta:<name>`` for the gate and every expert, then per expert
        ``expert_weight`` and ``expert_count``; all masked."""
        experts = self.adapter.num_experts
        return SubmissionLayout(
            (
                Segment(WEIGHT, 1, "mask", 1.0),
                *(
                    Segment(DELTA_PREFIX + n, int(t.numel()), "mask", self.params.delta_bound)
                    for n, t in state.adapters.items()
                ),
                Segment(EXPERT_WEIGHT, experts, "mask", 1.0),
                Segment(EXPERT_COUNT, experts, "mask", 1.0),
            )
        )


EXPERT_COUNTS = "expert_counts"
"""Name of the last round's per-expert counts in
:attr:`clients.contract.layout.GlobalState.extras`."""


@dataclass(frozen=True)
class DDOMEState:
    """The broadcast: gate and all experts, and how many clients trained each expert last round."""

    adapters: dict[str, torch.Tensor]
    expert_counts: np.ndarray
    round: int = 0

    def to_global(self) -> GlobalState:
        """The state as the federation processes broadcast and checkpoint it: the adapters and
        the counts as an extra; no routing statistics."""
        base = GlobalState.initial(self.adapters, (), len(self.expert_counts))
        extras = {EXPERT_COUNTS: np.asarray(self.expert_counts, dtype=np.float64)}
        return GlobalState(base.adapters, base.routing, extras)

    @classmethod
    def from_global(cls, state: GlobalState, num_experts: int, round: int = 0) -> DDOMEState:
        """Inverse of :meth:`to_global` (no extras: no expert trained yet); raises
        :class:`StrategyError` for counts of another shape."""
        counts = state.extras.get(EXPERT_COUNTS, np.zeros(num_experts))
        if set(state.extras) - {EXPERT_COUNTS} or np.shape(counts) != (num_experts,):
            raise StrategyError(
                f"DDOME's extras must be {{{EXPERT_COUNTS!r}: ({num_experts},)}}, got "
                f"{ {n: np.shape(v) for n, v in state.extras.items()} }"
            )
        return cls(dict(state.adapters), np.asarray(counts, dtype=np.float64), round)


CHOICE_SENSITIVITY = 1.0
"""L2 sensitivity of the released sum over training blocks of the gate's probability vectors
under adding or removing one block: the sum gains or loses one probability vector p, and
||p||_2 <= ||p||_1 = 1. (The sum, not the mean: the mean's divisor n is private and changes with
the record; the ranking, all the choice uses, is the same for both.)"""

CHOICE_BASIS = (
    "sum over training blocks of the gate's softmax probabilities: adding or removing one block "
    "adds or removes one probability vector, L2 norm <= L1 norm = 1"
)


@torch.no_grad()
def gate_probability_sum(model: nn.Module, embeddings: torch.Tensor) -> np.ndarray:
    """Sum over rows of ``embeddings`` of the gate's probability vector (float64, [E])."""
    device = next(model.parameters()).device
    logits = gate_logits(model, embeddings.to(device)).double()
    return torch.softmax(logits, -1).sum(0).cpu().numpy()


def choice_mechanism(params: DDOMESection) -> GaussianMechanism:
    """The expert choice's release: Gaussian, sensitivity :data:`CHOICE_SENSITIVITY`."""
    return GaussianMechanism(params.choice_noise_multiplier, CHOICE_SENSITIVITY, EXPERT_CHOICE)


@dataclass(frozen=True)
class DDOMEUpdate:
    """One client's round: ``delta`` (state order; zeros for untrained experts), the chosen
    experts (stays on the client except inside the secure sum) and the DP-SGD facts."""

    delta: dict[str, torch.Tensor]
    chosen: tuple[int, ...]
    facts: DPTrainingFacts | None
    steps: int
    mean_loss: float


@dataclass
class DDOMEClient:
    """Client side of DDOME on ``model`` (DDOME adapters); ``anchor``: this client's anchor
    expert, or None for an ordinary client."""

    config: DDOMEConfig
    model: nn.Module
    anchor: int | None = None

    def __post_init__(self) -> None:
        experts = self.config.adapter.num_experts
        if self.anchor is not None and not 0 <= self.anchor < experts:
            raise StrategyError(f"anchor expert {self.anchor} is not in [0, {experts})")

    def _ranked(self, totals: np.ndarray) -> tuple[int, ...]:
        """The top-K experts by ``totals`` (best first; the anchor first, if any)."""
        k = self.config.adapter.top_k
        ranked = [int(m) for m in np.argsort(-np.asarray(totals), kind="stable")]
        if self.anchor is None:
            return tuple(ranked[:k])
        return (self.anchor, *[m for m in ranked if m != self.anchor][: k - 1])

    def local_choice(self, state: DDOMEState, embeddings: torch.Tensor) -> tuple[int, ...]:
        """The top-K experts by the un-noised gate probabilities: for local evaluation only,
        never for anything that leaves the institution."""
        load_ddome_state(self.model, state.adapters)
        return self._ranked(gate_probability_sum(self.model, embeddings))

    def noised_totals(
        self,
        state: DDOMEState,
        embeddings: torch.Tensor,
        charge: Charge,
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """The DP-noised sum of the broadcast gate's probabilities over the training
        ``embeddings`` (sensitivity :data:`CHOICE_SENSITIVITY`), charged through ``charge``
        before the noise is drawn."""
        load_ddome_state(self.model, state.adapters)
        return gaussian_release(
            gate_probability_sum(self.model, embeddings),
            sensitivity=CHOICE_SENSITIVITY,
            noise_multiplier=self.config.params.choice_noise_multiplier,
            charge=charge,
            what=f"ddome expert choice (noised gate-probability sum), round {state.round}",
            generator=generator,
        )

    def choose(
        self,
        state: DDOMEState,
        embeddings: torch.Tensor,
        charge: Charge,
        generator: torch.Generator | None = None,
    ) -> tuple[int, ...]:
        """This round's top-K experts (anchor first, if any) by :meth:`noised_totals`: the
        choice, the zero pattern of the update and the counts are its post-processing."""
        return self._ranked(self.noised_totals(state, embeddings, charge, generator))

    def train(
        self,
        state: DDOMEState,
        blocks: torch.Tensor,
        embeddings: torch.Tensor,
        settings: StepSettings,
        charge: Charge,
        generator: torch.Generator | None = None,
    ) -> DDOMEUpdate:
        """Choose the experts (a charged release), then train the gate and them jointly
        (``embeddings`` from :func:`common_embedding` of the same ``blocks``)."""
        if embeddings.shape[0] != blocks.shape[0]:
            raise StrategyError("embeddings must have one row per training block")
        chosen = self.choose(state, embeddings, charge, generator)
        set_trainable(self.model, chosen)
        coef = self.config.params.anchor_coef
        run = train_steps(
            self.model,
            TensorDataset(blocks, embeddings),
            lambda b: per_sample_loss(self.model, b[0], b[1], chosen, self.anchor, coef),
            settings,
        )
        after = ddome_state(self.model)
        delta = {n: (after[n] - state.adapters[n].to(after[n].device)).cpu() for n in after}
        return DDOMEUpdate(delta, chosen, run.facts, run.steps, run.mean_loss)

    def layout(self, state: DDOMEState) -> SubmissionLayout:
        return self.config.layout(state)

    def submit(self, state: DDOMEState, update: DDOMEUpdate, weight: float) -> Submission:
        """The full-vector secure-sum segments, weighted by the institution's public ``weight``.
        They release the DP-SGD update alone, which the caller charges from ``update.facts``
        before the sum leaves."""
        cfg = self.config
        if list(update.delta) != list(state.adapters):
            raise LayoutError("the update's delta does not follow the state's adapter order")
        w = checked_weight(weight)
        trained = np.zeros(cfg.adapter.num_experts)
        trained[list(update.chosen)] = 1.0
        deltas = {}
        for name, d in update.delta.items():
            m = expert_of(name)
            # An untrained expert's delta is exactly zero already (frozen): make it certain.
            keep = m is None or trained[m] == 1.0
            deltas[DELTA_PREFIX + name] = d.double().numpy() * float(keep)
        raw = {WEIGHT: np.array([w]), **deltas, EXPERT_WEIGHT: w * trained, EXPERT_COUNT: trained}
        clipped = self.layout(state).clipped_fraction(raw)
        bound = cfg.params.delta_bound
        values = {**raw, **{n: w * np.clip(d, -bound, bound) for n, d in deltas.items()}}
        return Submission(values=values, clipped=clipped)


@dataclass(frozen=True)
class ZeroShotChoice:
    """An unseen institution's experts (best first) and, per sample, the one it uses."""

    experts: tuple[int, ...]
    per_sample: torch.Tensor


@torch.no_grad()
def zero_shot(model: nn.Module, embeddings: torch.Tensor, k: int) -> ZeroShotChoice:
    """Top-``k`` experts by the gate's mean probability on unlabelled ``embeddings``; per sample
    the highest-scoring of them (the paper's zero-shot rule)."""
    experts = top_experts(model, embeddings, k)
    logits = gate_logits(model, embeddings.to(next(model.parameters()).device)).cpu()
    best = logits[:, list(experts)].argmax(-1)
    return ZeroShotChoice(experts, torch.tensor(experts)[best])


@torch.no_grad()
def zero_shot_loss(
    model: nn.Module, blocks: torch.Tensor, choice: ZeroShotChoice, batch_size: int = 8
) -> float:
    """Mean next-token cross-entropy when each block uses only its zero-shot expert."""
    experts = model.ddome_config.num_experts
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i : i + batch_size].to(device)
        gates = torch.nn.functional.one_hot(choice.per_sample[i : i + batch_size], experts)
        logits = mixture_logits(model, ids, gates.to(device=device, dtype=torch.float32))
        ce, real = token_loss(logits, ids)
        total += float(ce.sum())
        tokens += int(real.sum())
    return total / tokens


def evaluate_choice(
    model: nn.Module,
    blocks: torch.Tensor,
    embeddings: torch.Tensor,
    chosen: tuple[int, ...],
    batch_size: int = 8,
) -> Metrics:
    """Next-token metrics of the MoE output as trained: per block, the gate's softmax over the
    institution's ``chosen`` experts (``embeddings``: :func:`common_embedding` of ``blocks``)."""
    device = next(model.parameters()).device

    def score(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        ids = blocks[rows].to(device)
        gates = chosen_gates(gate_logits(model, embeddings[rows].to(device)), chosen)
        logits = mixture_logits(model, ids, gates)
        ce, _ = token_loss(logits, ids)
        return ce, logits[:, :-1].argmax(-1) == ids[:, 1:]

    return evaluate_with(model, blocks, score, batch_size)


def ddome_config(config: FederationConfig) -> DDOMEConfig:
    """DDOME's parameters from ``[aggregation.ddome]``, its experts' shape from ``[model.moe]``."""
    moe, section = config.model.moe, config.aggregation.ddome
    adapter = DDOMEAdapterConfig.from_moe(moe, gate_hidden=section.gate_hidden)
    return DDOMEConfig(adapter, fedavg_config(config).min_weight, section)


def ddome_anchor(config: FederationConfig, name: str) -> int | None:
    """Institution ``name``'s DDOME anchor expert: its index among the first ``anchors``."""
    index = client_id(config, name)
    return index if index < config.aggregation.ddome.anchors else None


class DDOMELearner(OwnAdaptersLearner):
    """Institution ``name``'s DDOME gate and experts, its data and their common embeddings."""

    def __init__(self, config: FederationConfig, name: str) -> None:
        super().__init__(config, name, DDOME_ADAPTERS)
        self.ddome = ddome_config(config)
        self.client = DDOMEClient(self.ddome, self.model, ddome_anchor(config, name))
        self.model.to(select_device(device_of(config)))
        self.embeddings = {s: common_embedding(self.model, self.data[s]) for s in SPLITS}

    def _state(self, state: GlobalState, federation_round: int = 0) -> DDOMEState:
        return DDOMEState.from_global(state, self.ddome.adapter.num_experts, federation_round)

    def per_round_events(self) -> list[dp_accounting.DpEvent]:
        return ddome_round_releases(self.config)

    def extras_shapes(self, state: GlobalState) -> dict[str, tuple[int, ...]]:
        return {EXPERT_COUNTS: (self.ddome.adapter.num_experts,)}

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.ddome.layout(self._state(state))

    def releases(
        self, state: GlobalState, facts: DPTrainingFacts, federation_round: int, round_id: int
    ) -> list[Release]:
        choice = choice_mechanism(self.ddome.params)
        return [
            choice.release(federation_round, round_id, CHOICE_BASIS),
            facts.release(federation_round, round_id),
        ]

    def train(
        self, state: GlobalState, dp: DPConfig, federation_round: int, round_id: int
    ) -> LocalRound:
        settings = StepSettings.of(self.config.training, dp)
        ddome_state_ = self._state(state, federation_round)
        recorded = RecordedCharges()
        update = self.client.train(
            ddome_state_, self.data["train"], self.embeddings["train"], settings, recorded
        )
        planned = choice_mechanism(self.ddome.params).dp_event()
        if [event for event, _ in recorded.events] != [planned]:
            raise StrategyError(f"DDOME reported releases {recorded.events}, expected the choice")
        submission = self.client.submit(ddome_state_, update, self.weight)
        releases = (
            [] if update.facts is None
            else self.releases(state, update.facts, federation_round, round_id)
        )  # fmt: skip
        return LocalRound(submission, {"loss": update.mean_loss}, update.facts, releases)

    def evaluate(self, state: GlobalState, split: str) -> Metrics:
        chosen = self.client.local_choice(self._state(state), self.embeddings["train"])
        return evaluate_choice(self.model, self.data[split], self.embeddings[split], chosen)


def ddome_round_releases(config: FederationConfig) -> list[dp_accounting.DpEvent]:
    """What a DDOME round releases besides DP-SGD: the noised expert choice."""
    return [choice_mechanism(config.aggregation.ddome).dp_event()]


DDOME_ADAPTERS = OwnAdapters(
    lambda config: ddome_config(config).adapter, attach_ddome, ddome_state, load_ddome_state
)
"""DDOME's adapters, shaped by ``[model.moe]``."""

CLIENT_HALF = DDOME_ADAPTERS.client_half(DDOMELearner, ddome_round_releases)
