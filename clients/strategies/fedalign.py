"""FedAlign-MoE, client side: routing-consistency weights, a routing regularizer and semantic
alignment of same-index experts, every decision taken on the client against broadcast aggregates.

Per (layer l, expert e) a client submits, inside the round's secure sum:

* ``w * s(l, e) * delta`` for the expert's entries and ``w * s(l, e)`` as its weight, where w is
  the institution's public weight (declared in the config, never its data size) and s the
  **routing consistency** of its routing distribution p_i(l) with the broadcast global one p̄(l)
  (the published ω_i(e) = s_i(e) / Σ_j s_j(e) becomes a ratio of sums at the coordinator);
* zeros and a zero count for an expert whose **alignment score** falls below the threshold
  τ(l, e) = M(l, e) - β·Σ(l, e), where M and Σ are the mean and standard deviation of last round's
  scores, which the coordinator forms from the secure sums of scores and squared scores and
  broadcasts (one aggregation per round, so the threshold lags one round: a named choice);
* its score, squared score and a one (``align_*``), for the next round's threshold.

Named choices where the paper publishes none (all in :class:`FedAlignConfig`):

* consistency s(l, e), per expert, from the top-k routing shares p_i(l, e) and p̄(l, e):
  ``"js"``: 1 - JS(Bern p_i(l, e) ‖ Bern p̄(l, e)) (base 2, in [0, 1]); ``"expert_kl"``:
  exp(-KL(Bern p_i(l, e) ‖ Bern p̄(l, e)) / temperature). Without global routing yet
  (round 0), s = 1.
* alignment score: cosine between this client's update of the expert and the global expert's
  last move (this round's broadcast minus the previous one, remembered by the client); no score
  in the first round a client sees, or when either vector is zero.
* regularizer: ``regularization`` x mean over layers of KL(p_b(l) ‖ p̄(l)), soft against soft:
  p_b(l) the mean softmax router probability over one block's tokens (a per-block term, as
  DP-SGD's per-sample clipping needs), p̄(l) the summed ``gate_sum`` over the summed tokens.

The scores are computed from the DP-SGD update and public broadcasts (post-processing); the
routing statistics are whatever the caller gives (already noised and charged if it must be).

Paper mechanisms (STRATEGIES.md), one line each:

* routing-consistency weights ω_i(e) = s_i(e) / Σ_j s_j(e): as in the paper, per expert; the
  ratio is formed from secure sums of w·s·delta and w·s (adapted for privacy: the coordinator
  sees only sums).
* distribution regularization of the local gate: as in the paper (KL form named above; the
  target is the summed, DP-noised routing statistics, adapted for privacy).
* semantic alignment, threshold τ_e = M(e) - β·Σ(e): adapted for privacy: clients score their own
  update against the public global move instead of sending hidden states for O(N²) server-side
  similarities; M and Σ come from secure sums of scores and squares, so τ lags one round.
* aggregation only from clients at or above τ_e: as in the paper, plus ``min_count`` holders
  (adapted for privacy: an expert is never updated from one institution's delta alone).
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field

import numpy as np
import torch
from torch import nn

from clients.contract.config import FedAlignSection
from clients.contract.config import FederationConfig
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import ROUTING
from clients.contract.layout import WEIGHT
from clients.contract.layout import GlobalState
from clients.contract.layout import Segment
from clients.contract.layout import Submission
from clients.contract.layout import SubmissionLayout
from clients.contract.layout import check_routing_matches
from clients.contract.routing import RoutingStats
from clients.models.moe_lora import router_probabilities
from clients.strategies.base import TrainingPlan
from clients.strategies.base import checked_weight
from clients.strategies.experts import EXPERT_COUNT
from clients.strategies.experts import EXPERT_WEIGHT
from clients.strategies.experts import ExpertPartition
from clients.strategies.experts import expert_segments
from clients.strategies.experts import weighted_deltas
from clients.strategies.fedavg import FedAvgConfig
from clients.strategies.fedavg import checked_section
from clients.strategies.fedavg import extended_config
from clients.strategies.fedavg import moe_lora_half
from clients.training.trainer import LocalTrainingResult

ALIGN_SCORE = "align_score"


ALIGN_SQUARE = "align_square"


ALIGN_N = "align_n"


ALIGN_MEAN = "align_mean"


ALIGN_STD = "align_std"
"""Extras the coordinator broadcasts: per (layer, expert) mean, std and number of last round's
alignment scores (``align_n`` is reused as the extra's name)."""


@dataclass(frozen=True)
class FedAlignConfig(FedAvgConfig):
    """Public parameters of FedAlign-MoE (both sides must hold the same): FedAvg's weights,
    bounds and channels, and ``params``, the ``[aggregation.fedalign]`` section, whose fields
    and ranges are declared once in :class:`~clients.contract.config.FedAlignSection`
    (``consistency``/``temperature``: the form of s, see the module docstring; ``beta``:
    τ = M - β·Σ; ``smoothing``: mixed into every routing distribution).
    """

    params: FedAlignSection = field(default_factory=FedAlignSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "params", checked_section(self.params))

    def layout(self, state: GlobalState) -> SubmissionLayout:
        """The per-expert segments, then the three alignment segments (L * E each, on the mask
        channel: the coordinator reads their sums)."""
        size = state.routing.num_layers * state.routing.num_experts
        base = expert_segments(
            state, self.delta_bound, self.routing_bound, self.delta_channel, self.routing_channel
        )
        align = (Segment(n, size, "mask", 1.0) for n in (ALIGN_SCORE, ALIGN_SQUARE, ALIGN_N))
        return SubmissionLayout((*base, *align))


def distribution(counts: np.ndarray, smoothing: float) -> np.ndarray:
    """Rows of non-negative ``counts`` (L, E) as probabilities, each mixed with ``smoothing``
    of the uniform distribution (so no probability is zero). Negative (noised) counts are 0."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    total = counts.sum(axis=1, keepdims=True)
    experts = counts.shape[1]
    p = np.divide(counts, total, out=np.full_like(counts, 1.0 / experts), where=total > 0)
    return (1.0 - smoothing) * p + smoothing / experts


def consistency_scores(
    local: RoutingStats, global_: RoutingStats, config: FedAlignConfig
) -> np.ndarray:
    """s(l, e) in [0, 1], one per expert (module docstring); 1 where either side has no routed
    tokens. Both sides are top-k routing shares, so like is compared with like."""
    p = distribution(local.counts, config.params.smoothing)
    q = distribution(global_.counts, config.params.smoothing)
    if config.params.consistency == "js":
        scores = 1.0 - np.clip(bernoulli_js(p, q), 0.0, 1.0)
    else:
        kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
        scores = np.exp(-np.maximum(kl, 0.0) / config.params.temperature)
    known = (np.maximum(local.counts, 0).sum(1) > 0) & (np.maximum(global_.counts, 0).sum(1) > 0)
    return np.where(known[:, None], scores, 1.0)


def bernoulli_js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Elementwise Jensen-Shannon divergence (bits, in [0, 1]) of Bern(p) and Bern(q): how
    differently two routings treat one expert (its share versus the rest of the layer)."""

    def entropy(x: np.ndarray) -> np.ndarray:
        return -(x * np.log2(x) + (1 - x) * np.log2(1 - x))

    return entropy(0.5 * (p + q)) - 0.5 * (entropy(p) + entropy(q))


def soft_target(global_: RoutingStats, smoothing: float) -> np.ndarray:
    """The regularizer's target p̄(l): the summed (noised) ``gate_sum`` over the summed tokens,
    the federation's mean softmax router probability, rows renormalised (noise can move their
    sums off 1) and smoothed like the local side."""
    mean = np.maximum(global_.gate_sum, 0.0) / np.maximum(global_.tokens, 1.0)[:, None]
    return distribution(mean, smoothing)


def routing_regularizer(
    probs: list[torch.Tensor], target: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """Per block (first dim), the mean over layers of KL(p_b(l) ‖ target(l)), where p_b(l) is the
    block's mean softmax router probability (soft, like the target), smoothed like it."""
    terms = []
    for layer, layer_probs in enumerate(probs):
        q = target[layer].to(device=layer_probs.device, dtype=layer_probs.dtype)
        p = layer_probs.reshape(layer_probs.shape[0], -1, layer_probs.shape[-1]).mean(1)
        p = (1.0 - smoothing) * p + smoothing / p.shape[-1]
        terms.append((p * (p / q).log()).sum(-1))
    return torch.stack(terms).mean(0)


def alignment_scores(
    partition: ExpertPartition,
    delta: dict[str, np.ndarray],
    global_move: dict[str, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(cosine (L, E), whether each cosine exists) of each expert's update with its global move."""
    shape = (partition.num_layers, partition.num_experts)
    scores, known = np.zeros(shape), np.zeros(shape, dtype=bool)
    if global_move is None:
        return scores, known
    for layer in range(shape[0]):
        for expert in range(shape[1]):
            u = partition.expert_vector(delta, layer, expert)
            g = partition.expert_vector(global_move, layer, expert)
            norm = float(np.linalg.norm(u) * np.linalg.norm(g))
            if norm > 0:
                scores[layer, expert] = float(np.clip(u @ g / norm, -1.0, 1.0))
                known[layer, expert] = True
    return scores, known


def thresholds(state: GlobalState, config: FedAlignConfig) -> np.ndarray | None:
    """τ(l, e) from the broadcast score statistics; -inf where too few scores; None without any."""
    if ALIGN_MEAN not in state.extras:
        return None
    mean, std = state.extras[ALIGN_MEAN], state.extras[ALIGN_STD]
    enough = state.extras[ALIGN_N] >= config.params.min_scorers - 0.5
    return np.where(enough, mean - config.params.beta * std, -np.inf)


class FedAlignClient:
    """Client side of FedAlign-MoE. Remembers the last broadcast adapters (for the alignment
    score) between rounds; everything else comes from the broadcast state."""

    def __init__(self, config: FedAlignConfig) -> None:
        self.config = config
        self._previous: dict[str, np.ndarray] | None = None

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(state)

    def memory(self) -> dict[str, np.ndarray]:
        """The last broadcast adapters (what the next round's alignment scores compare to)."""
        return {} if self._previous is None else dict(self._previous)

    def restore(self, memory: Mapping[str, np.ndarray]) -> None:
        self._previous = {n: np.asarray(a, dtype=np.float64) for n, a in memory.items()} or None

    def extras_shapes(self, state: GlobalState) -> dict[str, tuple[int, ...]]:
        """The extras this client reads, all or none: the score statistics, (L, E) each."""
        shape = tuple(state.routing.counts.shape)
        return {name: shape for name in (ALIGN_MEAN, ALIGN_STD, ALIGN_N)}

    @contextmanager
    def session(self, model: nn.Module, state: GlobalState) -> Iterator[TrainingPlan]:
        """Adds the soft-vs-soft KL(p_b ‖ p̄) regularizer once global routing exists and it is
        switched on."""
        coef, smoothing = self.config.params.regularization, self.config.params.smoothing
        if coef == 0 or float(np.maximum(state.routing.gate_sum, 0.0).sum()) <= 0:
            yield TrainingPlan()
            return
        target = torch.from_numpy(soft_target(state.routing, smoothing))

        def kl_term(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
            return coef * routing_regularizer(router_probabilities(model), target, smoothing)

        yield TrainingPlan(extra_loss=kl_term)

    def submit(self, state: GlobalState, result: LocalTrainingResult, weight: float) -> Submission:
        check_routing_matches(result.routing, state.routing)
        config = self.config
        partition = ExpertPartition.of(state)
        layout = self.layout(state)
        w = checked_weight(weight)
        current = {n: t.detach().cpu().double().numpy() for n, t in state.adapters.items()}
        move = None
        if self._previous is not None and self._previous.keys() == current.keys():
            move = {n: current[n] - self._previous[n] for n in current}
        self._previous = current
        delta = {n: t.detach().cpu().double().numpy() for n, t in result.delta.items()}
        clipped_delta = {
            n: np.clip(d, -config.delta_bound, config.delta_bound) for n, d in delta.items()
        }
        scores, known = alignment_scores(partition, clipped_delta, move)
        tau = thresholds(state, config)
        include = np.ones_like(known) if tau is None else ~known | (scores >= tau)
        weights = w * consistency_scores(result.routing, state.routing, config) * include
        values = weighted_deltas(partition, result.delta, w, weights, config.delta_bound)
        raw = {
            **{k: delta[k.removeprefix(DELTA_PREFIX)] for k in values},
            WEIGHT: np.array([w]),
            EXPERT_WEIGHT: weights.ravel(),
            EXPERT_COUNT: include.astype(np.float64).ravel(),
            ROUTING: result.routing.as_vector(),
            ALIGN_SCORE: scores.ravel(),
            ALIGN_SQUARE: (scores**2).ravel(),
            ALIGN_N: known.astype(np.float64).ravel(),
        }
        clipped = layout.clipped_fraction(raw)
        values.update({k: v for k, v in raw.items() if not k.startswith(DELTA_PREFIX)})
        return Submission(values=values, clipped=clipped)


def fedalign_config(config: FederationConfig) -> FedAlignConfig:
    """FedAlign-MoE's parameters from ``[aggregation.fedalign]`` (identical on both sides)."""
    return extended_config(config, FedAlignConfig, config.aggregation.fedalign)


CLIENT_HALF = moe_lora_half(lambda config, name: FedAlignClient(fedalign_config(config)))
