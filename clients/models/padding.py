"""Padded example rows (see :mod:`clients.contract.records`): model inputs and masked token loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clients.contract.records import PAD_ID


def model_input(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with the padding replaced by token 0, for the model's embedding.

    Padding sits after a record's tokens, so under causal attention it cannot change the
    outputs at the record's own positions.
    """
    return ids.masked_fill(ids == PAD_ID, 0)


def token_loss(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy [B, T-1] of ``logits`` [B, T, V] against ``ids`` [B, T], zero
    where the target is padding, and the mask of real targets [B, T-1]."""
    targets = ids[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, reduction="none", ignore_index=PAD_ID
    )
    return ce, targets != PAD_ID


def mean_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token cross-entropy over its real targets [B] (the per-record
    loss: equal to the loss of the unpadded record computed alone)."""
    ce, real = token_loss(logits, ids)
    return ce.sum(dim=1) / real.sum(dim=1).clamp(min=1)
