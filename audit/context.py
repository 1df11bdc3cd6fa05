"""What a privacy report needs to know about a federation beyond its ledgers.

The coordinator writes it once per run as ``<run_dir>/audit-context.json`` (it can read the
config; ``audit`` cannot import ``clients``). Every field is public: the federation's settings,
the trust model they imply, and the software versions that ran.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import msgspec

from privacy.errors import UserError

CONTEXT_FILE = "audit-context.json"


class ContextError(UserError, ValueError):
    """The run directory has no usable audit context (the message says what to do)."""


class InstitutionFacts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One institution's name, (epsilon, delta) budget for the whole run, and its public
    weight in every average as declared in the federation config (None in contexts written
    before weights were declared there)."""

    name: str
    budget_epsilon: float
    budget_delta: float
    weight: float | None = None


class ReleaseFacts(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One kind of release: what leaves an institution, by which mechanism, to whom."""

    what: str
    mechanism: str
    to_whom: str


class StrategyFacts(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a strategy releases and what its coordinator sees beyond the sums, in the
    report's words; stated by the strategy's server half (``coordinator.strategies``).

    - ``update``: what the DP-SGD adapter update consists of.
    - ``releases_routing``: whether institutions release routing statistics.
    - ``extra_releases``: the strategy's own releases besides those two.
    - ``coordinator_sees``: appended to the sentence of what the coordinator sees.
    """

    update: str = "adapter update (weighted LoRA-expert deltas)"
    releases_routing: bool = True
    extra_releases: tuple[ReleaseFacts, ...] = ()
    coordinator_sees: str = ""


class ModelFacts(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The base model every institution fine-tuned: its name, revision, dtype and the SHA-256
    of its weight files as the coordinator found them when the run started (None for a
    built-in random model, rebuilt from the federation's seed; ``note`` says why else)."""

    name: str
    revision: str | None = None
    dtype: str = ""
    sha256: str | None = None
    note: str = ""


class FederationFacts(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The public description of a federation run that a privacy report cites."""

    federation: str
    rounds: int
    spare_rounds: int
    institutions: list[InstitutionFacts]
    block_len: int
    local_steps: int
    batch_size: int
    max_grad_norm: float
    accountant: str
    routing_noise_multiplier: float
    expert_updates: str
    routing_statistics: str
    secagg_threshold: int
    secagg_neighbours: int
    secagg_check_survivors: bool
    roster: str
    strategy: str = "fedavg"
    strategy_facts: StrategyFacts | None = None
    """None in contexts written before strategies stated their facts; ``sealmoe audit report``
    then looks them up by ``strategy``."""
    software: dict[str, str] = msgspec.field(default_factory=dict)
    base_model: ModelFacts | None = None
    """None in contexts written before the coordinator recorded the base model."""
    git_commit: str | None = None
    """The sealmoe source's ``git rev-parse HEAD`` ("not a git checkout" otherwise)."""
    train_records_cap: int | None = None
    """``[data.max_blocks] train``: the most training records any institution uses (public)."""
    routing_sample_rate: float = 1.0
    """The Poisson sampling rate of the records each routing release is computed on."""


SOFTWARE = (
    "sealmoe", "torch", "transformers", "peft", "opacus", "tenseal", "cryptography", "pyzmq",
    "dp-accounting", "msgspec",
)  # fmt: skip
"""The packages whose behaviour the guarantees depend on, reported with their versions."""


def software_versions() -> dict[str, str]:
    """Versions of :data:`SOFTWARE` (and Python), read without importing the packages."""
    versions = {"python": platform.python_version()}
    for package in SOFTWARE:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


NOT_A_CHECKOUT = "not a git checkout"


def source_commit(folder: str | Path | None = None) -> str:
    """The git commit of the sealmoe source in ``folder`` (default: this package's checkout),
    marked when the working tree has uncommitted changes; :data:`NOT_A_CHECKOUT` otherwise."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent.parent
    git = shutil.which("git")
    if git is None:
        return NOT_A_CHECKOUT
    try:
        top, head = subprocess.run(  # noqa: S603 - fixed arguments, no user input
            [git, "rev-parse", "--show-toplevel", "HEAD"], cwd=folder, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.split()  # fmt: skip
        dirty = subprocess.run(  # noqa: S603
            [git, "status", "--porcelain", "--untracked-files=no"], cwd=folder,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError, ValueError):
        return NOT_A_CHECKOUT
    if len(head) != 40 or Path(top).resolve() != folder.resolve():  # e.g. a venv inside a repo
        return NOT_A_CHECKOUT
    return head + (" (with uncommitted changes)" if dirty else "")


def context_bytes(facts: FederationFacts) -> bytes:
    """The context file's bytes (the caller writes them atomically to :func:`context_path`)."""
    return msgspec.json.format(msgspec.json.encode(facts), indent=1) + b"\n"


def context_path(run_dir: str | Path) -> Path:
    """Where a run keeps its audit context."""
    return Path(run_dir) / CONTEXT_FILE


def read_context(run_dir: str | Path) -> FederationFacts:
    """The audit context of ``run_dir``; :class:`ContextError` if missing or invalid."""
    path = context_path(run_dir)
    try:
        return msgspec.json.decode(path.read_bytes(), type=FederationFacts)
    except FileNotFoundError:
        raise ContextError(
            f"{path}: missing; it is written by the coordinator when a run starts "
            "(is this a run directory?)"
        ) from None
    except (OSError, msgspec.DecodeError) as exc:
        raise ContextError(f"{path}: not an audit context ({exc})") from None
