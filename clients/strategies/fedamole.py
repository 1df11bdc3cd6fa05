"""FedAMoLE under secure aggregation, client side: held experts, reverse selection, submissions.

A round (``coordinator.strategies.fedamole`` is the other half):

1. Embedding. The state broadcasts the averaged expert keys k̄ (from the last round's secure
   sum) and the assignment that round used. With the broadcast adapters and the experts it
   held, the client embeds the first ``affinity_blocks`` blocks of its auxiliary split,
   t = mean over blocks of clip(mean_tokens W_tp x, C_t) per module. It releases t [M, r]
   with Gaussian noise (:meth:`FedAMoLEConfig.embedding_sensitivity`, charged to the ledger
   first; logged as ``affinity-scores``) in the clear. Round 0 has no keys yet: no release,
   the assignment is drawn from a public seed.
2. The coordinator scores the noised embedding against the public averaged keys,
   s[m, e] = clip(k̄[m, e], C_k) . t[m] / sqrt(r) (:func:`score_embedding`), and solves the
   expert-to-client assignment from the scores. Releasing t rather than the scores costs
   sqrt(E) less noise per score at the same epsilon (docs/fedamole-ddome.md).
3. Training. The client trains the shared expert, the token projections and its assigned
   experts with DP-SGD, then computes each held expert's key (mean LoRA-A output over the same
   auxiliary blocks, per-block clipped to C_k), DP-noises the keys (charged) and submits, in one
   secure sum: ``w`` and ``w * delta`` for every adapter tensor (zeros for experts it does not
   hold), per-expert ``w`` and holder count, and the keys. The coordinator forms only ratios.

The paper's mechanisms (``../shared/STRATEGIES.md``), one line each:

- Domain LoRA experts plus a shared expert per module, shared token projection: as in the paper
  (expert count, rank and alpha from ``[model.moe]``).
- Per-token routing, key k_e = A_e x against query W_tp x over held experts, top-2: as in the paper.
- Switch-style load-balance loss: as in the paper (``[model.moe].load_balance_coef``).
- Data embedding t_c and per-expert keys on an auxiliary split: adapted for privacy: per-block
  clipped means over ``affinity_blocks`` validation blocks, Gaussian-noised and charged.
- Keys averaged over holders: adapted for privacy: inside the masked secure sum, noised keys.
- P = softmax over clients of k̄ . t_c / sqrt(r): adapted for privacy: the coordinator computes it
  from the noised embedding (post-processing), not from un-noised scores.
- Integer program, each expert exactly 2 clients, 2-8 experts per client: as in the paper
  (exact ``milp``; ``clients_per_expert``, ``min_experts``, ``max_experts``).
- Random round-0 assignment: as in the paper, from a public seed anyone can redraw.
- W_tp averaged over all clients, each expert over its holders: adapted for privacy: ratios of
  one secure sum of weighted, clipped DP-SGD deltas.

Client ids are the public indices 0..num_clients-1 of the federation.

:class:`FedAMoLELearner` is what drives those steps (a :class:`~clients.strategies.base.Learner`
with a selection stage, :class:`~clients.strategies.base.SelectsExperts`): its auxiliary split
is the institution's validation split, and whoever drives the round charges the embedding
before it is drawn, and the DP-SGD update with the keys before the masked input leaves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from functools import cached_property

import dp_accounting
import msgspec
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from clients.contract.config import FedAMoLESection
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
from clients.models.fedamole_lora import AMoLEConfig
from clients.models.fedamole_lora import amole_layers
from clients.models.fedamole_lora import amole_state
from clients.models.fedamole_lora import attach_amole
from clients.models.fedamole_lora import load_amole_state
from clients.models.fedamole_lora import per_sample_loss
from clients.models.fedamole_lora import projections
from clients.models.fedamole_lora import set_held
from clients.strategies.base import ChargeRelease
from clients.strategies.base import LocalRound
from clients.strategies.base import OwnAdapters
from clients.strategies.base import OwnAdaptersLearner
from clients.strategies.base import RecordedCharges
from clients.strategies.base import checked_min_weight
from clients.strategies.base import checked_weight
from clients.strategies.base import device_of
from clients.strategies.experts import EXPERT_WEIGHT
from clients.strategies.fedavg import checked_section
from clients.strategies.fedavg import fedavg_config
from clients.training.release import Charge
from clients.training.release import gaussian_release
from clients.training.trainer import Metrics
from clients.training.trainer import StepSettings
from clients.training.trainer import evaluate
from clients.training.trainer import train_steps
from privacy import AFFINITY_SCORES
from privacy import EXPERT_KEYS
from privacy import DPConfig
from privacy import DPTrainingFacts
from privacy import GaussianMechanism
from privacy import Release

KEY_SUM = "key_sum"


KEY_COUNT = "key_count"


KEYS = "keys"


KEY_COUNTS = "key_counts"


ASSIGNMENT = "assignment"
"""Names of the state's public parts in :attr:`clients.contract.layout.GlobalState.extras`."""


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StrategyError(f"fedamole.{name} must be an int >= 1, got {value!r}")


