"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

Pure protocol code (no sockets, files or torch): SecAgg+ pairwise masking with dropout
recovery (Bonawitz et al. 2017; Bell et al. 2020) as client/server state machines, and CKKS
homomorphic aggregation (TenSEAL) in :mod:`secagg.ckks`. :func:`run_local` drives a whole
masked round in one process.
"""

from secagg.client import SecAggClient
from secagg.codec import FixedPointCodec
from secagg.errors import (
    BadSignature,
    ConfigError,
    DecryptionError,
    DuplicateMessage,
    InconsistentShares,
    InvalidAccusation,
    InvalidShare,
    MalformedMessage,
    ProtocolError,
    RefusedRequest,
    SecAggError,
    TooFewSurvivors,
    UnknownParty,
    WrongRound,
    WrongStage,
)
from secagg.graph import default_neighbours, neighbour_graph
from secagg.local import LocalResult, run_local
from secagg.messages import RoundParams, Stage
from secagg.server import SecAggServer

__all__ = [
    "BadSignature",
    "ConfigError",
    "DecryptionError",
    "DuplicateMessage",
    "FixedPointCodec",
    "InconsistentShares",
    "InvalidAccusation",
    "InvalidShare",
    "LocalResult",
    "MalformedMessage",
    "ProtocolError",
    "RefusedRequest",
    "RoundParams",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "Stage",
    "TooFewSurvivors",
    "UnknownParty",
    "WrongRound",
    "WrongStage",
    "default_neighbours",
    "neighbour_graph",
    "run_local",
]
