"""Per-peer receive caps sized to the messages a federation's rounds really carry.

Both ends know, before the first round, what the largest legitimate message from the other end
can be: the round layout fixes the SecAgg+ masked vector (``layout.length("mask")`` ring
elements of ``[secagg] modulus_bits / 8`` bytes) and the number of CKKS ciphertexts
(``layout.length("ckks")`` values over ``poly_modulus_degree / 2`` slots); the adapters fix the
global state the coordinator broadcasts (safetensors, or one ciphertext per slot-count of values
under CKKS expert updates); the roster size and ``[secagg] neighbours`` fix the SecAgg+ key,
share and unmask messages. :func:`coordinator_caps` sizes what the coordinator takes from each
institution, :func:`institution_caps` what an institution takes from the coordinator.

The receive cap is ``MARGIN_FACTOR * largest + MARGIN_BYTES`` (the margin covers msgpack and
safetensors framing not counted exactly, extras that grow after round 0, and the few bytes a
serialised ciphertext varies by), never above ``[coordinator] max_message_bytes``, which stays
the upper limit and the override, and never below :data:`MIN_CAP_BYTES`. The queued bytes per
peer are :data:`QUEUED_MESSAGES` frames of the largest size libzmq admits (twice the cap, see
:func:`~clients.contract.framing.configure_socket`): a stage's messages from one peer (e.g.
a CKKS input, a masked input, a ledger head and a hello) fit, a flood does not; once the queue
is full libzmq stops reading that peer's connection (TCP back-pressure) and drops nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from clients.contract.config import FederationConfig
from clients.contract.layout import ROUTING
from clients.contract.layout import GlobalState
from clients.contract.layout import SubmissionLayout
from secagg.ckks import CkksParams

MARGIN_FACTOR = 1.25
"""Multiplies the largest expected message (framing not counted exactly, later extras)."""

MARGIN_BYTES = 1 << 20
"""Added on top: room for every small message (hello, ledger head, scores, round end)."""

MIN_CAP_BYTES = 1 << 16
"""The smallest cap (the lowest ``[coordinator] max_message_bytes`` the config accepts)."""

QUEUED_MESSAGES = 4
"""Frames one peer may have waiting in a receive queue."""

SHARE_BYTES = (1 << 12) + 16
"""Wire bound of one encrypted share or unmask share (``secagg.messages.Blob`` + framing)."""

SMALL_ITEM_BYTES = 256
"""Upper bound of one advertisement, survivor signature, revealed seed or client id entry."""

TENSOR_HEADER_BYTES = 256
"""Upper bound of one safetensors header entry besides its name (dtype, shape, offsets)."""


@dataclass(frozen=True)
class MessageCaps:
    """What one endpoint accepts from each peer: ``max_message_bytes`` per frame and
    ``max_queued_bytes`` waiting in its receive queue; ``largest`` is the largest message it
    expects (before the margin) and ``what`` names it, for the start-up log line."""

    max_message_bytes: int
    max_queued_bytes: int
    largest: int
    what: str

    def describe(self) -> str:
        """One log-friendly line."""
        return (
            f"receive cap {self.max_message_bytes} bytes per message, {self.max_queued_bytes} "
            f"bytes queued per peer (largest expected: {self.what}, {self.largest} bytes)"
        )


@functools.lru_cache(maxsize=8)
def ckks_ciphertext_bytes(params: CkksParams) -> int:
    """Bytes of one serialised fresh CKKS ciphertext under ``params``, measured once.

    Measured rather than computed: TenSEAL serialises through SEAL with its compression on, so
    the size depends on SEAL's serialisation format and compression, not only on
    ``2 * poly_modulus_degree * len(data primes) * 8``; encrypting one full vector of random
    values with a real context of these parameters (no keys beyond the secret one, about a
    hundred milliseconds) gives the size the wire will see. The larger of a fresh ciphertext and a
    sum of two is taken (a sum serialises slightly larger); the encrypted global state is smaller
    (a plaintext product drops one level).
    """
    import tenseal as ts  # the measurement only; loaded once per parameter set

    ctx = params._context()
    values = np.random.default_rng(0).uniform(-1.0, 1.0, params.slot_count).tolist()
    fresh = ts.ckks_vector(ctx, values)
    summed = fresh + ts.ckks_vector(ctx, values)  # a sum serialises a few hundred bytes larger
    return max(len(fresh.serialize()), len(summed.serialize()))


def _ciphertexts(values: int, params: CkksParams) -> int:
    return -(-values // params.slot_count)


def _caps(config: FederationConfig, candidates: Mapping[str, int]) -> MessageCaps:
    what, largest = max(candidates.items(), key=lambda item: item[1])
    cap = math.ceil(MARGIN_FACTOR * largest) + MARGIN_BYTES
    cap = max(MIN_CAP_BYTES, min(cap, config.coordinator.max_message_bytes))
    return MessageCaps(cap, QUEUED_MESSAGES * 2 * cap, largest, what)


def _round_sizes(config: FederationConfig) -> tuple[int, int]:
    """(institutions, neighbours) of the largest round the config allows."""
    n = len(config.institutions)
    return n, min(config.secagg.resolved(n)[1], max(n - 1, 1))


def coordinator_caps(config: FederationConfig, layout: SubmissionLayout) -> MessageCaps:
    """What the coordinator accepts from each institution, given the round's ``layout``:
    the masked input, the CKKS input, and the SecAgg+ share and unmask messages."""
    n, k = _round_sizes(config)
    candidates = {
        "masked input": layout.length("mask") * config.secagg.modulus_bits // 8
        + k * SMALL_ITEM_BYTES,
        "encrypted shares": k * SHARE_BYTES,
        # shares of b_v or s_v for the roster, and a 32-byte seed per dropped neighbour
        "unmask shares": 2 * n * SHARE_BYTES + k * SMALL_ITEM_BYTES,
    }
    if layout.length("ckks"):
        params = config.aggregation.ckks.params()
        count = _ciphertexts(layout.length("ckks"), params)
        candidates["CKKS input"] = (
            count * ckks_ciphertext_bytes(params) + len(layout.segments) * SMALL_ITEM_BYTES
        )
    return _caps(config, candidates)


def institution_caps(
    config: FederationConfig,
    state: GlobalState,
    layout: SubmissionLayout,
    extras_shapes: Mapping[str, tuple[int, ...]],
) -> MessageCaps:
    """What an institution accepts from the coordinator, given the round-0 ``state`` (its
    adapters fix the global state's size), the ``layout`` and the shapes of the strategy's
    extras: the round start (or the goodbye) with the global state, plain or encrypted, last
    round's routing and the extras, and the SecAgg+ key roster, relayed shares and unmask
    request."""
    n, k = _round_sizes(config)
    aggregation = config.aggregation
    params = aggregation.ckks.params() if "ckks" in (
        aggregation.expert_updates, aggregation.routing_statistics,
    ) else None  # fmt: skip
    adapter_values = sum(int(t.numel()) for t in state.adapters.values())
    plain = sum(
        int(t.numel()) * t.element_size() + len(name) + TENSOR_HEADER_BYTES
        for name, t in state.adapters.items()
    )
    if aggregation.expert_updates == "ckks" and params is not None:
        encrypted = _ciphertexts(adapter_values, params) * ckks_ciphertext_bytes(params)
        global_bytes = max(plain, encrypted + len(state.adapters) * SMALL_ITEM_BYTES)
    else:
        global_bytes = plain
    routing = layout[ROUTING].length if ROUTING in layout else 0
    if routing and layout[ROUTING].channel == "ckks" and params is not None:
        routing_bytes = (_ciphertexts(routing, params) + 1) * ckks_ciphertext_bytes(params)
    else:
        routing_bytes = 8 * routing
    extras = sum(
        8 * math.prod(shape) + len(name) + TENSOR_HEADER_BYTES
        for name, shape in extras_shapes.items()
    )
    broadcast = global_bytes + routing_bytes + extras + n * SMALL_ITEM_BYTES
    candidates = {
        "round start": broadcast,
        "relayed shares": k * SHARE_BYTES,
        "key roster": (k + 1) * SMALL_ITEM_BYTES,
        "unmask request": 3 * n * SMALL_ITEM_BYTES,
    }
    return _caps(config, candidates)
