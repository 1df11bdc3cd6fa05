"""Local training of the MoE-LoRA adapters of one institution, private (DP-SGD) or not.

:func:`train_steps` is the one (DP-)SGD loop every strategy trains with, on any trainable module
and per-sample loss (FedAMoLE's experts, DDOME's gate and experts). :func:`train_local` is its
MoE-LoRA front end: a fixed number of steps on token blocks, returning what a round needs:
the adapter delta, the routing statistics of the training forwards, training metrics and the
:class:`~privacy.DPTrainingFacts` of what was released. :func:`evaluate` scores a split.

The unit of privacy is one record of the institution's dataset, which is one row of ``blocks``
(its tokens, right-padded with :data:`~clients.contract.records.PAD_ID`). Each row's loss is the
mean next-token cross-entropy over its real tokens plus ``load_balance_coef`` times the
load-balance loss; it depends on that row only, as per-sample clipping requires (checked by
:func:`privacy.check_per_sample_gradients` with :func:`per_sample_loss`). A strategy may add its
own per-block term (``extra_loss``) and hold some adapter entries fixed (``frozen``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import BarColumn
from rich.progress import Progress
from rich.progress import TextColumn
from rich.progress import TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

from clients.contract.config import TrainingSection
from clients.contract.records import PAD_ID
from clients.contract.routing import RoutingStats
from clients.models.moe_lora import adapter_parameters
from clients.models.moe_lora import adapter_state
from clients.models.moe_lora import get_config
from clients.models.moe_lora import load_balance_loss
from clients.models.moe_lora import reset_routing_statistics
from clients.models.moe_lora import routing_statistics
from clients.models.padding import model_input
from clients.models.padding import token_loss
from privacy import DPConfig
from privacy import DPTrainingFacts
from privacy import make_private

ExtraLoss = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""``(model, ids [B, T]) -> [B]``: a per-block loss term, called right after the forward pass of
``ids`` (so forward hooks have seen it). Each entry must depend on its own block only."""


class TrainerError(ValueError):
    """Bad arguments to the trainer (the message names the argument)."""


@dataclass(frozen=True)
class Metrics:
    """Token-level language-model metrics: mean cross-entropy, its exp, argmax accuracy; per
    evaluated record (when known) its summed cross-entropy, correct predictions and targets,
    for paired comparisons of two models on the same records (e.g. bootstrap intervals)."""

    loss: float
    perplexity: float
    accuracy: float
    tokens: int
    record_loss: tuple[float, ...] = ()
    record_correct: tuple[int, ...] = ()
    record_tokens: tuple[int, ...] = ()

    def summary(self) -> dict[str, float | int]:
        """The four token-level metrics, without the per-record ones (for metrics lines)."""
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "accuracy": self.accuracy,
            "tokens": self.tokens,
        }


