"""Differential privacy for sealmoe: DP-SGD on adapters, accounting, per-sample gradient checks.

A leaf package: imports nothing from clients/secagg/coordinator/audit and does no I/O.
"""

from privacy.accountant import calibrate_noise, dp_sgd_event, epsilon, make_accountant
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
)
from privacy.events import DPTrainingFacts
from privacy.gaussian import GaussianMechanism
from privacy.gradcheck import (
    GradCheckReport,
    ParameterCheck,
    assert_per_sample_gradients,
    check_per_sample_gradients,
)
from privacy.release import (
    ADAPTER_UPDATE,
    AFFINITY_SCORES,
    EXPERT_KEYS,
    ROUTING_STATISTICS,
    Release,
)

__all__ = [
    "ADAPTER_UPDATE",
    "AFFINITY_SCORES",
    "EXPERT_KEYS",
    "LOSS_REDUCTION",
    "ROUTING_STATISTICS",
    "AlreadyReleased",
    "BudgetExceeded",
    "CalibrationError",
    "DPConfig",
    "DPTrainingFacts",
    "GaussianMechanism",
    "GradCheckReport",
    "ParameterCheck",
    "PerSampleGradientError",
    "PrivacyConfigError",
    "PrivacyError",
    "PrivateTraining",
    "Release",
    "ReleaseRefused",
    "assert_per_sample_gradients",
    "calibrate_noise",
    "check_per_sample_gradients",
    "dp_sgd_event",
    "epsilon",
    "make_accountant",
    "make_private",
    "reduce_per_sample_loss",
]
