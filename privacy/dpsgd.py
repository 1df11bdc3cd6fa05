"""DP-SGD on the trainable (adapter) parameters with Opacus: one front door, :func:`make_private`.

Opacus' hooks are attached to the model without wrapping it (parameter names stay stable) and
removed by :meth:`PrivateTraining.close`. The loss reduction that Opacus assumes is fixed here
(:data:`LOSS_REDUCTION`) and applied by :meth:`PrivateTraining.step` itself: callers hand over
PER-SAMPLE losses and never reduce or backpropagate them, so the two cannot disagree. The
Gaussian noise comes from :mod:`privacy.noise` (an AES-CTR keystream), not from torch's
seedable generator.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import numpy as np
import torch
from opacus.data_loader import dtype_safe
from opacus.data_loader import shape_safe
from opacus.data_loader import wrap_collate_with_empty
from opacus.grad_sample import AbstractGradSampleHooks
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample import GradSampleHooksFastGradientClipping
from opacus.optimizers import DPOptimizer
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag
from opacus.optimizers.optimizer import _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset
from torch.utils.data import default_collate

from privacy.config import DPConfig
from privacy.errors import PrivacyConfigError
from privacy.errors import PrivacyError
from privacy.events import DPTrainingFacts
from privacy.noise import gaussian_like
from privacy.noise import uniform

LOSS_REDUCTION: Final = "mean"
"""How a batch of per-sample losses becomes the loss that is backpropagated (the one place)."""


def reduce_per_sample_loss(per_sample_loss: torch.Tensor) -> torch.Tensor:
    """Reduce per-sample losses [B] the way Opacus is told they are reduced."""
    if per_sample_loss.dim() != 1:
        raise PrivacyError(
            f"per_sample_loss must have shape [batch], got {tuple(per_sample_loss.shape)}"
        )
    return per_sample_loss.mean() if LOSS_REDUCTION == "mean" else per_sample_loss.sum()


@contextmanager
def quiet_backward_hooks() -> Iterator[None]:
    """Silence torch's notice that Opacus' full backward hooks fire on a frozen-input module
    (expected here: the first adapted layer's input comes from frozen embeddings)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        yield


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters DP-SGD privatises: every one with ``requires_grad``, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def attach_grad_sampler(
    model: nn.Module, mode: str, max_grad_norm: float
) -> AbstractGradSampleHooks:
    """Attach Opacus' per-sample hooks ("hooks") or ghost-clipping hooks ("ghost") in place."""
    if not trainable_parameters(model):
        raise PrivacyError("model has no trainable parameters: attach adapters first")
    if mode == "hooks":
        return GradSampleHooks(model, batch_first=True, loss_reduction=LOSS_REDUCTION)
    if mode == "ghost":
        return GradSampleHooksFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction=LOSS_REDUCTION,
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=True,
        )
    raise PrivacyConfigError(f"grad_sample_mode must be 'hooks' or 'ghost', got {mode!r}")


def detach_grad_sampler(hooks: AbstractGradSampleHooks, model: nn.Module) -> None:
    """Remove the hooks and every attribute Opacus added to parameters and modules."""
    hooks.cleanup()
    for module in model.modules():
        for attr in ("activations", "max_batch_len"):
            if hasattr(module, attr):
                delattr(module, attr)


def ghost_clipped_backward(
    hooks: GradSampleHooksFastGradientClipping,
    params: list[nn.Parameter],
    per_sample_loss: torch.Tensor,
) -> None:
    """Ghost clipping's double backward: leaves sum_i min(1, C / ||g_i||) g_i in ``p.grad``.

    The first backward lets the hooks compute per-sample gradient norms; a parameter the batch
    did not use has norm 0, but one with a gradient and no norm is refused (unsupported module).
    The second backward, hooks off, weights each sample's loss by its clipping factor.
    """
    for p in params:
        if hasattr(p, "_norm_sample"):
            del p._norm_sample
    with quiet_backward_hooks():
        reduce_per_sample_loss(per_sample_loss).backward(retain_graph=True)
    for p in params:
        if not hasattr(p, "_norm_sample"):
            if p.grad is not None and torch.count_nonzero(p.grad) > 0:
                raise PrivacyError(
                    f"ghost clipping computed no per-sample norm for a parameter of shape "
                    f"{tuple(p.shape)}: its module is unsupported (use grad_sample_mode='hooks')"
                )
            p._norm_sample = torch.zeros(len(per_sample_loss), device=p.device)
        p.grad = None
    coefficients = hooks.get_clipping_coef().to(per_sample_loss.device)
    hooks.disable_hooks()
    try:
        with quiet_backward_hooks():
            (coefficients * per_sample_loss).sum().backward()
    finally:
        hooks.enable_hooks()


