"""The public facts of a federation run that its privacy report cites, from the config.

The coordinator writes them into the run directory when a run starts
(:func:`audit.context.context_bytes`), so a report can be produced later from the run alone.
"""

from __future__ import annotations

from audit.context import FederationFacts
from audit.context import InstitutionFacts
from audit.context import ModelFacts
from audit.context import software_versions
from audit.context import source_commit
from clients.contract.config import FederationConfig
from clients.contract.keys import ROSTER_FILE
from clients.models.locate import locate_model
from clients.models.locate import weights_sha256
from privacy.errors import UserError


def base_model_facts(config: FederationConfig) -> ModelFacts:
    """The base model of ``config`` with the SHA-256 of its weight files, hashed now (at run
    start) from the folder :func:`~clients.models.locate.locate_model` finds."""
    model = config.model
    facts = {"name": model.name, "revision": model.revision, "dtype": model.dtype}
    try:
        folder = locate_model(model.name, model.revision)
    except UserError as exc:
        return ModelFacts(**facts, note=f"not hashed: the coordinator cannot find it ({exc})")
    if folder is None:
        return ModelFacts(
            **facts, note=f"built-in random model, rebuilt from seed {config.federation.seed}"
        )
    return ModelFacts(
        **facts, sha256=weights_sha256(folder), note="SHA-256 over the weight files, in name order"
    )


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
        routing_sample_rate=config.privacy.routing_sample_rate,
        expert_updates=config.aggregation.expert_updates,
        routing_statistics=config.aggregation.routing_statistics,
        secagg_threshold=threshold,
        secagg_neighbours=neighbours,
        secagg_check_survivors=config.secagg.check_survivors,
        roster=str(config.keys_dir / ROSTER_FILE),
        strategy=config.aggregation.strategy,
        strategy_facts=strategy_facts(config.aggregation.strategy),
        software=software_versions(),
        base_model=base_model_facts(config),
        git_commit=source_commit(),
        train_records_cap=config.data.max_blocks.train,
    )
