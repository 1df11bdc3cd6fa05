"""Joins ``clients`` and ``audit``, which may not import each other: an institution's signed
ledger (:class:`audit.Ledger`) injected into :class:`clients.runtime.institution.Institution`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from audit import Ledger
from audit import ledger_path
from clients.contract.config import FederationConfig
from clients.contract.keys import load_institution_keys

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
    from clients.runtime.institution import Institution  # lazy: imports torch and the model code

    return Institution(config, name, ledger=open_ledger(config, name))
