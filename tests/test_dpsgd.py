"""DP-SGD wiring, noise calibration and accounting (privacy package), on a small stand-in model."""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from dp_accounting import pld
from dp_accounting import rdp
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

from privacy import CalibrationError
from privacy import DPConfig
from privacy import DPTrainingFacts
from privacy import PrivacyConfigError
from privacy import PrivacyError
from privacy import accountant
from privacy import calibrate_noise
from privacy import check_per_sample_gradients
from privacy import epsilon
from privacy import make_private
from privacy import reduce_per_sample_loss
from privacy.accountant import make_accountant
from privacy.gradcheck import brute_force_per_sample_gradients

VOCAB, DIM, LEN = 12, 16, 10


class TinyAdapterLM(nn.Module):
    """Frozen embedding/head around a trainable per-token gated low-rank adapter + router."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.router = nn.Linear(DIM, 2)
        self.down = nn.Linear(DIM, 4, bias=False)
        self.up = nn.Linear(4, DIM, bias=False)
        for p in (*self.emb.parameters(), *self.head.parameters()):
            p.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        gate = self.router(h).softmax(-1)[..., :1]
        return self.head(torch.tanh(h + gate * self.up(self.down(h))))


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    ids = batch[0] if isinstance(batch, (list, tuple)) else batch
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def pattern_blocks(n: int = 48, seed: int = 0) -> torch.Tensor:
    """Blocks of a learnable rule: next token = (token + 1) mod VOCAB, random phase."""
    start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(LEN)) % VOCAB


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def loader(blocks: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(blocks), batch_size=batch_size, shuffle=True)


def dp(sigma: float | None = 1.0, clip: float = 1.0, mode: str = "hooks") -> DPConfig:
    return DPConfig(
        target_epsilon=4.0,
        target_delta=1e-5,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        grad_sample_mode=mode,  # type: ignore[arg-type]
    )


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_epsilon", 0.0),
        ("target_epsilon", float("inf")),
        ("target_delta", 1.0),
        ("target_delta", -1e-5),
        ("max_grad_norm", 0.0),
        ("noise_multiplier", -0.5),
        ("accountant", "prv"),
        ("grad_sample_mode", "functorch"),
    ],
)
def test_config_errors_name_the_field(field, value):
    kwargs = {"target_epsilon": 1.0, "target_delta": 1e-5, "max_grad_norm": 1.0, field: value}
    with pytest.raises(PrivacyConfigError, match=field):
        DPConfig(**kwargs)


def test_config_is_immutable_and_calibrated_copy_spends_the_budget():
    config = DPConfig(target_epsilon=2.0, target_delta=1e-5, max_grad_norm=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.noise_multiplier = 1.0  # type: ignore[misc]
    with pytest.raises(PrivacyConfigError, match="noise_multiplier"):
        config.require_noise_multiplier()
    calibrated = config.calibrated(sample_rate=0.02, total_steps=500)
    assert config.noise_multiplier is None
    assert calibrated.noise_multiplier == calibrate_noise(2.0, 1e-5, 0.02, 500, config.accountant)


# --- calibration and accounting, checked against dp-accounting directly -----------------


def independent_epsilon(sigma: float, q: float, steps: int, delta: float, kind: str) -> float:
    acc = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, gaussian), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    ("kind", "q", "steps", "target", "rtol"),
    [("rdp", 0.01, 1000, 2.0, 1e-3), ("pld", 0.05, 60, 3.0, 1e-2)],
)
def test_calibrated_sigma_reaches_target_epsilon(kind, q, steps, target, rtol):
    sigma = calibrate_noise(target, 1e-5, q, steps, kind, rtol=rtol)
    eps = independent_epsilon(sigma, q, steps, 1e-5, kind)
    assert eps <= target  # never over budget
    assert eps > target * (1 - 5 * rtol)  # and not wastefully under it
    assert independent_epsilon(sigma * (1 - 2 * rtol), q, steps, 1e-5, kind) > target


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibration_agrees_with_opacus_rdp():
    ours = calibrate_noise(2.0, 1e-5, 0.01, 1000, "rdp")
    theirs = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, steps=1000, accountant="rdp"
    )
    assert ours == pytest.approx(theirs, rel=0.01)


def test_calibration_refuses_impossible_budget_and_bad_input():
    with pytest.raises(CalibrationError, match="epsilon"):
        calibrate_noise(1e-3, 1e-9, 1.0, 10_000)
    with pytest.raises(PrivacyConfigError, match="total_steps"):
        calibrate_noise(1.0, 1e-5, 0.1, 0)
    with pytest.raises(PrivacyConfigError, match="sample_rate"):
        calibrate_noise(1.0, 1e-5, 1.5, 10)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_facts_epsilon_equals_dp_accounting(kind):
    facts = DPTrainingFacts(
        noise_multiplier=1.1, sample_rate=0.02, steps=150, max_grad_norm=1.0, delta=1e-5
    )
    expected_event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1)), 150
    )
    assert facts.dp_event() == expected_event
    want = independent_epsilon(1.1, 0.02, 150, 1e-5, kind)
    assert facts.epsilon(kind) == pytest.approx(want, rel=1e-9)


def test_releases_compose_like_one_long_run():
    """Charging per round (list of events) equals accounting for all steps at once."""
    rounds = [DPTrainingFacts(0.9, 0.05, s, 1.0, 1e-5).dp_event() for s in (40, 25, 35)]
    whole = DPTrainingFacts(0.9, 0.05, 100, 1.0, 1e-5).dp_event()
    assert epsilon(rounds, 1e-5, "rdp") == pytest.approx(epsilon([whole], 1e-5, "rdp"), rel=1e-9)
    assert epsilon(rounds[:1], 1e-5) < epsilon(rounds, 1e-5)
    assert DPTrainingFacts(0.9, 0.05, 0, 1.0, 1e-5).epsilon() == 0.0


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("sample_rate", {"sample_rate": 0.0}),
        ("steps", {"steps": -1}),
        ("noise_multiplier", {"noise_multiplier": 0.0}),
        ("delta", {"delta": 1.0}),
    ],
)
def test_facts_validation_names_field(field, kwargs):
    base = {
        "noise_multiplier": 1.0,
        "sample_rate": 0.1,
        "steps": 5,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
    }
    with pytest.raises(PrivacyConfigError, match=field):
        DPTrainingFacts(**{**base, **kwargs})


# --- the DP-SGD front door ------------------------------------------------------------------


def test_make_private_refuses_mismatched_optimizer_and_uncalibrated_config():
    model = TinyAdapterLM()
    data = loader(pattern_blocks(), 8)
    wrong = torch.optim.SGD([*trainable(model), model.head.weight], lr=0.1)
    with pytest.raises(PrivacyConfigError, match="trainable parameters"):
        make_private(model, wrong, data, dp())
    with pytest.raises(PrivacyConfigError, match="noise_multiplier"):
        make_private(model, torch.optim.SGD(trainable(model), lr=0.1), data, dp(sigma=None))


def test_private_and_baseline_share_one_interface():
    blocks = pattern_blocks(48)
    for config in (dp(sigma=0.7), None):
        model = TinyAdapterLM()
        with make_private(
            model, torch.optim.SGD(trainable(model), lr=0.1), loader(blocks, 8), config, seed=1
        ) as training:
            assert training.private is (config is not None)
            assert training.sample_rate == pytest.approx(8 / 48)
            poisson = isinstance(training.data_loader.batch_sampler, UniformWithReplacementSampler)
            assert poisson is (config is not None)
            batches = training.batches()
            for _ in range(3):
                (ids,) = next(batches)
                training.step(lm_loss(model, ids) if len(ids) else None)
            facts = training.facts()
        if config is None:
            assert facts is None
        else:
            assert facts == DPTrainingFacts(0.7, 8 / 48, 3, 1.0, 1e-5)


def test_update_is_the_clipped_mean_of_brute_force_per_sample_gradients():
    """With (almost) no noise and q = 1, one SGD step moves the adapters by exactly
    -lr * sum_i min(1, C/||g_i||) g_i / B, g_i from one backward per example."""
    blocks = pattern_blocks(6)
    model = TinyAdapterLM()
    params = trainable(model)
    grads = brute_force_per_sample_gradients(model, blocks, lambda m, b: 50 * lm_loss(m, b))
    flat = torch.cat([g.reshape(6, -1) for g in grads.values()], dim=1)
    clip = 0.5
    factor = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert (factor < 1).all()  # the scaled loss makes every sample clip
    expected = -(factor @ flat) / 6
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt = torch.optim.SGD(params, lr=1.0)
    with make_private(model, opt, loader(blocks, 6), dp(sigma=1e-12, clip=clip)) as training:
        (ids,) = next(training.batches())
        assert len(ids) == 6  # q = 1: Poisson sampling keeps everyone
        training.step(50 * lm_loss(model, ids))
    after = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(after - before, expected, rtol=1e-4, atol=1e-7)
    assert (after - before).norm() <= clip + 1e-6


@pytest.mark.parametrize("parts", [1, 2])
def test_noise_has_std_sigma_c_over_expected_batch_once_per_logical_batch(parts):
    model = TinyAdapterLM()
    params = trainable(model)
    blocks = pattern_blocks(40)
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt = torch.optim.SGD(params, lr=1.0)
    with make_private(model, opt, loader(blocks, 10), dp(sigma=2.0, clip=3.0), seed=5) as tr:
        (ids,) = next(tr.batches())
        chunks = ids.split(-(-len(ids) // parts))
        for chunk in chunks[:-1]:  # physical parts of one logical batch: noise once
            tr.accumulate(0 * lm_loss(model, chunk), len(ids))
        tr.step(0 * lm_loss(model, chunks[-1]), len(ids))  # zero gradient: pure noise
    update = torch.cat([p.detach().reshape(-1) for p in params]) - before
    assert update.numel() > 150
    scale = 2.0 * 3.0 / 10  # sigma * C / expected batch size
    # the noise is never seeded: statistical checks that a correct step fails with < 1e-6
    assert stats.kstest(update.double().numpy() / scale, "norm").pvalue > 1e-6
    assert update.std().item() == pytest.approx(scale, rel=7 / (2 * update.numel()) ** 0.5)


def test_empty_poisson_batch_still_releases_noise():
    model = TinyAdapterLM()
    params = trainable(model)
    before = [p.detach().clone() for p in params]
    blocks = pattern_blocks(20)
    with make_private(
        model, torch.optim.SGD(params, lr=1.0), loader(blocks, 4), dp(sigma=1.0), seed=0
    ) as training:
        assert training.step(None) is None
        assert training.facts().steps == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    with make_private(model, torch.optim.SGD(params, lr=1.0), loader(blocks, 4), None) as baseline:
        frozen = [p.detach().clone() for p in params]
        baseline.step(None)
    assert all(torch.equal(b, p) for b, p in zip(frozen, params, strict=True))


class FlatTokensLM(TinyAdapterLM):
    """Feeds the adapter all tokens of the batch as one flat [B*T, d] tensor."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        flat = self.up(self.down(h.reshape(-1, DIM))).reshape(h.shape)
        return self.head(torch.tanh(h + self.router(h)[..., :1] * flat))


