"""The opacus#820 guard: per-sample gradients of the DP path against brute force.

Brute force runs one forward/backward per example (the definition of a per-sample gradient);
the DP path attaches the same Opacus hooks as :func:`privacy.dpsgd.make_private`, runs the
whole batch once, and exposes what DP-SGD would clip:

- "hooks": each parameter's ``grad_sample`` [B, ...] is compared with the brute-force
  per-example gradients;
- "ghost": ghost clipping never forms per-sample gradients, so its clipped sum
  (sum_i min(1, C / ||g_i||) g_i, noise 0) is compared with the brute-force clipped sum; C
  defaults to the median brute-force norm so that both clipped and unclipped samples occur.

Dropout modules are put in eval mode during the check (both passes must see one function).
The loss function must be deterministic and each sample's loss must depend on that sample only.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from privacy.dpsgd import attach_grad_sampler
from privacy.dpsgd import detach_grad_sampler
from privacy.dpsgd import ghost_clipped_backward
from privacy.dpsgd import quiet_backward_hooks
from privacy.dpsgd import reduce_per_sample_loss
from privacy.dpsgd import trainable_parameters
from privacy.errors import PerSampleGradientError
from privacy.errors import PrivacyConfigError

Batch = torch.Tensor | Sequence[torch.Tensor]
PerSampleLoss = Callable[[nn.Module, Batch], torch.Tensor]
"""``loss_fn(model, batch) -> [B]``: each sample's loss, depending on that sample only."""


@dataclass(frozen=True)
class ParameterCheck:
    """How one trainable parameter's DP-path gradient compares with brute force."""

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    ok: bool
    reason: str = ""
    scale: float = 0.0
    """Largest brute-force gradient entry (0: the batch never exercised this parameter)."""


@dataclass(frozen=True)
class GradCheckReport:
    """Outcome of :func:`check_per_sample_gradients` for every trainable parameter."""

    mode: str
    batch_size: int
    atol: float
    rtol: float
    parameters: tuple[ParameterCheck, ...]
    max_grad_norm: float | None = None

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.parameters)

    @property
    def failed(self) -> tuple[str, ...]:
        """Names of parameters whose DP-path gradient disagrees with brute force."""
        return tuple(p.name for p in self.parameters if not p.ok)

    @property
    def missing(self) -> tuple[str, ...]:
        """Names of parameters with a true gradient but no per-sample gradient."""
        return tuple(p.name for p in self.parameters if p.reason.startswith("missing"))

    def summary(self) -> str:
        worst = max(self.parameters, key=lambda p: p.max_rel_error)
        head = (
            f"{self.mode} gradient check on {len(self.parameters)} parameters, "
            f"batch {self.batch_size}: worst rel. error {worst.max_rel_error:.2e} ({worst.name})"
        )
        bad = [f"  {p.name}: {p.reason}" for p in self.parameters if not p.ok]
        return "\n".join([head, *bad])


