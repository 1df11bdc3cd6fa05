"""Differential privacy for sealmoe: DP-SGD on adapters, accounting, the budget, gradient checks.

A leaf package: imports nothing from clients/secagg/coordinator/audit and does no I/O. Importing
it imports nothing: each name loads its module on first use (the DP-SGD front door pulls in
torch and Opacus, the accountants dp-accounting), so the commands that only read configs and
keys start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privacy.accountant import calibrate_noise, dp_sgd_event, epsilon, make_accountant
    from privacy.budget import Composition, Epsilons, PrivacyBudget, plan_dp_sgd
    from privacy.config import DPConfig
    from privacy.dpsgd import LOSS_REDUCTION, PrivateTraining, make_private, reduce_per_sample_loss
    from privacy.errors import (
        AlreadyReleased,
        BudgetExceeded,
        CalibrationError,
        PerSampleGradientError,
        PrivacyConfigError,
        PrivacyError,
        ReleaseRefused,
        UserError,
    )
    from privacy.events import DPTrainingFacts
    from privacy.gaussian import GaussianMechanism, poisson_sample
    from privacy.gradcheck import (
        GradCheckReport,
        ParameterCheck,
        assert_per_sample_gradients,
        check_per_sample_gradients,
    )
    from privacy.head import LedgerHead
    from privacy.release import (
        ADAPTER_UPDATE,
        AFFINITY_SCORES,
        EXPERT_CHOICE,
        EXPERT_KEYS,
        ROUTING_STATISTICS,
        VALIDATION_SIGNAL,
        Release,
    )

_EXPORTS = {
    "ADAPTER_UPDATE": "privacy.release",
    "AFFINITY_SCORES": "privacy.release",
    "AlreadyReleased": "privacy.errors",
    "BudgetExceeded": "privacy.errors",
    "CalibrationError": "privacy.errors",
    "Composition": "privacy.budget",
    "DPConfig": "privacy.config",
    "DPTrainingFacts": "privacy.events",
    "EXPERT_CHOICE": "privacy.release",
    "EXPERT_KEYS": "privacy.release",
    "Epsilons": "privacy.budget",
    "GaussianMechanism": "privacy.gaussian",
    "GradCheckReport": "privacy.gradcheck",
    "LOSS_REDUCTION": "privacy.dpsgd",
    "LedgerHead": "privacy.head",
    "ParameterCheck": "privacy.gradcheck",
    "PerSampleGradientError": "privacy.errors",
    "PrivacyBudget": "privacy.budget",
    "PrivacyConfigError": "privacy.errors",
    "PrivacyError": "privacy.errors",
    "PrivateTraining": "privacy.dpsgd",
    "ROUTING_STATISTICS": "privacy.release",
    "Release": "privacy.release",
    "ReleaseRefused": "privacy.errors",
    "UserError": "privacy.errors",
    "VALIDATION_SIGNAL": "privacy.release",
    "assert_per_sample_gradients": "privacy.gradcheck",
    "calibrate_noise": "privacy.accountant",
    "check_per_sample_gradients": "privacy.gradcheck",
    "dp_sgd_event": "privacy.accountant",
    "epsilon": "privacy.accountant",
    "make_accountant": "privacy.accountant",
    "poisson_sample": "privacy.gaussian",
    "make_private": "privacy.dpsgd",
    "plan_dp_sgd": "privacy.budget",
    "reduce_per_sample_loss": "privacy.dpsgd",
}


def __getattr__(name: str) -> Any:
    """Each exported name, imported from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'privacy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ADAPTER_UPDATE",
    "AFFINITY_SCORES",
    "EXPERT_CHOICE",
    "EXPERT_KEYS",
    "LOSS_REDUCTION",
    "ROUTING_STATISTICS",
    "VALIDATION_SIGNAL",
    "AlreadyReleased",
    "BudgetExceeded",
    "CalibrationError",
    "Composition",
    "DPConfig",
    "DPTrainingFacts",
    "Epsilons",
    "GaussianMechanism",
    "GradCheckReport",
    "LedgerHead",
    "ParameterCheck",
    "PerSampleGradientError",
    "PrivacyBudget",
    "PrivacyConfigError",
    "PrivacyError",
    "PrivateTraining",
    "Release",
    "ReleaseRefused",
    "UserError",
    "assert_per_sample_gradients",
    "calibrate_noise",
    "check_per_sample_gradients",
    "dp_sgd_event",
    "epsilon",
    "make_accountant",
    "make_private",
    "plan_dp_sgd",
    "poisson_sample",
    "reduce_per_sample_loss",
]