def test_step_refuses_per_sample_gradients_that_are_not_per_sample():
    model = FlatTokensLM()
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    blocks = pattern_blocks(8)
    with make_private(model, opt, loader(blocks, 8), dp(), seed=0) as training:
        (ids,) = next(training.batches())
        with pytest.raises(PrivacyError, match="mixes the batch"):
            training.step(lm_loss(model, ids))


def test_close_removes_opacus_so_the_model_is_reusable():
    model = TinyAdapterLM()
    names = list(model.state_dict())
    blocks = pattern_blocks(24)
    for _round in range(2):
        opt = torch.optim.SGD(trainable(model), lr=0.1)
        with make_private(model, opt, loader(blocks, 8), dp(), seed=_round) as training:
            (ids,) = next(training.batches())
            training.step(lm_loss(model, ids))
        assert list(model.state_dict()) == names
        assert not hasattr(model, "autograd_grad_sample_hooks")
        for module in model.modules():
            assert not module._forward_hooks and not module._backward_hooks
            assert not hasattr(module, "activations")
        for p in model.parameters():
            assert not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter")
    with pytest.raises(PrivacyError, match="closed"):
        training.step(lm_loss(model, ids))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_and_plain_steps_lower_the_loss(mode):
    blocks = pattern_blocks(64)
    for config in (dp(sigma=0.5, clip=1.0, mode=mode), None):
        model = TinyAdapterLM(seed=3)
        start = lm_loss(model, blocks).mean().item()
        opt = torch.optim.Adam(trainable(model), lr=0.03)
        with make_private(model, opt, loader(blocks, 16), config, seed=2) as training:
            batches = training.batches()
            for _ in range(40):
                (ids,) = next(batches)
                training.step(lm_loss(model, ids) if len(ids) else None)
        end = lm_loss(model, blocks).mean().item()
        assert end < start - 0.3, (config, start, end)


