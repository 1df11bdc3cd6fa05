"""The SecAgg+ neighbour graph: a k-regular graph on a round's clients from a public seed.

In SecAgg+ (Bell et al. 2020) each client masks with, and shares its secrets among, only its
neighbours in a sparse random graph, instead of all other clients. The graph is the Harary graph
H(k, n) laid over a pseudo-random ordering of the clients: every client is linked to the k//2
nearest clients on each side of a ring and, when k is odd, to the client opposite it. The
ordering is a Fisher-Yates shuffle driven by the AES-CTR keystream of the public round seed, so
every party computes the same graph and no party chooses it. k = n - 1 is the complete graph
(plain SecAgg).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

from secagg.errors import ConfigError
from secagg.prg import SEED_BYTES
from secagg.prg import expand

_DOMAIN = b"sealmoe/secagg/neighbour-graph/v1"
_WORD = 1 << 64


def _words(seed: bytes) -> Iterator[int]:
    """Endless 64-bit words of the keystream of a key derived from ``seed`` for this use only."""
    key = hashlib.sha256(_DOMAIN + seed).digest()
    length = 64
    start = 0
    while True:
        # CTR keystreams are prefix-consistent, so a longer expansion continues the same stream.
        block = expand(key, length, np.uint64).tolist()
        yield from block[start:]
        start, length = length, 2 * length


def _shuffled(items: list[int], seed: bytes) -> list[int]:
    """Fisher-Yates shuffle with unbiased (rejection-sampled) indices from the seed's keystream."""
    words = _words(seed)
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        bound = i + 1
        limit = _WORD - _WORD % bound  # accept words below a multiple of bound: no modulo bias
        word = next(words)
        while word >= limit:
            word = next(words)
        j = word % bound
        out[i], out[j] = out[j], out[i]
    return out


def neighbour_graph(client_ids: Sequence[int], k: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Each client's ``k`` neighbours (never itself) in the graph drawn from the public ``seed``.

    The result does not depend on the order of ``client_ids``. Raises ConfigError when no
    k-regular graph on these clients exists or the inputs are malformed.
    """
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        got = len(seed) if isinstance(seed, bytes) else type(seed).__name__
        raise ConfigError(f"graph seed must be {SEED_BYTES} bytes, got {got}")
    ids = list(client_ids)
    for cid in ids:
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise ConfigError(f"client ids must be integers, got {cid!r}")
    if len(set(ids)) != len(ids):
        raise ConfigError("client ids must be distinct; remove the duplicate ids")
    n = len(ids)
    if n < 2:
        raise ConfigError(f"a neighbour graph needs at least 2 clients, got {n}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n - 1:
        raise ConfigError(f"number of neighbours must be in [1, {n - 1}] for {n} clients, got {k}")
    if k % 2 == 1 and n % 2 == 1:
        raise ConfigError(
            f"no {k}-regular graph on {n} clients (odd times odd); "
            "choose an even number of neighbours"
        )

    order = _shuffled(sorted(ids), seed)
    half = range(1, k // 2 + 1)
    offsets = [*half, *(-d for d in half)]
    if k % 2 == 1:
        offsets.append(n // 2)
    graph = {order[i]: frozenset(order[(i + off) % n] for off in offsets) for i in range(n)}
    return {cid: graph[cid] for cid in sorted(graph)}


def default_neighbours(n: int) -> int:
    """SecAgg+'s O(log n) neighbour count for ``n`` clients: ``min(2 * ceil(log2 n), n - 1)``.

    Bell et al. 2020 show that a random graph of logarithmic degree keeps the honest clients
    connected and each client's secrets safe against a bounded fraction of corrupt or dropped
    clients; 2 * ceil(log2 n) is a simple such degree (10 clients -> 8, 100 -> 14, 1000 -> 20).
    It is even, so the graph exists for any n; when it reaches n - 1 the graph is complete
    (plain SecAgg), which exists for every n.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ConfigError(f"a neighbour graph needs at least 2 clients, got {n!r}")
    return min(2 * (n - 1).bit_length(), n - 1)


def active_threshold(holders: int) -> int:
    """Smallest threshold safe against an active server: more than 2/3 of the share holders.

    Bonawitz et al. 2017 (section 6) need t > 2n/3 on the complete graph when the server may
    deviate: two sets of t holders then overlap in more than n/3 parties, so a server that
    colludes with fewer than 2t - n clients cannot get both of a client's secrets or two
    conflicting survivor sets signed. SecAgg+ applies the same count to each closed
    neighbourhood of ``holders = k + 1`` parties (see docs/security.md).
    """
    return 2 * holders // 3 + 1


def survivor_quorum(n: int, neighbours: int, threshold: int) -> int:
    """Signatures a survivor set needs before any client reveals a share for it.

    On the complete graph the threshold itself (t > 2n/3 makes two signed sets impossible).
    On a sparse graph t is local, so t signers elsewhere could vouch for a second set: the
    set must also be signed by more than 2/3 of the round, so at most one set is ever signed.
    """
    if neighbours >= n - 1:
        return threshold
    return max(threshold, active_threshold(n))
