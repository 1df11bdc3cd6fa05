"""DDOME under secure aggregation, coordinator side: ratios of the full-vector secure sum.

The gate moves by sum(w delta) / sum(w) over every included client (FedAvg over all active
clients); expert m by sum(w delta_m) / sum_m(w) over the clients that trained it, when at least
``min_count`` did (the summed 0/1 counts say how many, never who); otherwise it keeps its value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from audit.context import StrategyFacts
from clients.contract.layout import (
    DELTA_PREFIX,
    WEIGHT,
    GlobalState,
    NoContribution,
    SubmissionLayout,
)
from clients.models.ddome_lora import expert_of
from clients.strategies.ddome import DDOMEClient, DDOMEConfig, DDOMEState, DDOMEUpdate
from clients.strategies.experts import EXPERT_COUNT, EXPERT_WEIGHT
from clients.training.release import Charge
from coordinator.strategies.base import aggregate_locally
from privacy import DPConfig


@dataclass(frozen=True)
class DDOMEStrategy:
    """DDOME's coordinator side over the federation processes' :class:`GlobalState` (the
    adapters, and the last round's per-expert counts as an extra)."""

    config: DDOMEConfig

    def _state(self, state: GlobalState) -> DDOMEState:
        return DDOMEState.from_global(state, self.config.adapter.num_experts)

    def initial_state(self, state: GlobalState) -> GlobalState:
        return DDOMECoordinator(self.config).initial_state(state.adapters).to_global()

    def layout(self, state: GlobalState) -> SubmissionLayout:
        return self.config.layout(self._state(state))

    def aggregate(self, state: GlobalState, sums: Mapping[str, np.ndarray]) -> GlobalState:
        return DDOMECoordinator(self.config).aggregate(self._state(state), sums).to_global()


class DDOMECoordinator:
    """Coordinator side of DDOME."""

    def __init__(self, config: DDOMEConfig) -> None:
        self.config = config

    def initial_state(self, adapters: Mapping[str, torch.Tensor]) -> DDOMEState:
        return DDOMEState(
            adapters={n: t.detach().clone() for n, t in adapters.items()},
            expert_counts=np.zeros(self.config.adapter.num_experts),
        )

    def layout(self, state: DDOMEState) -> SubmissionLayout:
        return self.config.layout(state)

    def aggregate(self, state: DDOMEState, sums: Mapping[str, np.ndarray]) -> DDOMEState:
        """The next state from the decoded mask-channel sum over the included clients."""
        values = self.layout(state).unpack(sums)
        floor = 0.5 / self.config.max_examples  # below half an example's weight: nobody
        total = float(values[WEIGHT][0])
        if total < floor:
            raise NoContribution(f"summed weight {total:.3g} is below {floor:.3g}: keep the state")
        counts = np.rint(values[EXPERT_COUNT])
        expert_weight = values[EXPERT_WEIGHT]
        moves = (counts >= self.config.min_count) & (expert_weight >= floor)
        adapters: dict[str, torch.Tensor] = {}
        for name, current in state.adapters.items():
            m = expert_of(name)
            if m is not None and not moves[m]:
                adapters[name] = current.detach().clone()
                continue
            denominator = total if m is None else float(expert_weight[m])
            step = values[DELTA_PREFIX + name].reshape(tuple(current.shape)) / denominator
            adapters[name] = (current.detach().cpu().double() + torch.from_numpy(step)).to(
                current.dtype
            )
        return DDOMEState(adapters=adapters, expert_counts=counts, round=state.round + 1)


@dataclass(frozen=True)
class DDOMEInstitution:
    """One in-process institution: its client side, training blocks, their common embeddings
    (:func:`clients.models.ddome_lora.common_embedding`, computed once) and its ledger hook."""

    client: DDOMEClient
    blocks: torch.Tensor
    embeddings: torch.Tensor
    charge: Charge

    @property
    def num_examples(self) -> int:
        return int(self.blocks.shape[0])


@dataclass(frozen=True)
class DDOMERound:
    """A finished round: the next state, who was summed, and each client's local outcome."""

    state: DDOMEState
    included: list[int]
    updates: dict[int, DDOMEUpdate]
    clipped: dict[int, dict[str, float]]


def run_round(
    coordinator: DDOMECoordinator,
    institutions: Sequence[DDOMEInstitution],
    state: DDOMEState,
    *,
    dp: DPConfig | Sequence[DPConfig | None] | None,
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    threshold: int,
    bits: int = 16,
    dropouts: dict[int, str] | None = None,
    seed: int | None = None,
) -> DDOMERound:
    """One whole DDOME round in one process: every institution chooses, trains and submits;
    a real SecAgg+ round sums the submissions (``dropouts`` as in :func:`secagg.run_local`);
    the coordinator forms the next state. ``dp``: one config for all, or one per institution."""
    updates, submissions = {}, []
    for i, inst in enumerate(institutions):
        updates[i] = inst.client.train(
            state,
            inst.blocks,
            inst.embeddings,
            dp=dp if dp is None or isinstance(dp, DPConfig) else dp[i],
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=None if seed is None else seed + i,
        )
        if updates[i].facts is not None:
            what = f"ddome gate and expert updates (DP-SGD), round {state.round}"
            inst.charge(updates[i].facts.dp_event(), what)
        submissions.append(inst.client.submit(state, updates[i], inst.num_examples))
    layout = coordinator.layout(state)
    agg = aggregate_locally(
        layout,
        [layout.pack(s.values) for s in submissions],
        threshold=threshold,
        bits=bits,
        dropouts=dropouts,
    )
    return DDOMERound(
        state=coordinator.aggregate(state, agg.sums),
        included=agg.included,
        updates=updates,
        clipped={i: s.clipped for i, s in enumerate(submissions)},
    )


AUDIT_FACTS = StrategyFacts(
    update="adapter update (weighted LoRA-expert deltas, and the gate's)",
    releases_routing=False,
    coordinator_sees="; per expert, how many institutions trained it in a round (never which)",
)
"""What DDOME releases and its coordinator sees, for the privacy report (own adapters: no
routing statistics)."""
