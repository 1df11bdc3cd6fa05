"""Joins ``clients`` and ``audit``, which may not import each other.

The coordinator package may import both: it opens an institution's signed ledger and injects
it into :class:`clients.runtime.institution.Institution`, and turns a federation config into the
public facts (:class:`audit.context.FederationFacts`) that a privacy report cites.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from audit import Ledger, ledger_path
from audit.context import FederationFacts, InstitutionFacts, software_versions
from clients.contract.config import FederationConfig
from clients.contract.keys import ROSTER_FILE, load_institution_keys

if TYPE_CHECKING:
    from clients.runtime.institution import Institution


def open_ledger(config: FederationConfig, name: str) -> Ledger:
    """Institution ``name``'s ledger in the run directory, signing with its identity key."""
    budget = config.budget(name)
    return Ledger(
        ledger_path(config.run_dir, name),
        institution=name,
        identity=load_institution_keys(config.keys_dir, name).identity,
        budget_epsilon=budget.target_epsilon,
        delta=budget.target_delta,
        accountant=config.privacy.accountant,
    )


def make_institution(config: FederationConfig, name: str) -> Institution:
    """Institution ``name`` of ``config``, ready to
    :meth:`~clients.runtime.institution.Institution.run`."""
    from clients.runtime.institution import (
        Institution,  # lazy: imports torch and the model code
    )

    return Institution(config, name, ledger=open_ledger(config, name))


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