def test_ghost_mode_is_verified_by_the_gradient_check():
    report = check_per_sample_gradients(TinyAdapterLM(), pattern_blocks(5), lm_loss, mode="ghost")
    assert report.ok, report.summary()
    assert report.max_grad_norm is not None


def test_reduce_refuses_non_per_sample_losses():
    with pytest.raises(PrivacyError, match="per_sample_loss"):
        reduce_per_sample_loss(torch.ones(()))
    assert reduce_per_sample_loss(torch.tensor([1.0, 3.0])).item() == 2.0


@pytest.mark.parametrize("mode", ["hooks", "ghost", None])
def test_a_batch_in_physical_parts_is_one_step_equal_to_the_whole_batch(mode):
    """Clipped per-sample gradients of the parts add up to the whole batch's (no noise here);
    the baseline's part shares add up to the batch mean; one step is counted."""
    blocks = pattern_blocks(6)
    config = (
        None
        if mode is None
        else dataclasses.replace(dp(sigma=1e-12, clip=0.5), grad_sample_mode=mode)
    )

    def update(parts: int) -> tuple[torch.Tensor, int]:
        model = TinyAdapterLM()
        params = trainable(model)
        before = torch.cat([p.detach().reshape(-1) for p in params])
        opt = torch.optim.SGD(params, lr=1.0)
        with make_private(model, opt, loader(blocks, 6), config, seed=0) as training:
            (ids,) = next(training.batches())
            chunks = ids.split(len(ids) // parts)
            for chunk in chunks[:-1]:
                training.accumulate(50 * lm_loss(model, chunk), len(ids))
            training.step(50 * lm_loss(model, chunks[-1]), len(ids))
            steps = training.steps
        return torch.cat([p.detach().reshape(-1) for p in params]) - before, steps

    whole, one = update(1)
    split, counted = update(3)
    assert one == counted == 1
    assert whole.abs().max() > 1e-3  # a real update
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-7)


