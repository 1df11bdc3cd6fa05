"""Typed errors of the secure-aggregation engine.

Every error raised on bad input or a protocol violation is a subclass of :class:`SecAggError`,
so a transport can catch one type, log it and keep serving the honest parties.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every error raised by :mod:`secagg`."""


class ConfigError(SecAggError, ValueError):
    """A parameter choice is unusable or unsafe (the message names the knob to change)."""


class MalformedMessage(SecAggError, ValueError):
    """Bytes that do not decode to a valid message, or a message with out-of-range fields."""


class ProtocolError(SecAggError):
    """A well-formed message that violates the protocol (wrong round, stage, sender, ...)."""


class WrongRound(ProtocolError):
    """A message that belongs to another round (a replay, or a confused peer)."""


class WrongStage(ProtocolError):
    """A message that arrives at a stage where it is not expected."""


class DuplicateMessage(ProtocolError):
    """A second message from the same sender for the same stage."""


class UnknownParty(ProtocolError):
    """A sender or recipient id that is not part of this round."""


class BadSignature(ProtocolError):
    """A signature that does not verify under the party's registered identity key."""


class RefusedRequest(ProtocolError):
    """A client refuses a request that would let the server learn an individual input."""


class DecryptionError(ProtocolError):
    """An encrypted share that fails authentication (tampered or misaddressed)."""


class InvalidAccusation(ProtocolError):
    """An accusation the server cannot accept: the sender itself, a party outside the round or
    outside the sender's neighbours that shared keys, a repeated id, or too many ids."""


class TooFewSurvivors(SecAggError):
    """Fewer clients than the threshold remain, so no sum can be released."""


class InconsistentShares(TooFewSurvivors):
    """Unmasking shares that do not lie on one sharing polynomial and cannot be corrected.

    No sum is released; a subclass of :class:`TooFewSurvivors` so that callers end the round
    the same way (too few trustworthy shares remain).
    """


class InvalidShare(DecryptionError):
    """A relayed share that does not decrypt or parse; ``sender`` names the party that sent it.

    The client does not abort on it: it accuses ``sender`` in its masked input instead.
    """

    def __init__(self, message: str, *, sender: int) -> None:
        super().__init__(message)
        self.sender = sender