@dataclass(frozen=True)
class LocalTrainingResult:
    """What one local run produced; ``delta`` has the names and order of ``adapter_state``.

    ``metrics`` and ``routing`` are computed on private data: they are not DP by themselves
    and must be noised and charged before they leave the institution.
    """

    delta: dict[str, torch.Tensor]
    routing: RoutingStats
    metrics: Metrics
    facts: DPTrainingFacts | None
    steps: int


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _forward(
    model: nn.Module, ids: torch.Tensor, load_balance_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-record (training loss, summed token CE, correct predictions), each of shape [B].

    Padding (:data:`~clients.contract.records.PAD_ID`) is no target: it adds nothing to the
    cross-entropy or the correct count (a prediction never equals it), and the loss is the mean
    over the record's real targets.
    """
    logits = model(input_ids=model_input(ids)).logits
    token_ce, real = token_loss(logits, ids)
    loss = token_ce.sum(dim=1) / real.sum(dim=1).clamp(min=1)
    if load_balance_coef > 0:
        loss = loss + load_balance_coef * load_balance_loss(model, reduction="none")
    correct = (logits[:, :-1].detach().argmax(-1) == ids[:, 1:]).sum(dim=1)
    return loss, token_ce.detach().sum(dim=1), correct


def _targets(ids: torch.Tensor) -> int:
    """Real next-token targets in ``ids`` [B, T]: the tokens metrics count."""
    return int((ids[:, 1:] != PAD_ID).sum())


def per_sample_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The per-block training loss [B] that :func:`train_local` clips and backpropagates."""
    return _forward(model, ids, get_config(model).load_balance_coef)[0]


def _check_blocks(blocks: torch.Tensor, name: str) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long:
        raise TrainerError(f"{name} must be a LongTensor [N, T]")
    if blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise TrainerError(f"{name} needs >= 1 block of >= 2 tokens, got {tuple(blocks.shape)}")


def _metrics(ce_sum: float, correct: int, tokens: int) -> Metrics:
    loss = ce_sum / tokens if tokens else float("nan")
    return Metrics(loss, math.exp(min(loss, 700.0)), correct / tokens if tokens else 0.0, tokens)


@contextmanager
def _progress(description: str, total: int, enabled: bool | None) -> Iterator:
    console = Console(stderr=True)
    show = console.is_terminal if enabled is None else enabled and console.is_terminal
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"))
    with Progress(
        *columns, TimeRemainingColumn(), console=console, transient=True, disable=not show
    ) as progress:
        task = progress.add_task(description, total=total, info="")
        yield lambda info: progress.update(task, advance=1, info=info)


StepListener = Callable[[int, int], None]
"""``listener(done, total)``: told before the first local step (0) and after every step."""


_step_listener: ContextVar[StepListener | None] = ContextVar("step_listener", default=None)


@contextmanager
def report_steps(listener: StepListener) -> Iterator[None]:
    """Within the block, every :func:`train_steps` (whichever strategy calls it) tells
    ``listener`` its progress: how the institution process shows its local steps to the
    launcher without each strategy passing a callback through."""
    token = _step_listener.set(listener)
    try:
        yield
    finally:
        _step_listener.reset(token)


BatchLoss = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]
"""``loss(batch) -> [B]``: each sample's loss, depending on that sample only (the batch is
already on the training device)."""


@dataclass(frozen=True)
class LocalRun:
    """What a local run released (``facts``, None without DP) and its mean per-sample loss."""

    facts: DPTrainingFacts | None
    steps: int
    mean_loss: float


@dataclass(frozen=True)
class StepSettings:
    """How one round of local training runs: DP-SGD (None: plain SGD), the number of Adam
    steps, the (expected, under DP Poisson) batch size, learning rate, device (None: CUDA when
    available) and seed. Checked when made, so a bad value fails before any model work."""

    dp: DPConfig | None
    steps: int
    batch_size: int
    lr: float = 1e-3
    device: str | torch.device | None = None
    seed: int | None = None
    physical_batch_size: int | None = None
    """Rows computed at once; a larger (logical) batch is split into parts of this size, whose
    clipped gradients add up to one step (None: the whole batch at once)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "physical_batch_size"):
            value = getattr(self, name)
            if value is None and name == "physical_batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainerError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise TrainerError(f"lr must be a finite number > 0, got {self.lr!r}")

    @classmethod
    def of(cls, training: TrainingSection, dp: DPConfig | None) -> StepSettings:
        """A federation round's settings: ``[training]`` with the institution's DP-SGD plan."""
        return cls(
            dp,
            training.local_steps,
            training.batch_size,
            training.lr,
            training.torch_device,
            physical_batch_size=training.physical_batch_size,
        )


def train_steps(
    model: nn.Module,
    data: TensorDataset,
    loss: BatchLoss,
    settings: StepSettings,
    *,
    progress: bool | None = False,
    after_step: Callable[[], None] | None = None,
) -> LocalRun:
    """The one local (DP-)SGD loop: ``settings.steps`` Adam steps on the model's trainable
    parameters.

    With ``settings.dp``: DP-SGD through :func:`privacy.make_private` (Poisson sampling at rate
    ``batch_size / len(data)``, per-sample clipping over every trainable parameter, Gaussian
    noise at ``dp.noise_multiplier``, calibrated by the caller for all rounds); an empty
    Poisson batch still takes the noise-only step the accounting assumes. Without: shuffled
    mini-batches of ``batch_size``. Opacus is removed from the model afterwards, so it can be
    trained again next round. ``after_step`` runs after every step (e.g. to put held entries
    back). ``progress=None`` shows a transient bar only on a terminal; ``False`` never. A
    listener set with :func:`report_steps` is told the steps done.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainerError("the model has no trainable parameters")
    dev = select_device(settings.device)
    model.to(dev)
    generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    was_training = model.training
    model.train()
    total, count = 0.0, 0
    training = make_private(model, optimizer, loader, settings.dp, seed=settings.seed)
    try:
        batches = training.batches()
        listener = _step_listener.get()
        if listener is not None:
            listener(0, settings.steps)
        with _progress("local training", settings.steps, progress) as advance:
            for step in range(settings.steps):
                batch = tuple(t.to(dev) for t in next(batches))
                size = batch[0].shape[0]
                if size == 0:
                    training.step(None)
                    parts = []
                else:
                    parts = _physical_parts(batch, settings.physical_batch_size)
                for i, part in enumerate(parts):
                    per_sample = loss(part)
                    if i < len(parts) - 1:
                        training.accumulate(per_sample, size)
                    else:
                        training.step(per_sample, size)
                    total += float(per_sample.detach().sum())
                    count += part[0].shape[0]
                if after_step is not None:
                    after_step()
                advance(f"loss {total / count:.3f}" if count else "empty batch")
                if listener is not None:
                    listener(step + 1, settings.steps)
        facts = training.facts()
    finally:
        training.close()
        model.train(was_training)
    mean_loss = total / count if count else math.nan
    return LocalRun(facts=facts, steps=training.steps, mean_loss=mean_loss)


