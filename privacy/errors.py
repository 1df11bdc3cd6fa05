"""Typed errors of the privacy package.

Every error raised on bad input is a subclass of :class:`PrivacyError`; configuration errors
are also ``ValueError`` and name the field to change.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user fixes in their setup (a config, key or ledger file, a budget, an
    argument): the ``sealmoe`` command reports it in one line, without a traceback. Every
    package's errors of that kind derive from it; it lives in this leaf because every package
    that raises one may import ``privacy``."""


class PrivacyError(Exception):
    """Base class of every error raised by :mod:`privacy`."""


class PrivacyConfigError(PrivacyError, UserError, ValueError):
    """A privacy parameter is missing, out of range or inconsistent (the message names it)."""


class CalibrationError(PrivacyError, UserError, ValueError):
    """No noise multiplier reaches the requested (epsilon, delta) for the planned steps."""


class PerSampleGradientError(PrivacyError):
    """The per-sample gradients the DP path clips disagree with a brute-force computation."""


class ReleaseRefused(PrivacyError):
    """A ledger refused a release before anything left (the refusal itself is recorded)."""


class BudgetExceeded(ReleaseRefused):
    """Charging the releases would take the institution past its (epsilon, delta) budget."""

    def __init__(self, spent: float, projected: float, budget: float, delta: float) -> None:
        self.spent, self.projected, self.budget, self.delta = spent, projected, budget, delta
        super().__init__(
            f"privacy budget exhausted: spent epsilon={spent:.4g}, this release would bring it "
            f"to {projected:.4g}, budget is epsilon={budget:.4g} at delta={delta:g}"
        )


class AlreadyReleased(ReleaseRefused):
    """This round id already has a recorded release of that kind; another would go uncharged."""
