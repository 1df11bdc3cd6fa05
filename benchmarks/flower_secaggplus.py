"""Flower's SecAgg+ (flwr 1.42) driven in one process, for the side-by-side benchmark.

Clients run Flower's own client code: the stage functions of
``flwr.client.mod.secure_aggregation.secaggplus_mod`` (``_setup``, ``_share_keys``,
``_collect_masked_vectors``, ``_unmask``) behind the mod's own ``check_stage``/``check_configs``,
on Flower's ``SecAggPlusState``. The server re-creates the four stages of
``flwr.server.workflow.secure_aggregation.SecAggPlusWorkflow`` step by step with Flower's own
primitives (``combine_shares``, ``pseudo_rand_gen``, ``generate_shared_key``, the
``ndarrays_arithmetic`` helpers, ``dequantize``): the workflow class itself needs a live ``Grid``,
a ``LegacyContext`` and a ``Strategy``, which only add transport and FedAvg bookkeeping.

Every message in either direction is a Flower ``ConfigRecord`` encoded to and decoded from
Flower's protobuf (``flwr.common.serde``), as on the wire; the sender's encoding and the
receiver's decoding count in their times, and the encoded sizes are the byte counts. Not
included: gRPC framing, the ``Message``/``RecordDict`` envelopes, the mod's per-call copy of its
state into the ``Context``, and the legacy ``Strategy.aggregate_fit`` call at the end.

Flower's workflow computes a weighted mean ``sum(w_i x_i) / sum(w_i)``; each client here reports
``num_examples = max_weight`` (weight 1), and the server multiplies the mean by the number of
surviving clients to return the sum, as ``secagg.run_local`` does.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from importlib import import_module
from typing import Any
from typing import cast

import numpy as np
from flwr.app import ConfigRecord
from flwr.common import Parameters
from flwr.common import bytes_to_ndarray
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract
from flwr.common.secure_aggregation.ndarrays_arithmetic import get_parameters_shape
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_mod
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_subtraction
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.common.serde import config_record_from_proto
from flwr.common.serde import config_record_to_proto
from flwr.proto.recorddict_pb2 import ConfigRecord as ProtoConfigRecord
from flwr.supercore.primitives.asymmetric import bytes_to_private_key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

# sealmoe's stage names -> Flower's. Flower has no consistency-check stage, and its workflow
# cannot recover a client lost before "collect masked vectors": the survivors' unmask step asks
# for that client's key share, which nobody holds (KeyError in the mod's ``_unmask``).
SUPPORTED_DROPOUT_STAGES = {"masked_input": Stage.COLLECT_MASKED_VECTORS, "unmask": Stage.UNMASK}
MAX_WEIGHT = 1000.0
_FIRST_NODE_ID = 1001
# The package re-exports the mod *function* under the module's name, so fetch the module itself.
fmod = import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")


@dataclass
class FlowerResult:
    """What one in-process Flower SecAgg+ round produced and cost (same fields as run_local's)."""

    sum: np.ndarray
    included: list[int]
    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)


def _encode(values: dict[str, Any]) -> bytes:
    """A ConfigRecord as Flower puts it on the wire (protobuf)."""
    return config_record_to_proto(ConfigRecord(values, False)).SerializeToString()


def _decode(wire: bytes) -> ConfigRecord:
    return config_record_from_proto(ProtoConfigRecord.FromString(wire))