def _physical_parts(
    batch: tuple[torch.Tensor, ...], size: int | None
) -> list[tuple[torch.Tensor, ...]]:
    """``batch``'s rows in consecutive parts of at most ``size`` (one part for None)."""
    if size is None or batch[0].shape[0] <= size:
        return [batch]
    return list(zip(*(t.split(size) for t in batch), strict=True))


def train_local(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    dp: DPConfig | None,
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    device: str | torch.device | None = None,
    seed: int | None = None,
    physical_batch_size: int | None = None,
    progress: bool | None = None,
    extra_loss: ExtraLoss | None = None,
    frozen: Mapping[str, torch.Tensor] | None = None,
) -> LocalTrainingResult:
    """Train the MoE-LoRA adapters on ``blocks`` [N, T] with :func:`train_steps` and report.

    Each block's loss is the model's (next-token CE plus the load-balance term) plus
    ``extra_loss`` (see :data:`ExtraLoss`). ``frozen`` maps adapter names to bool masks of their
    shape: True entries are put back to their starting values after every step, so neither
    gradients nor DP noise move them and their delta is exactly zero. The routing counters are
    reset first, so the result's routing statistics are those of the training forwards.
    """
    settings = StepSettings(dp, steps, batch_size, lr, device, seed, physical_batch_size)
    _check_blocks(blocks, "blocks")
    config = get_config(model)
    adapters = dict(adapter_parameters(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable != set(adapters):
        raise TrainerError(
            "only adapter parameters may be trainable; also trainable: "
            f"{sorted(trainable - set(adapters))[:5]}"
        )
    model.to(select_device(device))
    before = adapter_state(model)
    held = _held_entries(frozen, before)
    reset_routing_statistics(model)
    ce_sum, correct, tokens = 0.0, 0, 0

    def block_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        nonlocal ce_sum, correct, tokens
        (ids,) = batch
        loss, ce, hits = _forward(model, ids, config.load_balance_coef)
        if extra_loss is not None:
            loss = loss + _checked_extra(extra_loss(model, ids), ids.shape[0])
        ce_sum += float(ce.sum())
        correct += int(hits.sum())
        tokens += _targets(ids)
        return loss

    run = train_steps(
        model, TensorDataset(blocks), block_loss, settings, progress=progress,
        after_step=lambda: _restore(adapters, held),
    )  # fmt: skip
    after = adapter_state(model)
    delta = {name: (after[name] - before[name]).cpu() for name in before}
    return LocalTrainingResult(
        delta=delta,
        routing=routing_statistics(model),
        metrics=_metrics(ce_sum, correct, tokens),
        facts=run.facts,
        steps=run.steps,
    )


def _held_entries(
    frozen: Mapping[str, torch.Tensor] | None, before: Mapping[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Name -> (bool mask, starting values) for every tensor with at least one frozen entry."""
    if frozen is None:
        return {}
    unknown = sorted(set(frozen) - set(before))
    if unknown:
        raise TrainerError(f"frozen names unknown adapter tensors {unknown[:5]}")
    held = {}
    for name, mask in frozen.items():
        start = before[name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TrainerError(f"frozen[{name!r}] must be a bool tensor")
        if tuple(mask.shape) != tuple(start.shape):
            raise TrainerError(
                f"frozen[{name!r}] has shape {tuple(mask.shape)}, the adapter {tuple(start.shape)}"
            )
        if bool(mask.any()):
            held[name] = (mask.to(start.device), start)
    return held


@torch.no_grad()
def _restore(
    params: Mapping[str, nn.Parameter], held: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    for name, (mask, start) in held.items():
        params[name][mask] = start[mask]


def _checked_extra(term: torch.Tensor, batch: int) -> torch.Tensor:
    if not isinstance(term, torch.Tensor) or tuple(term.shape) != (batch,):
        got = tuple(term.shape) if isinstance(term, torch.Tensor) else type(term).__name__
        raise TrainerError(f"extra_loss must return one value per block ({batch},), got {got}")
    return term


BatchScore = Callable[[slice], tuple[torch.Tensor, torch.Tensor]]
"""``score(rows)`` -> the summed next-token cross-entropy of those rows of the evaluated blocks
and their correct predictions (tensors of any shape; both are summed)."""


@torch.no_grad()
def evaluate_with(
    model: nn.Module, blocks: torch.Tensor, score: BatchScore, batch_size: int = 8
) -> Metrics:
    """Next-token loss, perplexity and accuracy of ``blocks`` [N, T], scored ``batch_size`` rows
    at a time by ``score`` with the model in eval mode (its mode is restored afterwards)."""
    _check_blocks(blocks, "blocks")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TrainerError(f"batch_size must be an int >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    record_loss: list[float] = []
    record_correct: list[int] = []
    try:
        for start in range(0, blocks.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            ce, hits = score(rows)
            n = blocks[rows].shape[0]
            record_loss.extend(ce.double().reshape(n, -1).sum(dim=1).tolist())
            record_correct.extend(hits.long().reshape(n, -1).sum(dim=1).tolist())
    finally:
        model.train(was_training)
    summary = _metrics(sum(record_loss), sum(record_correct), _targets(blocks))
    record_tokens = (blocks[:, 1:] != PAD_ID).sum(dim=1).tolist()
    return dataclasses.replace(
        summary,
        record_loss=tuple(record_loss),
        record_correct=tuple(record_correct),
        record_tokens=tuple(record_tokens),
    )


@torch.no_grad()
def block_losses(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Each block's mean next-token cross-entropy (float64 [N]), the model in eval mode: the
    per-record values a validation signal clips and averages."""
    dev = select_device(device)
    model.to(dev)
    out: list[torch.Tensor] = []

    def score(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        _, ce, hits = _forward(model, blocks[rows].to(dev), 0.0)
        out.append(ce.double().cpu() / (blocks.shape[1] - 1))
        return ce, hits

    if blocks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    evaluate_with(model, blocks, score, batch_size)
    return torch.cat(out)


def evaluate(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> Metrics:
    """Next-token loss, perplexity and accuracy on ``blocks`` [N, T] (e.g. validation/test).

    Adds the evaluated tokens to the model's routing counters.
    """
    dev = select_device(device)
    model.to(dev)

    def score(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        _, ce, hits = _forward(model, blocks[rows].to(dev), 0.0)
        return ce, hits

    return evaluate_with(model, blocks, score, batch_size)
