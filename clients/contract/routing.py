"""Routing statistics: how many tokens each expert of each routed layer received.

The federation sums them (securely) across institutions and broadcasts the sum; both sides
read them, so they live in the contract (numpy only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class RoutingStats:
    """Per-layer routing counts, ready for (secure) summation across clients.

    ``counts[l, e]``: top-k selections of expert e in layer l; ``gate_sum[l, e]``: sum over tokens
    of the full softmax router probability of e; ``tokens[l]``: tokens seen. Sums of two clients'
    stats (``+``, or ``as_vector`` / ``from_vector``) are the stats of their union.
    """

    layer_names: tuple[str, ...]
    counts: np.ndarray
    gate_sum: np.ndarray
    tokens: np.ndarray
    top_k: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def mean_gate(self) -> np.ndarray:
        """Mean router probability per (layer, expert); zeros for a layer that saw no tokens."""
        denom = np.maximum(self.tokens, 1).astype(np.float64)[:, None]
        return self.gate_sum / denom

    @property
    def load(self) -> np.ndarray:
        """Fraction of the layer's routed slots that went to each expert (rows sum to 1)."""
        denom = np.maximum(self.counts.sum(axis=1, keepdims=True), 1.0)
        return self.counts / denom

    def as_vector(self) -> np.ndarray:
        """``[counts, gate_sum, tokens]`` flattened, float64, length ``L * (2E + 1)``."""
        return np.concatenate([self.counts.ravel(), self.gate_sum.ravel(), self.tokens.ravel()])

    @classmethod
    def from_vector(
        cls,
        vector: np.ndarray,
        layer_names: tuple[str, ...] | list[str],
        num_experts: int,
        top_k: int = 1,
    ) -> RoutingStats:
        """Inverse of :meth:`as_vector` (e.g. for a securely summed vector)."""
        layers, experts = len(layer_names), num_experts
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (layers * (2 * experts + 1),):
            raise ValueError(
                f"routing vector has shape {vector.shape}, expected ({layers * (2 * experts + 1)},)"
            )
        n = layers * experts
        return cls(
            layer_names=tuple(layer_names),
            counts=vector[:n].reshape(layers, experts).copy(),
            gate_sum=vector[n : 2 * n].reshape(layers, experts).copy(),
            tokens=vector[2 * n :].copy(),
            top_k=top_k,
        )

    def __add__(self, other: RoutingStats) -> RoutingStats:
        if not isinstance(other, RoutingStats):
            return NotImplemented
        if other.layer_names != self.layer_names or other.counts.shape != self.counts.shape:
            raise ValueError("cannot add routing statistics of different layers or expert counts")
        return RoutingStats(
            layer_names=self.layer_names,
            counts=self.counts + other.counts,
            gate_sum=self.gate_sum + other.gate_sum,
            tokens=self.tokens + other.tokens,
            top_k=self.top_k,
        )