class _Client:
    """One Flower client: the mod's stage dispatch over Flower's SecAggPlusState."""

    def __init__(self, nid: int, vector: np.ndarray, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.state = fmod.SecAggPlusState()
        self.state.nid = nid
        # The ClientApp's training output as Flower hands it to the mod (already serialized).
        self.fit_parameters = Parameters(
            tensors=[ndarray_to_bytes(vector)], tensor_type="numpy.ndarray"
        )
        self.seconds = 0.0
        self.sent = 0
        self.received = 0

    def handle(self, wire_in: bytes) -> bytes:
        """Decode a server message, run the stage the mod would run, encode the reply."""
        start = self.clock()
        configs = _decode(wire_in)
        fmod.check_stage(self.state.current_stage, configs)
        self.state.current_stage = cast(str, configs.pop(Key.STAGE))
        fmod.check_configs(self.state.current_stage, configs)
        stage = self.state.current_stage
        if stage == Stage.SETUP:
            res = fmod._setup(self.state, configs)
        elif stage == Stage.SHARE_KEYS:
            res = fmod._share_keys(self.state, configs)
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            res = fmod._collect_masked_vectors(
                self.state, configs, int(MAX_WEIGHT), self.fit_parameters
            )
        else:
            res = fmod._unmask(self.state, configs)
        wire_out = _encode(res)
        self.seconds += self.clock() - start
        self.received += len(wire_in)
        self.sent += len(wire_out)
        return wire_out


def run_flower_secaggplus(
    inputs: list[np.ndarray],
    *,
    num_shares: int,
    threshold: int,
    dropouts: dict[int, str] | None = None,
    clip: float = 1.0,
    bits: int = 16,
    modulus_bits: int = 32,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> FlowerResult:
    """Run one SecAgg+ round of Flower over ``inputs``; client ``i`` is node ``1001 + i``.

    ``num_shares`` counts the client itself (Flower's neighbourhood is the client plus
    ``num_shares - 1`` ring neighbours); ``threshold`` is Flower's ``reconstruction_threshold``.
    ``dropouts`` maps a client index to "masked_input" or "unmask". Values are quantized to
    ``[0, 2**bits - 1]`` (Flower's ``quantization_range = 2**bits - 1``) in Z_{2**modulus_bits}.
    ``seed`` only orders the ring (Flower's workflow shuffles with Python's ``random``).
    ``clock`` times each party (``time.process_time`` gives CPU seconds).
    """
    dropouts = dict(dropouts or {})
    for idx, stage in dropouts.items():
        if stage not in SUPPORTED_DROPOUT_STAGES:
            raise ValueError(
                f"client {idx}: Flower's SecAgg+ can only lose clients at "
                f"{sorted(SUPPORTED_DROPOUT_STAGES)}, not {stage!r}"
            )
    n = len(inputs)
    if not 3 <= num_shares <= n or (num_shares < n and num_shares % 2 == 0):
        raise ValueError(f"num_shares must be odd and in [3, {n}] (or {n}), got {num_shares}")
    quant_range = (1 << bits) - 1
    mod_range = 1 << modulus_bits
    nids = [_FIRST_NODE_ID + i for i in range(n)]
    clients = {nid: _Client(nid, x, clock) for nid, x in zip(nids, inputs, strict=True)}
    drop_at = {nids[i]: SUPPORTED_DROPOUT_STAGES[s] for i, s in dropouts.items()}
    server_seconds = 0.0

    def exchange(stage: str, outbox: dict[int, bytes]) -> dict[int, ConfigRecord]:
        """Deliver each encoded message; the clients that drop here never answer."""
        nonlocal server_seconds
        replies = {
            nid: clients[nid].handle(wire)
            for nid, wire in outbox.items()
            if drop_at.get(nid) != stage
        }
        start = clock()
        decoded = {nid: _decode(wire) for nid, wire in replies.items()}
        server_seconds += clock() - start
        return decoded

    # Stage 0, setup (SecAggPlusWorkflow.setup_stage): ring neighbourhoods, configs, public keys.
    start = clock()
    order = list(nids)
    random.Random(seed).shuffle(order)  # as Flower's workflow does
    half = num_shares >> 1
    neighbours = {
        nid: {order[(i + off) % n] for off in range(-half, half + 1)} for i, nid in enumerate(order)
    }
    setup = _encode(
        {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: n,
            Key.SHARE_NUMBER: num_shares,
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: float(clip),
            Key.TARGET_RANGE: quant_range,
            Key.MOD_RANGE: mod_range,
            Key.MAX_WEIGHT: MAX_WEIGHT,
        }
    )
    server_seconds += clock() - start
    replies = exchange(Stage.SETUP, dict.fromkeys(nids, setup))
    start = clock()
    public_keys = {
        nid: [cast(bytes, r[Key.PUBLIC_KEY_1]), cast(bytes, r[Key.PUBLIC_KEY_2])]
        for nid, r in replies.items()
    }
    active = set(replies)

    # Stage 1, share keys: each client gets its neighbourhood's public keys.
    outbox = {}
    for nid in active:
        record = {str(v): public_keys[v] for v in neighbours[nid] & active}
        record[Key.STAGE] = Stage.SHARE_KEYS
        outbox[nid] = _encode(record)
    server_seconds += clock() - start
    replies = exchange(Stage.SHARE_KEYS, outbox)
    start = clock()
    active = set(replies)
    fwd_srcs: dict[int, list[int]] = {nid: [] for nid in active}
    fwd_ctxts: dict[int, list[bytes]] = {nid: [] for nid in active}
    for src, r in replies.items():
        for dst, ctxt in zip(r[Key.DESTINATION_LIST], r[Key.CIPHERTEXT_LIST], strict=True):
            if dst in fwd_ctxts:
                fwd_ctxts[dst].append(ctxt)
                fwd_srcs[dst].append(src)

    # Stage 2, collect masked vectors: forward the encrypted shares, sum what comes back.
    outbox = {
        nid: _encode(
            {
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                Key.CIPHERTEXT_LIST: fwd_ctxts[nid],
                Key.SOURCE_LIST: fwd_srcs[nid],
            }
        )
        for nid in active
    }
    server_seconds += clock() - start
    replies = exchange(Stage.COLLECT_MASKED_VECTORS, outbox)
    start = clock()
    sampled = set(nids)
    active = set(replies)
    masked: list[np.ndarray] | None = None
    for r in replies.values():
        vec = [bytes_to_ndarray(b) for b in cast(list[bytes], r[Key.MASKED_PARAMETERS])]
        masked = vec if masked is None else parameters_addition(masked, vec)
    if masked is None:
        raise RuntimeError("no client sent a masked vector")
    masked = parameters_mod(masked, mod_range)

    # Stage 3, unmask: self-mask seeds of survivors, mask keys of the dropped.
    dead = sampled - active
    outbox = {
        nid: _encode(
            {
                Key.STAGE: Stage.UNMASK,
                Key.ACTIVE_NODE_ID_LIST: list(neighbours[nid] & active),
                Key.DEAD_NODE_ID_LIST: list(neighbours[nid] & dead),
            }
        )
        for nid in active
    }
    server_seconds += clock() - start
    replies = exchange(Stage.UNMASK, outbox)
    start = clock()
    shares: dict[int, list[bytes]] = {nid: [] for nid in sampled}
    for r in replies.values():
        for owner, share in zip(r[Key.NODE_ID_LIST], r[Key.SHARE_LIST], strict=True):
            shares[owner].append(share)
    shape = get_parameters_shape(masked)
    for nid, share_list in shares.items():
        if len(share_list) < threshold:
            raise RuntimeError(f"node {nid}: {len(share_list)} shares < threshold {threshold}")
        secret = combine_shares(share_list)
        if nid in active:
            masked = parameters_subtraction(masked, pseudo_rand_gen(secret, mod_range, shape))
        else:
            for other in neighbours[nid] - {nid}:
                key = generate_shared_key(
                    bytes_to_private_key(secret), bytes_to_public_key(public_keys[other][0])
                )
                mask = pseudo_rand_gen(key, mod_range, shape)
                if nid > other:
                    masked = parameters_addition(masked, mask)
                else:
                    masked = parameters_subtraction(masked, mask)
    q_total, recon = factor_extract(parameters_mod(masked, mod_range))
    (mean,) = dequantize(recon, clip, quant_range)
    mean += -(len(active) - 1) * clip
    mean *= quant_range / q_total
    total = mean * len(active)
    server_seconds += clock() - start

    index = {nid: i for i, nid in enumerate(nids)}
    return FlowerResult(
        sum=total,
        included=sorted(index[nid] for nid in active),
        client_seconds={index[nid]: c.seconds for nid, c in clients.items()},
        server_seconds=server_seconds,
        bytes_sent={index[nid]: c.sent for nid, c in clients.items()},
        bytes_received={index[nid]: c.received for nid, c in clients.items()},
    )
