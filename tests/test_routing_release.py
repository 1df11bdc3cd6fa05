"""Routing statistics as a DP release: the stated sensitivity holds, noise has its scale, and
DP-SGD calibration leaves room for the routing releases of every planned round."""

from __future__ import annotations

import logging

import dp_accounting
import numpy as np
import pytest
import torch

from clients.models.loaders import tiny_dense_model
from clients.models.loaders import tiny_moe_model
from clients.models.moe_lora import MoELoRAConfig
from clients.models.moe_lora import attach
from clients.training.routing_release import block_normalised_statistics
from clients.training.routing_release import private_routing_statistics
from clients.training.routing_release import routing_mechanism
from clients.training.routing_release import routing_sensitivity
from privacy import CalibrationError
from privacy import PrivacyConfigError
from privacy import calibrate_noise
from privacy import dp_sgd_event
from privacy import epsilon
from privacy import poisson_sample


@pytest.fixture(autouse=True)
def quiet_absl():
    logging.getLogger("absl").setLevel(logging.ERROR)


def blocks(n: int = 12, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["dense", "mixtral"])
def test_one_block_moves_the_statistics_by_at_most_the_sensitivity(kind):
    torch.manual_seed(0)
    base = tiny_dense_model() if kind == "dense" else tiny_moe_model("mixtral")
    model = attach(base, MoELoRAConfig(rank=2, top_k=2))
    data = blocks()
    full = block_normalised_statistics(model, data)
    assert np.allclose(full.tokens, len(data))  # one per block and layer
    assert np.allclose(full.counts.sum(axis=1), len(data) * full.top_k)
    bound = routing_sensitivity(full.num_layers, full.top_k)
    changes = []
    for j in range(len(data)):
        without = block_normalised_statistics(model, torch.cat([data[:j], data[j + 1 :]]))
        changes.append(np.linalg.norm(full.as_vector() - without.as_vector()))
    assert max(changes) <= bound
    assert max(changes) > 0.2 * bound  # the bound is not vacuous for this model


def test_the_release_adds_noise_of_the_stated_scale():
    torch.manual_seed(0)
    model = attach(tiny_dense_model(), MoELoRAConfig(rank=2))
    mechanism = routing_mechanism(model, noise_multiplier=3.0)
    data = blocks()
    exact = block_normalised_statistics(model, data).as_vector()
    noise = np.concatenate([
        private_routing_statistics(model, data, mechanism).as_vector() - exact for _ in range(10)
    ])  # fmt: skip
    assert mechanism.noise_std == pytest.approx(3.0 * routing_sensitivity(8, 2))
    assert 0.8 * mechanism.noise_std < noise.std() < 1.2 * mechanism.noise_std
    assert abs(noise.mean()) < 0.2 * mechanism.noise_std


def test_calibration_leaves_room_for_the_routing_releases_of_every_planned_round():
    rounds, steps, q, target = 3, 4, 0.125, 4.0
    routing = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(5.0), rounds)
    alone = calibrate_noise(target, 1e-5, q, rounds * steps)
    with_routing = calibrate_noise(target, 1e-5, q, rounds * steps, also=[routing])
    assert with_routing > alone
    total = epsilon([dp_sgd_event(with_routing, q, rounds * steps), routing], 1e-5)
    assert 0.95 * target < total <= target
    with pytest.raises(CalibrationError, match="fixed releases alone spend"):
        calibrate_noise(0.5, 1e-5, q, rounds * steps, also=[routing])


def test_a_sampled_release_runs_on_a_poisson_sample_and_is_priced_as_one():
    torch.manual_seed(0)
    model = attach(tiny_dense_model(), MoELoRAConfig(rank=2))
    rate, data = 0.25, blocks(n=400, length=4)
    mechanism = routing_mechanism(model, noise_multiplier=1e-6, sample_rate=rate)
    sampled = [private_routing_statistics(model, data, mechanism).tokens[0] for _ in range(8)]
    # each record adds one token per layer: the count is Binomial(400, 0.25), sd 8.7
    assert all(abs(t - rate * len(data)) < 5 * 8.7 for t in sampled)
    assert len({round(t) for t in sampled}) > 1  # a fresh sample each release
    event = mechanism.dp_event()
    assert event == dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(1e-6))
    release = mechanism.release(1, 1, "basis")
    assert release.parameters["sample_rate"] == rate
    assert "Poisson sample" in release.parameters["mechanism"]
    # amplification: the same noise costs less on a sample than on every record
    full = routing_mechanism(model, noise_multiplier=2.0)
    half = routing_mechanism(model, noise_multiplier=2.0, sample_rate=0.1)
    assert epsilon([half.dp_event()], 1e-5) < epsilon([full.dp_event()], 1e-5) / 3


def test_poisson_sample_takes_each_record_with_the_rate():
    taken = poisson_sample(200_000, 0.1)
    assert taken.dtype == bool and abs(taken.mean() - 0.1) < 5 * (0.1 * 0.9 / 200_000) ** 0.5
    with pytest.raises(PrivacyConfigError):
        poisson_sample(10, 0.0)