class PrivateTraining:
    """A model, optimizer and batch source ready for (DP-)SGD; made by :func:`make_private`.

    Loop: ``for batch in training.batches(): training.step(per_sample_loss(model, batch))``;
    an empty Poisson batch is passed as ``step(None)`` (the DP path still releases a
    noise-only update, as the accounting assumes). ``close()`` (or leaving the ``with`` block)
    removes Opacus from the model so it can be reused across rounds.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        dp: DPConfig | None,
        sample_rate: float,
        hooks: AbstractGradSampleHooks | None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.dp = dp
        self.sample_rate = sample_rate
        self.steps = 0
        self._hooks = hooks
        self._params = [p for _, p in trainable_parameters(model)]

    @property
    def private(self) -> bool:
        """Whether steps clip and noise (False: the plain-SGD baseline)."""
        return self.dp is not None

    def batches(self) -> Iterator:
        """Batches forever (Poisson-sampled when private), epoch after epoch."""
        while True:
            yield from self.data_loader

    def step(
        self, per_sample_loss: torch.Tensor | None, logical_size: int | None = None
    ) -> float | None:
        """Backpropagate per-sample losses [B], clip, noise and update; return the batch loss.

        ``None`` marks an empty batch: the private path takes a noise-only step, the baseline
        skips the update. Every call counts as one step of the accounting. After
        :meth:`accumulate` calls, these are the logical batch's last part and ``logical_size``
        its size.
        """
        if self._hooks is None and self.dp is not None:
            raise PrivacyError("this PrivateTraining is closed")
        self.steps += 1
        if per_sample_loss is None or per_sample_loss.numel() == 0:
            if self.dp is not None:
                self._empty_private_step()
            return None
        loss = self._backward(per_sample_loss, logical_size)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def accumulate(self, per_sample_loss: torch.Tensor, logical_size: int) -> None:
        """One physical part of a logical (Poisson) batch too large to compute at once: clip
        its per-sample gradients and add them up (the baseline: add its share of the mean
        gradient). No noise, no update, no step counted: :meth:`step` with the last part does
        those once for the whole logical batch, exactly as if it had been computed at once."""
        if self._hooks is None and self.dp is not None:
            raise PrivacyError("this PrivateTraining is closed")
        if per_sample_loss.numel() == 0:
            return
        self._backward(per_sample_loss, logical_size)
        if self.dp is None:
            return  # plain gradients add up in p.grad until the step
        self.optimizer.signal_skip_step(do_skip=True)
        self.optimizer.step()  # clips and adds to the running sum only
        self.optimizer.zero_grad(set_to_none=True)  # keeps the running sum

    def _backward(self, per_sample_loss: torch.Tensor, logical_size: int | None) -> torch.Tensor:
        """Backpropagate one (part of a) batch; the reduced loss."""
        if self.dp is None and logical_size is not None:  # this part's share of the mean
            loss = per_sample_loss.sum() / logical_size
        else:
            loss = reduce_per_sample_loss(per_sample_loss)
        if self.dp is not None and self.dp.grad_sample_mode == "ghost":
            ghost_clipped_backward(self._hooks, self._params, per_sample_loss)  # type: ignore[arg-type]
        else:
            with quiet_backward_hooks():
                loss.backward()
            if self.dp is not None:
                self._check_grad_samples(len(per_sample_loss))
        return loss

    def _check_grad_samples(self, batch_size: int) -> None:
        """Zero per-sample gradients for parameters the batch did not use; refuse a gradient
        without per-sample gradients or with a batch dimension that is not the batch."""
        for p in self._params:
            if p.grad_sample is None:
                if p.grad is not None:
                    raise PrivacyError(
                        "a parameter got a gradient but no per-sample gradient: its module "
                        "is not supported by the DP path (run privacy.gradcheck)"
                    )
                p.grad_sample = torch.zeros((batch_size, *p.shape), device=p.device)
            elif (
                not isinstance(p.grad_sample, torch.Tensor) or p.grad_sample.shape[0] != batch_size
            ):
                raise PrivacyError(
                    f"per-sample gradient of a parameter of shape {tuple(p.shape)} is not "
                    f"[{batch_size}, ...]: its module mixes the batch dimension (run "
                    "privacy.gradcheck)"
                )

    def _empty_private_step(self) -> None:
        for p in self._params:
            if self.dp is not None and self.dp.grad_sample_mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def facts(self) -> DPTrainingFacts | None:
        """What the steps so far released (None for the non-private baseline)."""
        if self.dp is None:
            return None
        return DPTrainingFacts(
            noise_multiplier=self.dp.require_noise_multiplier(),
            sample_rate=self.sample_rate,
            steps=self.steps,
            max_grad_norm=self.dp.max_grad_norm,
            delta=self.dp.target_delta,
        )

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample state from the model (idempotent)."""
        if self._hooks is not None:
            detach_grad_sampler(self._hooks, self.model)
            self._hooks = None
        for p in self._params:
            p.grad = None

    def __enter__(self) -> PrivateTraining:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler (each record in a batch with probability ``sample_rate``)
    with the coins from :func:`privacy.noise.uniform`, or from ``generator`` if a test gives
    one."""

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            if self.generator is None:
                coins = uniform(self.num_samples)
            else:
                coins = torch.rand(self.num_samples, generator=self.generator).numpy()
            yield np.flatnonzero(coins < self.sample_rate).tolist()


def _poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    collate_fn: Callable[[list], object] | None,
    generator: torch.Generator | None,
) -> DataLoader:
    """What Opacus' ``DPDataLoader`` builds (Poisson batches; an empty one collates to
    zero-length tensors), over :class:`_PoissonSampler`."""
    first = dataset[0]
    return DataLoader(
        dataset,
        batch_sampler=_PoissonSampler(
            num_samples=len(dataset),  # type: ignore[arg-type]
            sample_rate=sample_rate,
            generator=generator,
        ),
        collate_fn=wrap_collate_with_empty(
            collate_fn=collate_fn or default_collate,
            sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
            dtypes=[dtype_safe(x) for x in first],
        ),
    )


def _add_secure_noise(self: DPOptimizer) -> None:
    """Opacus' ``add_noise`` (clipped sum plus N(0, (sigma C)^2) per coordinate, into
    ``p.grad``) with the noise from :func:`privacy.noise.gaussian_like`."""
    sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
    for p in self.params:
        _check_processed_flag(p.summed_grad)
        noise = gaussian_like(p.summed_grad, sigma * self.max_grad_norm)
        p.grad = (p.summed_grad + noise).view_as(p)
        _mark_as_processed(p.summed_grad)


class _SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus' DP optimizer (per-sample gradient hooks) with CSPRNG noise."""

    add_noise = _add_secure_noise


