"""A local (DP-)SGD loop for strategies whose loss or trainable set differs from the trainer's.

:func:`clients.training.trainer.train_local` trains the MoE-LoRA adapters of
:mod:`clients.models.moe_lora` with their loss. FedAMoLE and DDOME train other modules (a subset of
experts, a gate fed with precomputed embeddings), so they call :func:`train_steps` with their own
per-sample loss. The privacy path is the same front door, :func:`privacy.make_private`: Poisson
sampling, per-sample clipping over every trainable parameter, Gaussian noise, Opacus removed
afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.training.trainer import TrainerError, select_device
from privacy import DPConfig, DPTrainingFacts, make_private

BatchLoss = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]
"""``loss(batch) -> [B]``: each sample's loss, depending on that sample only."""


@dataclass(frozen=True)
class LocalRun:
    """What a local run released (``facts``, None without DP) and its mean training loss."""

    facts: DPTrainingFacts | None
    steps: int
    mean_loss: float


def train_steps(
    model: nn.Module,
    data: TensorDataset,
    loss: BatchLoss,
    *,
    dp: DPConfig | None,
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    device: str | torch.device | None = None,
    seed: int | None = None,
) -> LocalRun:
    """``steps`` Adam steps on the model's trainable parameters (and nothing else).

    With ``dp``: DP-SGD at sample rate ``batch_size / len(data)``; an empty Poisson batch still
    takes the noise-only step the accounting assumes. Batches are moved to ``device``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TrainerError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TrainerError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise TrainerError(f"lr must be a finite number > 0, got {lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainerError("the model has no trainable parameters")
    dev = select_device(device)
    model.to(dev)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(params, lr=lr)
    was_training = model.training
    model.train()
    total, count = 0.0, 0
    training = make_private(model, optimizer, loader, dp, seed=seed)
    try:
        batches = training.batches()
        for _ in range(steps):
            batch = tuple(t.to(dev) for t in next(batches))
            if batch[0].shape[0] == 0:
                training.step(None)
                continue
            per_sample = loss(batch)
            training.step(per_sample)
            total += float(per_sample.detach().sum())
            count += batch[0].shape[0]
        facts = training.facts()
    finally:
        training.close()
        model.train(was_training)
    return LocalRun(
        facts=facts, steps=training.steps, mean_loss=total / count if count else math.nan
    )