def _slice(batch: Batch, i: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[i : i + 1]
    return type(batch)(t[i : i + 1] for t in batch)  # type: ignore[call-arg]


def _batch_size(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    sizes = {t.shape[0] for t in batch}
    if len(sizes) != 1:
        raise PrivacyConfigError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def brute_force_per_sample_gradients(
    model: nn.Module, batch: Batch, loss_fn: PerSampleLoss
) -> dict[str, torch.Tensor]:
    """Per-sample gradients [B, ...] of every trainable parameter, one backward per example."""
    named = trainable_parameters(model)
    per_example: list[list[torch.Tensor]] = []
    for i in range(_batch_size(batch)):
        loss = loss_fn(model, _slice(batch, i))
        if loss.shape != (1,):
            raise PrivacyConfigError(
                f"loss_fn must return one loss per sample: got shape {tuple(loss.shape)} "
                "for a batch of 1"
            )
        grads = torch.autograd.grad(loss[0], [p for _, p in named], allow_unused=True)
        pairs = zip(named, grads, strict=True)
        per_example.append([torch.zeros_like(p) if g is None else g for (_, p), g in pairs])
    return {name: torch.stack([ex[k] for ex in per_example]) for k, (name, _) in enumerate(named)}


def _as_tensor(grad_sample: object) -> torch.Tensor | None:
    """Opacus' ``grad_sample`` is a tensor, or a list after accumulation (treated as missing)."""
    return grad_sample if isinstance(grad_sample, torch.Tensor) else None


def _compare(
    name: str, got: torch.Tensor | None, want: torch.Tensor, atol: float, rtol: float
) -> ParameterCheck:
    shape = tuple(want.shape[1:])
    scale = want.abs().max().item()
    inf = float("inf")
    if got is None:
        if scale == 0:
            return ParameterCheck(name, shape, 0.0, 0.0, True, "", scale)
        return ParameterCheck(name, shape, inf, inf, False, "missing per-sample gradient", scale)
    if got.shape != want.shape:
        reason = (
            f"shape {tuple(got.shape)} != brute force {tuple(want.shape)} "
            "(batch dimension mixed with tokens?)"
        )
        return ParameterCheck(name, shape, inf, inf, False, reason, scale)
    err = (got.detach().to(want.dtype) - want).abs().max().item()
    rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
    ok = err <= atol + rtol * scale
    reason = "" if ok else f"max abs error {err:.3e} > {atol:.1e} + {rtol:.1e} * {scale:.3e}"
    return ParameterCheck(name, shape, err, rel, ok, reason, scale)


def check_per_sample_gradients(
    model: nn.Module,
    batch: Batch,
    loss_fn: PerSampleLoss,
    *,
    mode: str = "hooks",
    max_grad_norm: float | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-3,
) -> GradCheckReport:
    """Compare what DP-SGD clips (``mode`` "hooks" or "ghost") with brute force; never raises
    on a mismatch (see :func:`assert_per_sample_gradients`). Errors are judged per parameter:
    ``max|got - want| <= atol + rtol * max|want|``. Leaves the model as it was: gradients
    cleared, hooks removed, mode and buffers (e.g. routing counters) restored."""
    if mode not in ("hooks", "ghost"):
        raise PrivacyConfigError(f"mode must be 'hooks' or 'ghost', got {mode!r}")
    named = trainable_parameters(model)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]  # e.g. routing counters
    was_training = model.training
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m in dropouts:
        m.eval()
    try:
        model.zero_grad(set_to_none=True)
        want = brute_force_per_sample_gradients(model, batch, loss_fn)
        size = _batch_size(batch)
        if mode == "ghost":
            flat = torch.cat([want[n].reshape(size, -1) for n, _ in named], dim=1)
            norms = flat.norm(dim=1)
            clip = float(norms.median()) if max_grad_norm is None else max_grad_norm
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            want = {n: torch.einsum("i,i...->...", factor, g)[None] for n, g in want.items()}
        else:
            clip = None
        hooks = attach_grad_sampler(model, mode, clip or 1.0)
        try:
            per_sample_loss = loss_fn(model, batch)
            if per_sample_loss.shape != (size,):
                raise PrivacyConfigError(
                    f"loss_fn must return shape [{size}], got {tuple(per_sample_loss.shape)}"
                )
            if mode == "ghost":
                ghost_clipped_backward(hooks, [p for _, p in named], per_sample_loss)  # type: ignore[arg-type]
                got = {n: None if p.grad is None else p.grad[None] for n, p in named}
            else:
                with quiet_backward_hooks():
                    reduce_per_sample_loss(per_sample_loss).backward()
                got = {n: _as_tensor(getattr(p, "grad_sample", None)) for n, p in named}
            checks = tuple(_compare(n, got[n], want[n], atol, rtol) for n, _ in named)
        finally:
            detach_grad_sampler(hooks, model)
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
        for m in dropouts:
            m.train(was_training)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return GradCheckReport(mode, size, atol, rtol, checks, clip)


def assert_per_sample_gradients(
    model: nn.Module,
    batch: Batch,
    loss_fn: PerSampleLoss,
    **kwargs: object,
) -> GradCheckReport:
    """:func:`check_per_sample_gradients`, raising :class:`PerSampleGradientError` on mismatch."""
    report = check_per_sample_gradients(model, batch, loss_fn, **kwargs)  # type: ignore[arg-type]
    if not report.ok:
        raise PerSampleGradientError(report.summary())
    return report