class _SecureNoiseGhostOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' ghost-clipping DP optimizer with CSPRNG noise."""

    add_noise = _add_secure_noise


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    dp: DPConfig | None,
    *,
    seed: int | None = None,
) -> PrivateTraining:
    """Make (model, optimizer, data_loader) DP-SGD on the trainable parameters, or plain SGD.

    With ``dp`` set: Poisson sampling at rate q = batch_size / len(dataset) (as Opacus'
    ``DPDataLoader``), per-sample clipping to ``dp.max_grad_norm`` over ALL trainable parameters
    (flat clipping), Gaussian noise of std ``noise_multiplier * max_grad_norm``, and the sum
    divided by the expected batch size q * N. ``dp.noise_multiplier`` must be calibrated.
    With ``dp=None``: the given loader and optimizer unchanged (the baseline).
    ``seed`` makes Poisson sampling reproducible (tests only; by default its coins come from
    :mod:`privacy.noise`); the noise never is.
    """
    trainable = {id(p) for _, p in trainable_parameters(model)}
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if trainable != optimized:
        raise PrivacyConfigError(
            "optimizer must hold exactly the model's trainable parameters "
            f"({len(trainable)} trainable, {len(optimized)} in the optimizer)"
        )
    batch_size = data_loader.batch_size
    if batch_size is None or batch_size < 1:
        raise PrivacyConfigError("data_loader must have a fixed batch_size (it sets the rate)")
    n = len(data_loader.dataset)  # type: ignore[arg-type]
    if n < 1:
        raise PrivacyConfigError("data_loader.dataset is empty")
    sample_rate = min(1.0, batch_size / n)
    if dp is None:
        return PrivateTraining(model, optimizer, data_loader, None, sample_rate, None)

    sigma = dp.require_noise_multiplier()
    sampling = None if seed is None else torch.Generator().manual_seed(seed)
    loader = _poisson_loader(data_loader.dataset, sample_rate, data_loader.collate_fn, sampling)
    hooks = attach_grad_sampler(model, dp.grad_sample_mode, dp.max_grad_norm)
    hooks.forbid_grad_accumulation()
    optimizer_class = (
        _SecureNoiseGhostOptimizer if dp.grad_sample_mode == "ghost" else _SecureNoiseDPOptimizer
    )
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=min(batch_size, n),
        loss_reduction=LOSS_REDUCTION,
    )
    return PrivateTraining(model, dp_optimizer, loader, dp, sample_rate, hooks)