def check_assignment_feasible(
    num_experts: int, num_clients: int, clients_per_expert: int, min_experts: int, max_experts: int
) -> None:
    """Refuse (naming the knob) settings no 0/1 assignment can meet: every expert exactly
    ``clients_per_expert`` clients, every client between ``min_experts`` and ``max_experts``."""
    slots = num_experts * clients_per_expert
    if clients_per_expert > num_clients:
        raise StrategyError(
            f"fedamole.clients_per_expert={clients_per_expert} exceeds the {num_clients} "
            "clients available to hold each expert"
        )
    if min_experts > max_experts or max_experts > num_experts:
        raise StrategyError(
            f"fedamole.min_experts={min_experts} <= max_experts={max_experts} <= num_experts="
            f"{num_experts} must hold"
        )
    if slots < num_clients * min_experts:
        raise StrategyError(
            f"fedamole.min_experts={min_experts}: {num_experts} experts x clients_per_expert="
            f"{clients_per_expert} = {slots} slots cannot give each of {num_clients} clients "
            f"{min_experts} experts; lower min_experts or raise clients_per_expert"
        )
    if slots > num_clients * max_experts:
        raise StrategyError(
            f"fedamole.max_experts={max_experts}: {slots} slots ({num_experts} experts x "
            f"clients_per_expert={clients_per_expert}) do not fit {num_clients} clients holding "
            f"at most {max_experts}; raise max_experts or lower clients_per_expert"
        )


