"""The privacy plan of a federation, before any training and without loading model weights.

Per institution: its training records, the Poisson sampling rate and the DP-SGD steps of the
whole plan (spare rounds included), the noise multiplier that spends its budget under the
enforcing accountant, epsilon of that plan under PLD and RDP, and whether the noise can be
beaten. The last is the expected noise-to-signal ratio of the averaged noisy gradient: every
clipped per-record gradient has norm at most C, the noise added to their sum has norm about
sigma C sqrt(d) over d trainable parameters, and the sum is divided by the expected batch
q N, so one step's ratio is sigma sqrt(d) / (q N); over T steps the signal adds up T times and
independent noise sqrt(T) times, so the plan's ratio is that over sqrt(T).

The thresholds for "cannot learn" come from two measured runs on the Shakespeare partition
with SmolLM2 (issue 15): a plan ratio near 94 left test perplexity where it was; one near 10
lowered it by 26-28 %. They are a rule of thumb, not a guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clients.contract.config import FederationConfig
from clients.data.sources import institution_data
from clients.models.build import build_tokenizer
from clients.models.build import trainable_parameter_count
from clients.strategies.registry import client_half
from privacy import dp_sgd_event
from privacy import epsilon
from privacy import plan_dp_sgd

CANNOT_LEARN = 30.0
"""Plan noise-to-signal ratio above which the plan is reported as unlikely to learn."""


SLOW = 10.0
"""Ratio above which learning is reported as slow."""


@dataclass(frozen=True)
class InstitutionPlan:
    """One institution's DP-SGD plan for the whole federation."""

    name: str
    records: int
    batch_size: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    epsilon_pld: float
    epsilon_rdp: float
    budget_epsilon: float
    delta: float
    trainable_parameters: int

    @property
    def step_noise_to_signal(self) -> float:
        """Noise norm over the largest signal norm of one step's averaged gradient."""
        expected_batch = self.sample_rate * self.records
        return self.noise_multiplier * math.sqrt(self.trainable_parameters) / expected_batch

    @property
    def noise_to_signal(self) -> float:
        """The same over the whole plan: signal adds up linearly, independent noise as sqrt."""
        return self.step_noise_to_signal / math.sqrt(self.steps)

    def verdict(self) -> str:
        """ "can learn", "slow" or "cannot learn", from :data:`SLOW` and :data:`CANNOT_LEARN`."""
        if self.noise_to_signal > CANNOT_LEARN:
            return "cannot learn"
        return "slow" if self.noise_to_signal > SLOW else "can learn"

    def suggestions(self) -> list[str]:
        """Concrete changes that lower the ratio, for a plan that is not expected to learn."""
        if self.verdict() == "can learn":
            return []
        return [
            f"more records: {self.records} training records; the ratio falls about as 1/N",
            f"a larger logical batch: batch_size={self.batch_size} (q={self.sample_rate:.3g}); "
            "the ratio falls about as 1/sqrt(batch) at a fixed budget",
            f"fewer rounds or local steps: {self.steps} DP-SGD steps in the plan",
            f"fewer trainable parameters: {self.trainable_parameters:,} (lower [model.moe] rank, "
            "fewer target_modules or experts); the ratio grows as sqrt(parameters)",
        ]


def privacy_plan(config: FederationConfig) -> list[InstitutionPlan]:
    """Every institution's plan, as its runtime will calibrate it."""
    half = client_half(config)
    tokenizer = build_tokenizer(config)
    trainable = trainable_parameter_count(config, lambda model: half.attach(model, config))
    train = config.training
    rounds = config.federation.rounds + config.privacy.spare_rounds
    per_round = half.round_releases(config)
    plans = []
    for name in config.institution_names:
        records = int(institution_data(config, name, tokenizer)["train"].shape[0])
        sample_rate = min(1.0, train.batch_size / records)
        dp = plan_dp_sgd(
            config.dp_config(name),
            sample_rate=sample_rate,
            steps_per_round=train.local_steps,
            rounds=rounds,
            per_round=per_round,
        )
        sigma = dp.require_noise_multiplier()
        steps = rounds * train.local_steps
        events = [dp_sgd_event(sigma, sample_rate, steps)]
        events += [e for e in per_round for _ in range(rounds)]
        budget = config.budget(name)
        plans.append(
            InstitutionPlan(
                name=name,
                records=records,
                batch_size=train.batch_size,
                sample_rate=sample_rate,
                steps=steps,
                noise_multiplier=sigma,
                epsilon_pld=epsilon(events, budget.target_delta, "pld"),
                epsilon_rdp=epsilon(events, budget.target_delta, "rdp"),
                budget_epsilon=budget.target_epsilon,
                delta=budget.target_delta,
                trainable_parameters=trainable,
            )
        )
    return plans
