"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

Pure protocol code (no sockets, files or torch): SecAgg+ pairwise masking with dropout
recovery (Bonawitz et al. 2017; Bell et al. 2020) as client/server state machines, and CKKS
homomorphic aggregation (TenSEAL) in :mod:`secagg.ckks`. :func:`run_local` drives a whole
masked round in one process.
"""

from secagg.client import SecAggClient
from secagg.codec import FixedPointCodec
from secagg.errors import BadSignature
from secagg.errors import ConfigError
from secagg.errors import DecryptionError
from secagg.errors import DuplicateMessage
from secagg.errors import InconsistentShares
from secagg.errors import InvalidAccusation
from secagg.errors import InvalidShare
from secagg.errors import MalformedMessage
from secagg.errors import ProtocolError
from secagg.errors import RefusedRequest
from secagg.errors import SecAggError
from secagg.errors import TooFewSurvivors
from secagg.errors import UnknownParty
from secagg.errors import WrongRound
from secagg.errors import WrongStage
from secagg.graph import default_neighbours
from secagg.graph import neighbour_graph
from secagg.local import LocalResult
from secagg.local import run_local
from secagg.messages import RoundParams
from secagg.messages import Stage
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