@dataclass(frozen=True)
class FedAMoLEConfig:
    """Public parameters every party shares: the adapter, the number of clients, the smallest
    public institution weight ``min_weight`` (FedAvg's), and ``params``, the
    ``[aggregation.fedamole]`` section (fields and ranges declared once in
    :class:`~clients.contract.config.FedAMoLESection`).

    Assignment: each expert goes to exactly ``clients_per_expert`` clients, each client holds
    ``min_experts``..``max_experts`` per module (paper: 2, 2..8). Reverse selection: embeddings
    over the first ``affinity_blocks`` auxiliary blocks, per-block L2 clip ``embedding_clip``
    (C_t) for token projections and ``key_clip`` (C_k) for keys; Gaussian noise of
    ``score_noise_multiplier`` (scores) and ``key_noise_multiplier`` (keys) times the
    sensitivity. Updates: the institution's public weight (declared in the config), deltas
    clipped to ``±delta_bound``. ``public_seed`` draws the round-0 assignment (anyone can
    redraw it).
    """

    adapter: AMoLEConfig
    num_clients: int
    min_weight: float = 1.0
    params: FedAMoLESection = field(default_factory=FedAMoLESection)

    def __post_init__(self) -> None:
        _positive_int("num_clients", self.num_clients)
        checked_min_weight(self.min_weight)
        object.__setattr__(self, "params", checked_section(self.params))
        p = self.params
        if p.min_experts < self.adapter.top_k:
            raise StrategyError(
                f"fedamole.min_experts={p.min_experts} is below the router's top_k="
                f"{self.adapter.top_k}: a client could not route"
            )
        check_assignment_feasible(
            self.adapter.num_experts,
            self.num_clients,
            p.clients_per_expert,
            p.min_experts,
            p.max_experts,
        )

    def embedding_sensitivity(self, num_modules: int) -> float:
        """L2 sensitivity of one client's released data embedding t [M, r] to adding or
        removing a record: a record changes at most one of the ``n = affinity_blocks`` blocks
        behind t (it may push another block out), so each t[m] moves by at most 2 C_t / n, and
        the M modules together by sqrt(M) 2 C_t / n."""
        move = 2 * self.params.embedding_clip / self.params.affinity_blocks
        return math.sqrt(num_modules) * move

    def score_sensitivity(self, num_modules: int) -> float:
        """L2 sensitivity the score matrix [M, E] would have if released instead of the
        embedding (for the comparison in docs/fedamole-ddome.md): each score row is
        K̃_m t[m] / sqrt(r) with every key clipped to C_k, so ||K̃_m|| <= sqrt(E) C_k, a
        sqrt(E) C_k / sqrt(r) multiple of :meth:`embedding_sensitivity`."""
        a = self.adapter
        scale = math.sqrt(a.num_experts) * self.params.key_clip / math.sqrt(a.rank)
        return scale * self.embedding_sensitivity(num_modules)

    def key_sensitivity(self, held_keys: int) -> float:
        """L2 sensitivity of one client's ``held_keys`` key vectors (per-block clipped to C_k,
        averaged over ``affinity_blocks``): 2 C_k / n each, as for the scores."""
        return math.sqrt(held_keys) * 2 * self.params.key_clip / self.params.affinity_blocks

    def layout(self, state: FedAMoLEState) -> SubmissionLayout:
        """``weight``, ``delta:<name>`` per adapter tensor (state order), then per (module,
        expert) ``expert_weight``, ``key_count`` and the r-vector ``key_sum``; all masked."""
        m, e, r = state.keys.shape
        return SubmissionLayout(
            (
                Segment(WEIGHT, 1, "mask", 1.0),
                *(
                    Segment(DELTA_PREFIX + n, int(t.numel()), "mask", self.params.delta_bound)
                    for n, t in state.adapters.items()
                ),
                Segment(EXPERT_WEIGHT, m * e, "mask", 1.0),
                Segment(KEY_COUNT, m * e, "mask", 1.0),
                Segment(KEY_SUM, m * e * r, "mask", self.params.key_clip),
            )
        )


