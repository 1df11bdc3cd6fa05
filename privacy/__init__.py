"""Differential privacy for sealmoe: DP-SGD on adapters, accounting, the budget, gradient checks.

A leaf package: imports nothing from clients/secagg/coordinator/audit and does no I/O. Importing
it imports nothing: each name loads its module on first use (the DP-SGD front door pulls in
torch and Opacus, the accountants dp-accounting), so the commands that only read configs and
keys start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from privacy.accountant import calibrate_noise
    from privacy.accountant import dp_sgd_event
    from privacy.accountant import epsilon
    from privacy.accountant import make_accountant
    from privacy.budget import Composition
    from privacy.budget import Epsilons
    from privacy.budget import PrivacyBudget
    from privacy.budget import plan_dp_sgd
    from privacy.config import DPConfig
    from privacy.dpsgd import LOSS_REDUCTION
    from privacy.dpsgd import PrivateTraining
    from privacy.dpsgd import make_private
    from privacy.dpsgd import reduce_per_sample_loss
    from privacy.errors import AlreadyReleased
    from privacy.errors import BudgetExceeded
    from privacy.errors import CalibrationError
    from privacy.errors import PerSampleGradientError
    from privacy.errors import PrivacyConfigError
    from privacy.errors import PrivacyError
    from privacy.errors import ReleaseRefused
    from privacy.errors import UserError
    from privacy.events import DPTrainingFacts
    from privacy.gaussian import GaussianMechanism
    from privacy.gaussian import poisson_sample
    from privacy.gradcheck import GradCheckReport
    from privacy.gradcheck import ParameterCheck
    from privacy.gradcheck import assert_per_sample_gradients
    from privacy.gradcheck import check_per_sample_gradients
    from privacy.head import LedgerHead
    from privacy.release import ADAPTER_UPDATE
    from privacy.release import AFFINITY_SCORES
    from privacy.release import EXPERT_CHOICE
    from privacy.release import EXPERT_KEYS
    from privacy.release import ROUTING_STATISTICS
    from privacy.release import VALIDATION_SIGNAL
    from privacy.release import Release

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
