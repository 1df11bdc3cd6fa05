"""DP noise from a CSPRNG: the right distribution, fresh on every call, and every release's
noise (DP-SGD, the Gaussian mechanism, FedAMoLE's released values) drawn from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import clients.training.release
import privacy.dpsgd
import privacy.gaussian
from clients.training.release import gaussian_release
from privacy import DPConfig
from privacy import GaussianMechanism
from privacy import make_private
from privacy.noise import gaussian_array
from privacy.noise import gaussian_like
from privacy.noise import standard_normal
from tests.test_dpsgd import TinyAdapterLM
from tests.test_dpsgd import lm_loss
from tests.test_dpsgd import loader
from tests.test_dpsgd import pattern_blocks
from tests.test_dpsgd import trainable

FALSE_ALARM = 1e-6
"""The statistical checks below fail a correct sampler with at most this probability."""


def test_samples_are_standard_normal():
    z = standard_normal(200_001)
    assert z.shape == (200_001,) and z.dtype == np.float64
    assert stats.kstest(z, "norm").pvalue > FALSE_ALARM
    # the two halves of each Box-Muller pair are independent normals too
    half = len(z) // 2
    assert abs(stats.pearsonr(z[:half], z[half : 2 * half]).statistic) < 0.02


def test_every_call_draws_fresh_noise():
    assert not np.array_equal(standard_normal(16), standard_normal(16))
    assert standard_normal(0).shape == (0,) and standard_normal(3).shape == (3,)
    with pytest.raises(ValueError):
        standard_normal(-1)


def test_noise_takes_the_reference_tensor_and_the_std():
    reference = torch.zeros(300, 400, dtype=torch.float32)
    noise = gaussian_like(reference, 2.5)
    assert noise.shape == reference.shape and noise.dtype == torch.float32
    assert stats.kstest(noise.double().flatten().numpy() / 2.5, "norm").pvalue > FALSE_ALARM
    assert torch.count_nonzero(gaussian_like(reference, 0.0)) == 0
    assert gaussian_array((2, 3), 1.0).shape == (2, 3)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            gaussian_like(reference, bad)


def test_every_release_draws_its_noise_from_the_csprng(monkeypatch):
    drawn: list[tuple[str, float]] = []

    def spy(module, name, real):
        def wrapper(ref, std):
            drawn.append((module, std))
            return real(ref, std)

        monkeypatch.setattr(f"{module}.{name}", wrapper)

    spy("privacy.dpsgd", "gaussian_like", privacy.dpsgd.gaussian_like)
    spy("privacy.gaussian", "gaussian_array", privacy.gaussian.gaussian_array)
    spy("clients.training.release", "gaussian_array", clients.training.release.gaussian_array)

    model = TinyAdapterLM()
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    config = DPConfig(8.0, 1e-5, 3.0, noise_multiplier=2.0)
    with make_private(model, opt, loader(pattern_blocks(16), 8), config) as training:
        (ids,) = next(training.batches())
        training.step(lm_loss(model, ids))
    sgd = [std for module, std in drawn if module == "privacy.dpsgd"]
    assert len(sgd) == len(trainable(model)) and all(std == pytest.approx(6.0) for std in sgd)

    GaussianMechanism(10.0, 0.5, "routing-statistics").apply(np.zeros(4))
    gaussian_release(
        np.zeros(3), sensitivity=0.2, noise_multiplier=4.0, charge=lambda e, w: None, what="x"
    )
    assert drawn[-2:] == [
        ("privacy.gaussian", pytest.approx(5.0)),
        ("clients.training.release", pytest.approx(0.8)),
    ]


def test_poisson_sampling_coins_come_from_the_csprng(monkeypatch):
    flips: list[int] = []
    real = privacy.dpsgd.uniform

    def spy(count):
        flips.append(count)
        return real(count)

    monkeypatch.setattr(privacy.dpsgd, "uniform", spy)
    model = TinyAdapterLM()
    config = DPConfig(8.0, 1e-5, 1.0, noise_multiplier=1.0)
    blocks = pattern_blocks(400)
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    with make_private(model, opt, loader(blocks, 40), config) as training:
        sizes = [len(ids) for (ids,), _ in zip(training.batches(), range(50), strict=False)]
    assert flips == [400] * len(flips) and len(flips) >= 50  # one coin per record and batch
    # 50 batches of Binomial(400, 0.1): the mean batch is 40 +- 0.6 (std); 6 std is never hit
    assert abs(np.mean(sizes) - 40) < 6 * np.sqrt(400 * 0.1 * 0.9 / 50)
    seeded = []
    for _ in range(2):  # a test's seed makes the batches reproducible
        with make_private(model, opt, loader(blocks, 40), config, seed=3) as training:
            seeded.append(
                [ids.tolist() for (ids,), _ in zip(training.batches(), range(3), strict=False)]
            )
    assert seeded[0] == seeded[1]