@dataclass(frozen=True)
class FedAMoLEState:
    """What the coordinator broadcasts: adapters, averaged keys and the round's assignment.

    ``keys[m, e]``: mean key of expert e of module m over the clients that held it when it was
    last held (``key_counts[m, e]`` of them; 0 means no key yet). ``assignment[m, e, c]``: client c
    holds expert e of module m this round (after
    :func:`coordinator.strategies.fedamole.assign`) or held it last round
    (after ``aggregate``). The assignment is DP post-processing of noised scores (or a public
    draw), so every client may see all of it.
    """

    adapters: dict[str, torch.Tensor]
    modules: tuple[str, ...]
    keys: np.ndarray
    key_counts: np.ndarray
    assignment: np.ndarray
    round: int = 0

    @cached_property
    def expert_of(self) -> dict[str, tuple[int, int]]:
        """Adapter tensor name -> (module, expert) for domain-expert tensors."""
        roles: dict[str, tuple[int, int]] = {}
        for name in self.adapters:
            for m, module in enumerate(self.modules):
                for part in ("experts_A", "experts_B"):
                    prefix = f"{module}.{part}."
                    if name.startswith(prefix):
                        roles[name] = (m, int(name[len(prefix) :].split(".")[0]))
        return roles

    def held(self, client: int) -> dict[str, tuple[int, ...]]:
        """Per module, the experts ``client`` holds in the assignment (all if it holds none:
        a client absent from the last assignment embeds with every expert)."""
        column = self.assignment[:, :, client]
        every = tuple(range(self.keys.shape[1]))
        return {
            mod: tuple(int(e) for e in np.flatnonzero(column[m])) or every
            for m, mod in enumerate(self.modules)
        }

    def with_assignment(self, assignment: np.ndarray) -> FedAMoLEState:
        if assignment.shape != self.assignment.shape:
            raise StrategyError(f"assignment shape {assignment.shape} != {self.assignment.shape}")
        return replace(self, assignment=assignment.astype(bool))

    @property
    def has_keys(self) -> bool:
        """Whether some expert has a key: from then on every round starts with the scores."""
        return bool(np.any(self.key_counts > 0))

    def to_global(self) -> GlobalState:
        """The state as the federation processes broadcast and checkpoint it: the adapters,
        and keys, key counts and assignment (0/1) as extras; no routing statistics."""
        experts = self.key_counts.shape[1]
        base = GlobalState.initial(self.adapters, (), experts)
        extras = {
            KEYS: self.keys.astype(np.float64),
            KEY_COUNTS: self.key_counts.astype(np.float64),
            ASSIGNMENT: self.assignment.astype(np.float64),
        }
        return GlobalState(base.adapters, base.routing, extras)


def amole_modules(adapters: Mapping[str, object]) -> tuple[str, ...]:
    """The FedAMoLE layers named by an adapter state, in state order."""
    suffix = ".token_proj.weight"
    return tuple(name[: -len(suffix)] for name in adapters if name.endswith(suffix))


