"""What a privacy report needs to know about a federation beyond its ledgers.

The coordinator writes it once per run as ``<run_dir>/audit-context.json`` (it can read the
config; ``audit`` cannot import ``clients``). Every field is public: the federation's settings,
the trust model they imply, and the software versions that ran.
"""

from __future__ import annotations

import platform
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


def software_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the guarantees depend on."""
    versions = {"python": platform.python_version()}
    for package in ("sealmoe", "dp-accounting", "opacus", "torch", "tenseal", "cryptography"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


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