# --- the PLD accountant that remembers each event's PLD -------------------------------------


def remembering_and_plain_epsilons(
    events: list[dp_accounting.DpEvent],
) -> list[tuple[float, float]]:
    remembering, plain = make_accountant("pld"), pld.PLDAccountant()
    pairs = []
    for event in events:
        remembering.compose(event)
        plain.compose(event)
        pairs.append((remembering.get_epsilon(1e-5), plain.get_epsilon(1e-5)))
    return pairs


def test_remembering_pld_accountant_prices_as_dp_accounting_does():
    run = accountant.dp_sgd_event(1.37, 0.03, 12)
    routing = dp_accounting.GaussianDpEvent(9.1)
    both = dp_accounting.ComposedDpEvent([run, routing])
    events = [run, routing, run, dp_accounting.NoOpDpEvent(), both, run, routing]
    for remembering, plain in remembering_and_plain_epsilons(events):
        assert remembering == pytest.approx(plain, rel=1e-9)
    assert remembering_and_plain_epsilons([run, dp_accounting.NonPrivateDpEvent()])[-1] == (
        math.inf,
        math.inf,
    )


def test_remembering_pld_accountant_refuses_what_dp_accounting_refuses():
    remembering = make_accountant("pld")
    remembering.compose(dp_accounting.GaussianDpEvent(2.3))
    before = remembering.get_epsilon(1e-5)
    unsupported = dp_accounting.RandomizedResponseDpEvent(0.5, 4)  # replace-one only
    with pytest.raises(dp_accounting.UnsupportedEventError):
        pld.PLDAccountant().compose(unsupported)
    with pytest.raises(dp_accounting.UnsupportedEventError):
        remembering.compose(unsupported)
    assert remembering.get_epsilon(1e-5) == before  # nothing was composed


def test_remembering_pld_accountant_builds_each_event_once(monkeypatch):
    built: list[float] = []
    module = pld.privacy_loss_distribution
    real = module.from_gaussian_mechanism

    def counting(*args, **kwargs):  # the real construction, counted
        built.append(kwargs["standard_deviation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "from_gaussian_mechanism", counting)
    run = accountant.dp_sgd_event(1.4142, 0.021, 7)  # values no other test uses
    first, second = make_accountant("pld"), make_accountant("pld")
    for acc in (first, second, second):
        acc.compose(run)
    assert len(built) == 1
    assert second.get_epsilon(1e-5) > first.get_epsilon(1e-5)  # composed twice all the same
    make_accountant("pld").compose(accountant.dp_sgd_event(1.4142, 0.021, 8))
    assert len(built) == 2  # another event is built
