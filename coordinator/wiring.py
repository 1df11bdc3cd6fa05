"""Builds an institution with the parts ``clients`` may not import: its ``audit`` ledger.

``clients`` and ``audit`` do not know each other; the coordinator package, which may import
both, opens the institution's signed ledger and injects it into
:class:`clients.runtime.Institution`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from audit import Ledger, ledger_path
from clients.config import FederationConfig
from clients.keys import load_institution_keys

if TYPE_CHECKING:
    from clients.runtime import Institution


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
    """Institution ``name`` of ``config``, ready to :meth:`~clients.runtime.Institution.run`."""
    from clients.runtime import Institution  # lazy: imports torch and the model code

    return Institution(config, name, ledger=open_ledger(config, name))
