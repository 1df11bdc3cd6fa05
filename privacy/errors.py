"""Typed errors of the privacy package.

Every error raised on bad input is a subclass of :class:`PrivacyError`; configuration errors
are also ``ValueError`` and name the field to change.
"""

from __future__ import annotations


class PrivacyError(Exception):
    """Base class of every error raised by :mod:`privacy`."""


class PrivacyConfigError(PrivacyError, ValueError):
    """A privacy parameter is missing, out of range or inconsistent (the message names it)."""


class CalibrationError(PrivacyError, ValueError):
    """No noise multiplier reaches the requested (epsilon, delta) for the planned steps."""


class PerSampleGradientError(PrivacyError):
    """The per-sample gradients the DP path clips disagree with a brute-force computation."""
