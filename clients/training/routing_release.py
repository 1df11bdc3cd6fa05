"""Routing statistics as a differentially private release of one institution.

The released statistics are the sum over the institution's training blocks of each block's
own statistics divided by its length T: per adapted layer, expert counts (each token picks
``top_k`` distinct experts, so a block's row has entries in [0, 1] summing to ``top_k``), router
probability sums (a row of non-negative entries summing to 1) and tokens (1). One block, the
unit of privacy, thus moves the vector by at most ``sqrt(L * (top_k + 2))`` in L2 over L layers
(:func:`routing_sensitivity`), whatever the model does with it. The statistics come from one
forward pass after local training over every training block, or over a Poisson sample of them
(``[privacy] routing_sample_rate``: a pass over every record would cost as much as many
DP-SGD steps), and the Gaussian mechanism adds noise of that sensitivity times the configured
noise multiplier before anything leaves. Loads and mean gates (ratios) are unchanged by the 1/T
scaling and, in expectation, by the sampling.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from clients.contract.routing import RoutingStats
from clients.models.moe_lora import reset_routing_statistics
from clients.models.moe_lora import routing_statistics
from clients.models.padding import model_input
from privacy import ROUTING_STATISTICS
from privacy import GaussianMechanism
from privacy import poisson_sample

SENSITIVITY_BASIS = (
    "unit of privacy: one record, one training row of T tokens (padding included); the "
    "release sums each row's routing statistics divided by T, so per adapted layer one row "
    "adds expert counts in [0, 1] summing to top_k, router probabilities summing to 1 and a "
    "token count of 1: L2 sensitivity sqrt(layers * (top_k + 2))"
)


class RoutingReleaseError(ValueError):
    """The routing statistics cannot be released with the stated sensitivity."""


def routing_sensitivity(num_layers: int, top_k: int) -> float:
    """L2 sensitivity of the per-block normalised routing statistics to one block."""
    if num_layers < 1 or top_k < 1:
        raise RoutingReleaseError(f"need >= 1 layer and top_k >= 1, got {num_layers}, {top_k}")
    return math.sqrt(num_layers * (top_k + 2))


def routing_mechanism(
    model: nn.Module, noise_multiplier: float, sample_rate: float = 1.0
) -> GaussianMechanism:
    """The Gaussian mechanism for ``model``'s routing statistics at ``noise_multiplier``, on a
    Poisson sample of the records at ``sample_rate``."""
    stats = routing_statistics(model)
    return GaussianMechanism(
        noise_multiplier=noise_multiplier,
        l2_sensitivity=routing_sensitivity(stats.num_layers, stats.top_k),
        what=ROUTING_STATISTICS,
        sample_rate=sample_rate,
    )


@torch.no_grad()
def block_normalised_statistics(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 16
) -> RoutingStats:
    """Sum over ``blocks`` [N, T] of each block's routing statistics / T (eval mode, no noise).

    Refuses a model whose layers do not see exactly T tokens per block (the bound assumes it).
    """
    n, length = blocks.shape
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    reset_routing_statistics(model)
    try:
        for start in range(0, n, batch_size):
            model(input_ids=model_input(blocks[start : start + batch_size].to(device)))
    finally:
        model.train(was_training)
    stats = routing_statistics(model)
    reset_routing_statistics(model)
    if not np.all(stats.tokens == n * length):
        raise RoutingReleaseError(
            f"layers saw {sorted(set(stats.tokens.tolist()))} tokens for {n} blocks of "
            f"{length}; the sensitivity bound needs exactly one pass per token"
        )
    return RoutingStats(
        layer_names=stats.layer_names,
        counts=stats.counts / length,
        gate_sum=stats.gate_sum / length,
        tokens=stats.tokens / length,
        top_k=stats.top_k,
    )


def private_routing_statistics(
    model: nn.Module, blocks: torch.Tensor, mechanism: GaussianMechanism
) -> RoutingStats:
    """The block-normalised statistics of ``mechanism``'s Poisson sample of ``blocks`` (all of
    them at rate 1), with its noise added."""
    if mechanism.sample_rate < 1:
        blocks = blocks[torch.from_numpy(poisson_sample(blocks.shape[0], mechanism.sample_rate))]
    exact = block_normalised_statistics(model, blocks)
    want = routing_sensitivity(exact.num_layers, exact.top_k)
    if not math.isclose(mechanism.l2_sensitivity, want):
        raise RoutingReleaseError(
            f"the mechanism assumes sensitivity {mechanism.l2_sensitivity}, this model's "
            f"statistics have {want}"
        )
    noisy = mechanism.apply(exact.as_vector())
    return RoutingStats.from_vector(noisy, exact.layer_names, exact.num_experts, exact.top_k)
