"""FedAMoLE under secure aggregation, coordinator side: the exact assignment and the ratios.

The coordinator sees the clients' DP-noised data embeddings (a charged release; it scores each
against the public averaged keys itself) and the secure sums of their updates, nothing else.
From the scores it forms, per module, P[e, c] = softmax over
clients of s_c[e] and solves the paper's integer program exactly with ``scipy.optimize.milp``:
maximise sum P * X over X in {0, 1}^{E x C} with every expert held by exactly
``clients_per_expert`` clients and every client holding ``min_experts``..``max_experts``.
From the sums: shared parts (token projections, shared expert) move by sum(w delta) / sum(w)
over all clients, each expert by its holders' sum(w delta) / sum(w), keys become
sum(keys) / holder count. An expert nobody held (all its holders dropped) keeps its values.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds
from scipy.optimize import LinearConstraint
from scipy.optimize import milp

from audit.context import ReleaseFacts
from audit.context import StrategyFacts
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import GlobalState
from clients.contract.layout import StrategyError
from clients.contract.layout import SubmissionLayout
from clients.strategies.experts import EXPERT_WEIGHT
from clients.strategies.fedamole import KEY_COUNT
from clients.strategies.fedamole import KEY_SUM
from clients.strategies.fedamole import FedAMoLEConfig
from clients.strategies.fedamole import FedAMoLEState
from clients.strategies.fedamole import amole_modules
from clients.strategies.fedamole import check_assignment_feasible
from clients.strategies.fedamole import decode_embedding
from clients.strategies.fedamole import encode_assignment
from clients.strategies.fedamole import fedamole_config
from clients.strategies.fedamole import score_embedding
from clients.strategies.fedamole import state_from_global
from coordinator.strategies.base import ServerHalf
from coordinator.strategies.base import contributed_weight


def solve_assignment(
    affinity: np.ndarray, clients_per_expert: int, min_experts: int, max_experts: int
) -> np.ndarray:
    """The 0/1 matrix X [E, C] maximising sum(affinity * X) under the assignment constraints."""
    experts, clients = affinity.shape
    check_assignment_feasible(experts, clients, clients_per_expert, min_experts, max_experts)
    n = experts * clients  # variable X[e, c] sits at e * clients + c
    per_expert = np.kron(np.eye(experts), np.ones((1, clients)))
    per_client = np.kron(np.ones((1, experts)), np.eye(clients))
    result = milp(
        -np.asarray(affinity, dtype=np.float64).ravel(),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(per_expert, clients_per_expert, clients_per_expert),
            LinearConstraint(per_client, min_experts, max_experts),
        ],
    )
    if result.status != 0 or result.x is None:
        raise StrategyError(f"the assignment solver failed: {result.message}")
    x = np.round(result.x).reshape(experts, clients).astype(bool)
    rows, cols = x.sum(1), x.sum(0)
    if (
        np.any(rows != clients_per_expert)
        or np.any(cols < min_experts)
        or np.any(cols > max_experts)
    ):
        raise StrategyError("the assignment solver returned a solution that violates a constraint")
    return x


def client_affinity(scores: np.ndarray) -> np.ndarray:
    """P[e, c] = softmax over clients c of the noised scores [E, C] (the paper's matrix)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    return p / p.sum(axis=1, keepdims=True)


def _solve(config: FedAMoLEConfig, affinity: np.ndarray) -> np.ndarray:
    p = config.params
    return solve_assignment(affinity, p.clients_per_expert, p.min_experts, p.max_experts)


def public_state(
    config: FedAMoLEConfig, adapters: Mapping[str, torch.Tensor], modules: Sequence[str]
) -> FedAMoLEState:
    """Round 0: the given adapters, no keys, and the public random assignment.

    The assignment is the exact solution for affinities drawn uniformly from [0, 1) by
    ``numpy.random.default_rng(public_seed)`` (module by module): a public, reproducible
    draw, as the paper's random round-0 assignment (nothing secret comes from this RNG).
    """
    c = config
    m, e, r = len(modules), c.adapter.num_experts, c.adapter.rank
    rng = np.random.default_rng(c.params.public_seed)
    assignment = np.stack([_solve(c, rng.random((e, c.num_clients))) for _ in range(m)])
    return FedAMoLEState(
        adapters={n: t.detach().clone() for n, t in adapters.items()},
        modules=tuple(modules),
        keys=np.zeros((m, e, r)),
        key_counts=np.zeros((m, e)),
        assignment=assignment,
    )


def assign(
    config: FedAMoLEConfig, state: FedAMoLEState, scores: Mapping[int, np.ndarray]
) -> FedAMoLEState:
    """This round's assignment from the clients' noised scores [M, E] (client id -> scores).

    Only clients that sent scores are assigned experts; the others hold none this round.
    """
    clients = sorted(scores)
    if not clients or any(not 0 <= i < config.num_clients for i in clients):
        raise StrategyError(f"scores must come from client ids in [0, {config.num_clients})")
    shape = state.key_counts.shape
    if any(np.shape(scores[i]) != shape for i in clients):
        raise StrategyError(f"every client's scores must have shape {shape}")
    stacked = np.stack([np.asarray(scores[i], dtype=np.float64) for i in clients], axis=-1)
    if not np.all(np.isfinite(stacked)):
        raise StrategyError("scores must be finite")
    assignment = np.zeros(state.assignment.shape, dtype=bool)
    for m in range(shape[0]):
        assignment[m][:, clients] = _solve(config, client_affinity(stacked[m]))
    return state.with_assignment(assignment)


def next_state(
    config: FedAMoLEConfig, state: FedAMoLEState, sums: Mapping[str, np.ndarray]
) -> FedAMoLEState:
    """The next state from the decoded mask-channel sum over the included clients."""
    values = config.layout(state).unpack(sums)
    total = contributed_weight(values, config.min_weight)
    floor = 0.5 * config.min_weight
    shape = state.key_counts.shape
    expert_weight = values[EXPERT_WEIGHT].reshape(shape)
    counts = np.rint(values[KEY_COUNT].reshape(shape))
    adapters: dict[str, torch.Tensor] = {}
    for name, current in state.adapters.items():
        role = state.expert_of.get(name)
        denominator = total if role is None else float(expert_weight[role])
        if denominator < floor:
            adapters[name] = current.detach().clone()
            continue
        step = values[DELTA_PREFIX + name].reshape(tuple(current.shape)) / denominator
        adapters[name] = (current.detach().cpu().double() + torch.from_numpy(step)).to(
            current.dtype
        )
    key_sum = values[KEY_SUM].reshape(state.keys.shape)
    fresh = counts >= 1
    keys = state.keys.copy()
    keys[fresh] = key_sum[fresh] / counts[fresh][:, None]
    key_counts = np.where(fresh, counts, state.key_counts)
    return FedAMoLEState(
        adapters=adapters,
        modules=state.modules,
        keys=keys,
        key_counts=key_counts,
        assignment=state.assignment,
        round=state.round + 1,
    )


@dataclass(frozen=True)
class FedAMoLEStrategy:
    """FedAMoLE's coordinator side over the federation's :class:`GlobalState` (the adapters;
    keys, key counts and assignment as extras), with the selection stage."""

    config: FedAMoLEConfig

    def _state(self, state: GlobalState) -> FedAMoLEState:
        return state_from_global(self.config, state)

    def initial_state(self, state: GlobalState) -> GlobalState:
        """The seeded adapters, no keys, and the public round-0 assignment."""
        return public_state(self.config, state.adapters, amole_modules(state.adapters)).to_global()

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(self._state(state))

    def aggregate(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        return next_state(self.config, self._state(state), sums).to_global()

    def wants_scores(self, state: GlobalState) -> bool:
        return self._state(state).has_keys

    def decode_scores(self, state: GlobalState, data: bytes) -> np.ndarray:
        """The scores [M, E] of an institution's noised data embedding [M, r] (``data``)
        against the averaged keys."""
        st = self._state(state)
        shape = (st.key_counts.shape[0], self.config.adapter.rank)
        return score_embedding(self.config, st, decode_embedding(data, shape))

    def select(self, state: GlobalState, scores: Mapping[int, np.ndarray]) -> GlobalState:
        return assign(self.config, self._state(state), scores).to_global()

    def selection(self, state: GlobalState) -> bytes:
        return encode_assignment(self._state(state).assignment)


SERVER_HALF = ServerHalf(
    build=lambda config: FedAMoLEStrategy(fedamole_config(config)),
    facts=StrategyFacts(
        releases_routing=False,
        extra_releases=(
            ReleaseFacts(
                what="expert keys (mean LoRA-A output of each held expert)",
                mechanism="Gaussian mechanism on per-block clipped means",
                to_whom="masked (SecAgg+) inside the update's sum; the averaged keys go to every "
                "institution",
            ),
            ReleaseFacts(
                what="data embedding (the institution's mean token projection per module, "
                "logged as affinity-scores), from the second round on",
                mechanism="Gaussian mechanism on per-block clipped means",
                to_whom="the coordinator, in the clear (it scores it against the averaged keys "
                "and solves the assignment from the scores)",
            ),
        ),
        coordinator_sees="; each institution's noised data embedding (in the clear), its "
        "affinity scores against the averaged keys and the "
        "expert assignment it solves from them; per expert, how many institutions held it",
    ),
)
"""FedAMoLE's server half, its releases besides the update (own adapters: no routing
statistics) and what its coordinator sees besides the sums."""
