"""The public facts of a federation run that its privacy report cites, from the config.

The coordinator writes them into the run directory when a run starts
(:func:`audit.context.context_bytes`), so a report can be produced later from the run alone.
"""

from __future__ import annotations

from audit.context import FederationFacts, InstitutionFacts, software_versions
from clients.contract.config import FederationConfig
from clients.contract.keys import ROSTER_FILE


def audit_facts(config: FederationConfig) -> FederationFacts:
    """The public facts about ``config``'s run that its privacy report cites."""
    from coordinator.strategies.registry import strategy_facts  # lazy: imports torch

    threshold, neighbours = config.secagg.resolved(len(config.institutions))
    return FederationFacts(
        federation=config.federation.name,
        rounds=config.federation.rounds,
        spare_rounds=config.privacy.spare_rounds,
        institutions=[
            InstitutionFacts(
                name=name,
                budget_epsilon=config.budget(name).target_epsilon,
                budget_delta=config.budget(name).target_delta,
                weight=config.institution(name).weight,
            )
            for name in config.institution_names
        ],
        block_len=config.data.block_len,
        local_steps=config.training.local_steps,
        batch_size=config.training.batch_size,
        max_grad_norm=config.privacy.max_grad_norm,
        accountant=config.privacy.accountant,
        routing_noise_multiplier=config.privacy.routing_noise_multiplier,
        expert_updates=config.aggregation.expert_updates,
        routing_statistics=config.aggregation.routing_statistics,
        secagg_threshold=threshold,
        secagg_neighbours=neighbours,
        secagg_check_survivors=config.secagg.check_survivors,
        roster=str(config.keys_dir / ROSTER_FILE),
        strategy=config.aggregation.strategy,
        strategy_facts=strategy_facts(config.aggregation.strategy),
        software=software_versions(),
    )