def state_shapes(config: FedAMoLEConfig, num_modules: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the extras :meth:`FedAMoLEState.to_global` writes."""
    m, e, r = num_modules, config.adapter.num_experts, config.adapter.rank
    return {KEYS: (m, e, r), KEY_COUNTS: (m, e), ASSIGNMENT: (m, e, config.num_clients)}


def state_from_global(config: FedAMoLEConfig, state: GlobalState, round: int = 0) -> FedAMoLEState:
    """Inverse of :meth:`FedAMoLEState.to_global` (no extras: no keys, nobody assigned).

    Raises :class:`StrategyError` when the extras do not have the shapes of
    :func:`state_shapes` or the assignment is not 0/1.
    """
    modules = amole_modules(state.adapters)
    shapes = state_shapes(config, len(modules))
    extras = state.extras or {name: np.zeros(shape) for name, shape in shapes.items()}
    if set(extras) != set(shapes) or any(
        tuple(np.shape(extras[n])) != shape for n, shape in shapes.items()
    ):
        raise StrategyError(
            f"FedAMoLE's extras must be {shapes}, got "
            f"{ {n: tuple(np.shape(v)) for n, v in extras.items()} }"
        )
    assignment = np.asarray(extras[ASSIGNMENT])
    if not np.all((assignment == 0) | (assignment == 1)):
        raise StrategyError("FedAMoLE's assignment must hold only 0 and 1")
    return FedAMoLEState(
        adapters=dict(state.adapters),
        modules=modules,
        keys=np.asarray(extras[KEYS], dtype=np.float64),
        key_counts=np.asarray(extras[KEY_COUNTS], dtype=np.float64),
        assignment=assignment.astype(bool),
        round=round,
    )


def encode_assignment(assignment: np.ndarray) -> bytes:
    """A 0/1 assignment [M, E, C] as bytes (one byte per entry, C order)."""
    return np.ascontiguousarray(assignment, dtype=np.uint8).tobytes()


def decode_assignment(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`encode_assignment`; :class:`StrategyError` unless exactly ``shape``'s
    entries, each 0 or 1."""
    array = np.frombuffer(bytes(data), dtype=np.uint8)
    if array.size != math.prod(shape):
        raise StrategyError(f"an assignment of shape {shape} needs {math.prod(shape)} bytes, "
                            f"got {array.size}")  # fmt: skip
    if np.any(array > 1):
        raise StrategyError("an assignment holds only 0 and 1")
    return array.reshape(shape).astype(bool)


def decode_embedding(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A noised data embedding from little-endian float64 bytes; :class:`StrategyError` unless
    exactly ``shape``'s entries, all finite."""
    if len(data) != 8 * math.prod(shape):
        raise StrategyError(f"an embedding of shape {shape} needs {8 * math.prod(shape)} "
                            f"bytes, got {len(data)}")  # fmt: skip
    embedding = np.frombuffer(bytes(data), dtype="<f8").reshape(shape).astype(np.float64)
    if not np.all(np.isfinite(embedding)):
        raise StrategyError("an embedding must be finite")
    return embedding


def score_embedding(
    config: FedAMoLEConfig, state: FedAMoLEState, embedding: np.ndarray
) -> np.ndarray:
    """Affinity scores [M, E]: s[m, e] = clip(k̄[m, e], C_k) . t[m] / sqrt(r) of a (noised)
    embedding t [M, r] against the broadcast averaged keys (post-processing of the release)."""
    keys = _clip_rows(torch.from_numpy(state.keys), config.params.key_clip).numpy()
    return np.einsum("mer,mr->me", keys, embedding) / math.sqrt(config.adapter.rank)


@dataclass(frozen=True)
class FedAMoLEUpdate:
    """One client's local round: ``delta`` (state order; zeros for non-held experts), its DP
    keys [M, E, r] (zeros where not held), the held mask [M, E] and the DP-SGD facts."""

    delta: dict[str, torch.Tensor]
    keys: np.ndarray
    held: np.ndarray
    facts: DPTrainingFacts | None
    steps: int
    mean_loss: float


def _clip_rows(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale each last-dimension vector to L2 norm at most ``bound``."""
    norms = x.norm(dim=-1, keepdim=True)
    return x * torch.clamp(bound / torch.clamp(norms, min=1e-12), max=1.0)


@dataclass
class FedAMoLEClient:
    """Client side of FedAMoLE for client ``client`` training ``model`` (FedAMoLE adapters)."""

    config: FedAMoLEConfig
    client: int
    model: nn.Module

    def _aux(self, aux: torch.Tensor) -> torch.Tensor:
        n = self.config.params.affinity_blocks
        if aux.dim() != 2 or aux.shape[0] < n:
            raise StrategyError(
                f"the auxiliary split needs >= fedamole.affinity_blocks={n} blocks, "
                f"got shape {tuple(aux.shape)}"
            )
        return aux[:n]

    def _embed(
        self, state: FedAMoLEState, aux: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        load_amole_state(self.model, state.adapters)
        set_held(self.model, state.held(self.client))
        return projections(self.model, self._aux(aux))

    def data_embedding(
        self,
        state: FedAMoLEState,
        aux: torch.Tensor,
        charge: Charge,
        generator: torch.Generator | None = None,
    ) -> np.ndarray | None:
        """The noised data embedding t [M, r] (per module, the mean over the auxiliary blocks
        of each block's clipped mean token projection), charged first; None in round 0. The
        coordinator scores it against the public averaged keys (:func:`score_embedding`)."""
        if not state.has_keys:
            return None
        cfg = self.config
        embedded = self._embed(state, aux)
        t = np.stack(
            [
                _clip_rows(embedded[module][0].double(), cfg.params.embedding_clip).mean(0).numpy()
                for module in state.modules
            ]
        )
        return gaussian_release(
            t,
            sensitivity=cfg.embedding_sensitivity(len(state.modules)),
            noise_multiplier=cfg.params.score_noise_multiplier,
            charge=charge,
            what=f"fedamole data embedding (for the affinity scores), round {state.round}",
            generator=generator,
        )

    def train(
        self,
        state: FedAMoLEState,
        train_blocks: torch.Tensor,
        aux: torch.Tensor,
        settings: StepSettings,
    ) -> FedAMoLEUpdate:
        """Train the held experts and shared parts; return the delta and the (not yet DP) keys."""
        held = state.held(self.client)
        if not state.assignment[:, :, self.client].any():
            raise StrategyError(f"client {self.client} holds no expert in this round's assignment")
        load_amole_state(self.model, state.adapters)
        set_held(self.model, held)
        run = train_steps(
            self.model,
            TensorDataset(train_blocks),
            lambda batch: per_sample_loss(self.model, batch[0]),
            settings,
        )
        after = amole_state(self.model)
        delta = {n: (after[n] - state.adapters[n].to(after[n].device)).cpu() for n in after}
        embedded = projections(self.model, self._aux(aux))
        keys = np.zeros(state.keys.shape)
        mask = np.zeros(state.key_counts.shape, dtype=bool)
        for m, module in enumerate(state.modules):
            _, k = embedded[module]  # [n, h, r] per-block means of the held experts' keys
            keys[m, list(held[module])] = (
                _clip_rows(k.double(), self.config.params.key_clip).mean(0).numpy()
            )
            mask[m, list(held[module])] = True
        return FedAMoLEUpdate(delta, keys, mask, run.facts, run.steps, run.mean_loss)

    def layout(self, state: FedAMoLEState) -> SubmissionLayout:
        return self.config.layout(state)

    def submit(
        self,
        state: FedAMoLEState,
        update: FedAMoLEUpdate,
        weight: float,
        charge: Charge,
        generator: torch.Generator | None = None,
    ) -> Submission:
        """The round's secure-sum segments. Charges the keys' Gaussian release before anything
        is returned; the DP-SGD update is the caller's to charge, from ``update.facts``."""
        cfg = self.config
        if list(update.delta) != list(state.adapters):
            raise LayoutError("the update's delta does not follow the state's adapter order")
        held = int(update.held.sum())
        noised = gaussian_release(
            update.keys[update.held],
            sensitivity=cfg.key_sensitivity(held),
            noise_multiplier=cfg.params.key_noise_multiplier,
            charge=charge,
            what=f"fedamole expert keys (inside the secure sum), round {state.round}",
            generator=generator,
        )
        keys = np.zeros(update.keys.shape)
        keys[update.held] = noised
        w = checked_weight(weight)
        deltas = {DELTA_PREFIX + n: d.double().numpy() for n, d in update.delta.items()}
        raw = {
            WEIGHT: np.array([w]),
            **deltas,
            EXPERT_WEIGHT: w * update.held.ravel(),
            KEY_COUNT: update.held.ravel().astype(float),
            KEY_SUM: keys.ravel(),
        }
        layout = self.layout(state)
        clipped = layout.clipped_fraction(raw)
        bound = cfg.params.delta_bound
        values = {
            **raw,
            **{n: w * np.clip(d, -bound, bound) for n, d in deltas.items()},
            KEY_SUM: np.clip(keys, -cfg.params.key_clip, cfg.params.key_clip).ravel(),
        }
        return Submission(values=values, clipped=clipped)


def fedamole_config(config: FederationConfig) -> FedAMoLEConfig:
    """FedAMoLE's parameters from ``[aggregation.fedamole]``, its adapter's shape from
    ``[model.moe]`` (``max_experts`` capped at ``num_experts``); client ids are the indices of
    ``[[institutions]]``."""
    moe, section = config.model.moe, config.aggregation.fedamole
    adapter = AMoLEConfig.from_moe(moe, load_balance_coef=moe.load_balance_coef)
    return FedAMoLEConfig(
        adapter=adapter,
        num_clients=len(config.institutions),
        min_weight=fedavg_config(config).min_weight,
        params=msgspec.structs.replace(
            section, max_experts=min(section.max_experts, moe.num_experts)
        ),
    )


SCORE_BASIS = (
    "the data embedding the coordinator scores against the public keys; unit of privacy: one "
    "validation block among the affinity_blocks it averages; each module's mean token "
    "projection (blocks clipped to embedding_clip) moves by at most 2 embedding_clip / "
    "affinity_blocks: L2 sensitivity sqrt(modules) 2 embedding_clip / affinity_blocks"
)


KEY_BASIS = (
    "unit of privacy: one validation block among the affinity_blocks each held expert's key "
    "averages (blocks clipped to key_clip): each key moves by at most 2 key_clip / "
    "affinity_blocks, so sqrt(held keys) times that in L2"
)


class FedAMoLELearner(OwnAdaptersLearner):
    """Institution ``name``'s FedAMoLE adapters and data; its client id is its index."""

    def __init__(self, config: FederationConfig, name: str) -> None:
        super().__init__(config, name, FEDAMOLE_ADAPTERS)
        self.fedamole = fedamole_config(config)
        self.client_id = client_id(config, name)
        self.client = FedAMoLEClient(self.fedamole, self.client_id, self.model)
        self.num_modules = len(amole_layers(self.model))

    def _state(self, state: GlobalState, federation_round: int = 0) -> FedAMoLEState:
        return state_from_global(self.fedamole, state, federation_round)

    def _score_mechanism(self) -> GaussianMechanism:
        cfg = self.fedamole
        return GaussianMechanism(
            cfg.params.score_noise_multiplier,
            cfg.embedding_sensitivity(self.num_modules),
            AFFINITY_SCORES,
        )

    def _key_mechanism(self, held_keys: int) -> GaussianMechanism:
        cfg = self.fedamole
        return GaussianMechanism(
            cfg.params.key_noise_multiplier, cfg.key_sensitivity(held_keys), EXPERT_KEYS
        )

    def per_round_events(self) -> list[dp_accounting.DpEvent]:
        return fedamole_round_releases(self.config)

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
        self, state: GlobalState, federation_round: int, round_id: int, charge: ChargeRelease
    ) -> np.ndarray:
        release = self.score_release(state, federation_round, round_id)

        def charge_release(event: dp_accounting.DpEvent, what: str) -> None:
            if event != release.event:
                raise StrategyError(f"the scores' release {event} is not the planned one")
            charge(release)

        fedamole_state = self._state(state, federation_round)
        embedding = self.client.data_embedding(
            fedamole_state, self.data["validation"], charge_release
        )
        if embedding is None:
            raise StrategyError("no expert has a key yet: this round has no selection stage")
        return embedding

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
        settings = StepSettings.of(self.config.training, dp)
        fedamole_state = self._state(state, federation_round)
        update = self.client.train(
            fedamole_state, self.data["train"], self.data["validation"], settings
        )
        # The runtime charges the DP-SGD update and the keys (recorded here) together.
        recorded = RecordedCharges()
        submission = self.client.submit(fedamole_state, update, self.weight, recorded)
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


FEDAMOLE_ADAPTERS = OwnAdapters(
    lambda config: fedamole_config(config).adapter, attach_amole, amole_state, load_amole_state
)
"""FedAMoLE's adapters, shaped by ``[model.moe]``."""


def fedamole_round_releases(config: FederationConfig) -> list[dp_accounting.DpEvent]:
    """Scores (none in the first round: planned for every round, an upper bound) and keys."""
    params = config.aggregation.fedamole
    return [
        dp_accounting.GaussianDpEvent(params.score_noise_multiplier),
        dp_accounting.GaussianDpEvent(params.key_noise_multiplier),
    ]


CLIENT_HALF = FEDAMOLE_ADAPTERS.client_half(FedAMoLELearner, fedamole_round_releases)
