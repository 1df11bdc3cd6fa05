"""FedAlign-MoE and FedMoE driven by the ZeroMQ runtime over real loopback sockets.

Each round's checkpoint equals the strategy's coordinator side applied to the plaintext sum of
the institutions' recorded submissions; extras travel in RoundStart and survive a restart;
malformed extras are refused; FedMoE's messages do not reveal which experts an institution holds.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import defaultdict
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save
from safetensors.torch import load_file

from clients.contract.config import FederationConfig
from clients.contract.config import load_config
from clients.contract.extras import ExtrasError
from clients.contract.extras import decode_extras
from clients.contract.extras import encode_extras
from clients.contract.keys import load_ckks_key_holder
from clients.contract.layout import CHANNEL_BOUND
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import WEIGHT
from clients.contract.layout import GlobalState
from clients.contract.messages import CkksInput
from clients.contract.messages import Decline
from clients.contract.messages import RoundStart
from clients.models.moe_lora import adapter_state
from clients.runtime.institution import MEMORY_FILE
from clients.runtime.institution import InstitutionError
from clients.runtime.institution import routing_from_channel
from clients.runtime.transport import InstitutionEndpoint
from clients.strategies.experts import EXPERT_WEIGHT
from clients.strategies.experts import ExpertPartition
from clients.strategies.fedalign import ALIGN_MEAN
from clients.strategies.fedalign import ALIGN_N
from clients.strategies.fedalign import ALIGN_STD
from clients.strategies.fedalign import FedAlignClient
from clients.strategies.fedmoe import FedMoEClient
from coordinator.app.wiring import make_institution
from coordinator.service import Coordinator
from coordinator.service import CoordinatorError
from coordinator.store import RoutingRelay
from coordinator.store import RunStore
from coordinator.store import StoreError
from coordinator.strategies import registry
from coordinator.strategies.base import ServerHalf
from coordinator.strategies.registry import coordinator_strategy
from secagg import FixedPointCodec
from secagg.ckks import DEFAULT_ABS_ERROR_PER_SUMMAND
from secagg.ckks import SCALING_ERROR_FLOOR
from secagg.ckks import SCALING_ERROR_PER_FACTOR_AND_SUMMAND
from secagg.ckks import EncryptedBatch
from secagg.messages import AdvertiseKeys
from tests.federation_harness import Recorded
from tests.federation_harness import assert_caps_admit
from tests.federation_harness import record_frames
from tests.federation_harness import record_submissions
from tests.federation_harness import run_in_threads
from tests.test_federation import NAMES
from tests.test_federation import write_config


def strategy_config(
    tmp_path: Path, strategy: str, rounds: int = 2, expert_updates: str = "mask"
) -> FederationConfig:
    """The tiny federation with ``strategy`` (keys generated once per folder)."""
    path = tmp_path / "federation.toml"
    if not path.exists():
        write_config(tmp_path, rounds=rounds, expert_updates=expert_updates)
    text = path.read_text()
    text = re.sub(r'(?m)^strategy = "\w+"', f'strategy = "{strategy}"', text)
    text = re.sub(r"(?m)^rounds = \d+$", f"rounds = {rounds}", text)
    path.write_text(text)
    return load_config(path)


def checkpoint(config: FederationConfig, r: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Round ``r``'s adapters (decrypted with an institution's key under CKKS) and extras."""
    base = config.run_dir / "checkpoints" / f"round-{r:04d}"
    extras_path = base.with_suffix(".extras")
    extras = decode_extras(extras_path.read_bytes()) if extras_path.exists() else {}
    if config.aggregation.expert_updates == "mask":
        return load_file(base.with_suffix(".safetensors")), extras
    assert not base.with_suffix(".safetensors").exists()  # no plaintext on the coordinator
    batch = msgspec.msgpack.decode(base.with_suffix(".ckks").read_bytes(), type=EncryptedBatch)
    arrays = load_ckks_key_holder(config.keys_dir, NAMES[0]).decrypt(batch)
    names = list(Coordinator(config).initial_state().adapters)
    return {n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)}, extras


def assert_rounds_match_plaintext(config: FederationConfig, outcomes, recorded: Recorded) -> None:
    """Every round's checkpoint is the coordinator side applied to the plaintext sums."""
    strategy = coordinator_strategy(config)
    initial = Coordinator(config).initial_state()
    ckks = config.aggregation.expert_updates == "ckks"
    q = FixedPointCodec(
        clip=CHANNEL_BOUND, bits=config.secagg.bits, modulus_bits=config.secagg.modulus_bits,
        max_clients=len(NAMES),
    ).max_error_per_client  # fmt: skip
    before = initial
    for outcome in outcomes:
        r, m = outcome.federation_round, len(outcome.included)
        assert sorted(outcome.included) == sorted(NAMES)
        for name in NAMES:  # what the institutions received is what the coordinator had
            assert recorded[(r, name)][0].keys() == before.extras.keys()
            for key, value in before.extras.items():
                np.testing.assert_array_equal(recorded[(r, name)][0][key], value)
        layout = strategy.layout(before)
        packed = [layout.pack(recorded[(r, n)][1]) for n in outcome.included]
        plain = {c: np.sum([p[c] for p in packed], axis=0) for c in layout.channels}
        expected = strategy.aggregate(before, plain)
        values = layout.unpack({"mask": plain["mask"]}, partial=True)
        partition = ExpertPartition.of(before)
        experts = np.asarray(values[EXPERT_WEIGHT]).reshape(
            partition.num_layers, partition.num_experts
        )
        adapters, extras = checkpoint(config, r)
        moved = 0.0
        for name, old in before.adapters.items():
            want = expected.adapters[name].double().numpy()
            got = adapters[name].double().numpy()
            step = want - old.double().numpy()
            weight = partition.entry_weights(name, float(values[WEIGHT][0]), experts)
            bound = layout[DELTA_PREFIX + name].bound
            # each of m clients adds < one quantisation step to the delta and the weight sums
            divisor = np.maximum(weight - m * q, 1e-9)
            atol = (m * bound * q + np.abs(step) * m * q) / divisor
            if ckks:  # the CKKS sum and the coordinator's scaling by bound / weight
                per = DEFAULT_ABS_ERROR_PER_SUMMAND + SCALING_ERROR_PER_FACTOR_AND_SUMMAND
                atol = np.abs(step) * m * q / divisor + m * bound / divisor * per
                atol = atol + SCALING_ERROR_FLOOR
            kept = want == old.double().numpy()  # not updated (or a zero mean): no error
            atol = np.where(kept, SCALING_ERROR_FLOOR if ckks else 0.0, atol)
            np.testing.assert_array_less(np.abs(got - want), atol + 1e-6)
            moved = max(moved, float(np.abs(step).max()))
        assert moved > 1e-4  # real updates were compared, not zeros
        assert extras.keys() == expected.extras.keys()
        for key, value in expected.extras.items():
            # each of the m scores, squares and counts is off by < q in the sums; the standard
            # deviation is a square root, so its square (the variance) is compared
            power = 2 if key == ALIGN_STD else 1
            np.testing.assert_allclose(extras[key] ** power, value**power, atol=4 * m * q)
        before = GlobalState(adapters, initial.routing, extras)


def test_fedalign_rounds_equal_plaintext_and_carry_the_score_statistics(tmp_path, monkeypatch):
    config = strategy_config(tmp_path, "fedalign")
    recorded = record_submissions(monkeypatch, FedAlignClient)
    frames = record_frames(monkeypatch)
    outcomes, institutions = run_in_threads(config)
    assert [o.error for o in outcomes] == [None, None]
    assert_caps_admit(config, frames)  # round 2's extras fit the caps sized before round 1
    assert_rounds_match_plaintext(config, outcomes, recorded)
    _, extras = checkpoint(config, 2)
    # round 2 scored every expert against round 1's move: the statistics are not empty
    assert extras[ALIGN_N].max() == len(NAMES)
    assert np.abs(extras[ALIGN_MEAN]).max() > 0
    # the final evaluation used the last round's aggregates, which the Shutdown carried
    relay = RunStore(config.run_dir).resume().routing
    key = load_ckks_key_holder(config.keys_dir, NAMES[0])
    layout = coordinator_strategy(config).layout(Coordinator(config).initial_state())
    final_routing = routing_from_channel(layout, key.decrypt(relay.encrypted))
    for inst in institutions:
        assert inst.rounds.last_state.extras.keys() == extras.keys()
        for name, value in extras.items():
            np.testing.assert_array_equal(inst.rounds.last_state.extras[name], value)
        np.testing.assert_allclose(
            inst.rounds.last_state.routing.as_vector(), np.maximum(final_routing, 0.0), atol=1e-9
        )


def test_fedmoe_rounds_equal_plaintext_and_messages_hide_the_held_experts(tmp_path, monkeypatch):
    strategy_config(tmp_path, "fedmoe")
    fractions = dict(zip(NAMES, (0.5, 0.75, 1.0), strict=True))
    path = tmp_path / "federation.toml"
    budgets = "".join(f'"{name}" = {f}\n' for name, f in fractions.items())
    path.write_text(path.read_text() + "\n[aggregation.fedmoe.memory_fractions]\n" + budgets)
    config = load_config(path)
    recorded = record_submissions(monkeypatch, FedMoEClient)
    sizes: dict[tuple[str, str], list[object]] = defaultdict(list)
    original_send = InstitutionEndpoint.send

    def send(self, message):
        name = threading.current_thread().name
        if isinstance(message, CkksInput):  # SEAL compresses ciphertexts: compare the layout
            size: object = (len(message.batch.ciphertexts), message.batch.shapes)
        else:
            size = len(msgspec.msgpack.encode(message))
        sizes[(name, type(message).__name__)].append(size)
        original_send(self, message)

    monkeypatch.setattr(InstitutionEndpoint, "send", send)
    outcomes, institutions = run_in_threads(config)
    assert [o.error for o in outcomes] == [None, None]
    assert {i.name: i.learner.strategy.memory_fraction for i in institutions} == fractions
    assert_rounds_match_plaintext(config, outcomes, recorded)
    held = {inst.name: inst.learner.strategy.held for inst in institutions}
    assert len({int(h.sum()) for h in held.values()}) >= 2  # sub-MoEs of different sizes
    for kind in ("MaskedInput", "CkksInput"):
        lengths = {name: sizes[(name, kind)] for name in NAMES}
        assert all(len(v) == 2 for v in lengths.values()), lengths
        assert len({tuple(v) for v in lengths.values()}) == 1, lengths


@pytest.mark.parametrize("strategy", ["fedalign", "fedmoe"])
def test_ckks_expert_updates_follow_the_per_expert_means(tmp_path, monkeypatch, strategy):
    """expert_updates = "ckks": the coordinator scales each encrypted entry by bound over its
    expert's masked weight sum (0 if not updated); decrypted, that is the plaintext mean."""
    config = strategy_config(tmp_path, strategy, expert_updates="ckks")
    cls = FedAlignClient if strategy == "fedalign" else FedMoEClient
    recorded = record_submissions(monkeypatch, cls)
    outcomes, institutions = run_in_threads(config)
    assert [o.error for o in outcomes] == [None, None]
    assert_rounds_match_plaintext(config, outcomes, recorded)
    final, _ = checkpoint(config, 2)
    for inst in institutions:  # Shutdown carried the encrypted final state; each decrypted it
        for name, tensor in adapter_state(inst.model).items():
            np.testing.assert_allclose(tensor.double().numpy(), final[name].numpy(), atol=1e-6)


def test_extras_survive_a_coordinator_restart(tmp_path, monkeypatch):
    config = strategy_config(tmp_path, "fedalign", rounds=2)
    recorded = record_submissions(monkeypatch, FedAlignClient)
    first, _ = run_in_threads(config)
    assert [o.error for o in first] == [None, None]
    _, kept = checkpoint(config, 2)
    assert kept[ALIGN_N].max() == len(NAMES)
    recorded.clear()
    resumed = strategy_config(tmp_path, "fedalign", rounds=3)
    second, _ = run_in_threads(resumed)
    assert [(o.federation_round, o.error) for o in second] == [(3, None)]
    for name in NAMES:  # a new process: the extras came from the checkpoint, not memory
        received = recorded[(1, name)][0]
        assert received.keys() == kept.keys()
        for key in (ALIGN_MEAN, ALIGN_STD, ALIGN_N):
            np.testing.assert_array_equal(received[key], kept[key])


def test_a_tampered_extras_checkpoint_is_refused(tmp_path):
    store = RunStore(tmp_path / "run")
    extras = {ALIGN_MEAN: np.full((2, 4), 0.5), ALIGN_N: np.full((2, 4), 3.0)}
    store.completed(
        1, 0, {"a": torch.zeros(2)}, RoutingRelay(), NAMES, {"round": 1.0}, extras=extras
    )
    resume = store.resume()
    assert resume.extras.keys() == extras.keys()
    np.testing.assert_array_equal(resume.extras[ALIGN_MEAN], extras[ALIGN_MEAN])
    path = tmp_path / "run" / "checkpoints" / "round-0001.extras"
    path.write_bytes(encode_extras({**extras, ALIGN_MEAN: np.full((2, 4), 0.9)}))
    with pytest.raises(StoreError, match="does not match the journal"):
        store.resume()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"not safetensors", "not valid safetensors"),
        ("float32", "dtype float32"),
        ("nan", "NaN or infinite"),
        ("names", "expects"),
        ("shape", "has shape"),
    ],
)
def test_malformed_extras_are_refused(payload, match):
    expected = {ALIGN_MEAN: (2, 4), ALIGN_N: (2, 4)}
    good = {ALIGN_MEAN: np.zeros((2, 4)), ALIGN_N: np.ones((2, 4))}
    assert decode_extras(encode_extras(good), expected).keys() == good.keys()
    data = {
        "float32": lambda: save({k: v.astype(np.float32) for k, v in good.items()}),
        "nan": lambda: encode_extras({**good, ALIGN_N: np.full((2, 4), np.nan)}),
        "names": lambda: encode_extras({ALIGN_MEAN: good[ALIGN_MEAN]}),
        "shape": lambda: encode_extras({**good, ALIGN_N: np.ones((4, 2))}),
    }
    raw = payload if isinstance(payload, bytes) else data[payload]()
    with pytest.raises(ExtrasError, match=match):
        decode_extras(raw, expected)


class _Outbox:
    """Stands in for the institution's endpoint: keeps what it sends."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)


def test_an_institution_declines_malformed_extras_and_serves_the_next_round(tmp_path, caplog):
    config = strategy_config(tmp_path, "fedalign")
    inst = make_institution(config, NAMES[0])
    outbox = _Outbox()
    inst._endpoint = outbox  # no socket: this test is about what the institution sends
    state = Coordinator(config).initial_state()
    length = coordinator_strategy(config).layout(state).length("mask")

    def start(attempt: int, extras: bytes) -> RoundStart:
        params = config.secagg.round_params(attempt + 1, [0, 1, 2], os.urandom(32), length)
        return RoundStart(params=params, client_id=0, federation_round=1, extras=extras)

    bad = encode_extras({ALIGN_MEAN: np.zeros((3, 3))})
    with caplog.at_level(logging.WARNING, logger="clients.runtime.rounds"):
        inst._serve(start(0, bad))
    assert isinstance(outbox.sent[-1], Decline)
    assert "malformed extras" in outbox.sent[-1].reason
    assert any("refused the broadcast extras" in r.getMessage() for r in caplog.records)
    shape = tuple(state.routing.counts.shape)
    good = encode_extras({k: np.zeros(shape) for k in (ALIGN_MEAN, ALIGN_STD, ALIGN_N)})
    inst._serve(start(1, good))
    assert isinstance(outbox.sent[-1], AdvertiseKeys)


def test_ckks_updates_with_a_strategy_that_cannot_scale_them_are_refused(tmp_path, monkeypatch):
    class PlainOnly:  # aggregates plaintext sums, has no encrypted update factors
        def layout(self, state):
            raise AssertionError("not reached")

        def aggregate(self, state, sums):
            raise AssertionError("not reached")

    config = strategy_config(tmp_path, "fedmoe", expert_updates="ckks")
    plain_only = ServerHalf(lambda config: PlainOnly(), registry.SERVER_HALVES["fedmoe"].facts)
    monkeypatch.setitem(registry.SERVER_HALVES, "fedmoe", plain_only)
    with pytest.raises(CoordinatorError, match="expert_updates = 'ckks' does not work with"):
        Coordinator(config)


def test_restarted_institutions_keep_their_strategy_memory(tmp_path):
    """FedAlign-MoE scores round 2 against round 1's move and FedMoE leaves warm-up after one
    round, also when every process restarted in between (the memory came from disk)."""
    (tmp_path / "fedalign").mkdir()
    (tmp_path / "fedmoe").mkdir()
    config = strategy_config(tmp_path / "fedalign", "fedalign", rounds=1)
    assert [o.error for o in run_in_threads(config)[0]] == [None]
    memory = config.run_dir / "institutions" / NAMES[0] / MEMORY_FILE
    assert oct(memory.stat().st_mode & 0o777) == "0o600"
    assert set(load_numpy(memory.read_bytes())) == set(Coordinator(config).initial_state().adapters)
    resumed = strategy_config(tmp_path / "fedalign", "fedalign", rounds=2)
    assert [o.error for o in run_in_threads(resumed)[0]] == [None]
    _, extras = checkpoint(resumed, 2)
    assert extras[ALIGN_N].max() == len(NAMES)  # every institution knew round 1's move

    config = strategy_config(tmp_path / "fedmoe", "fedmoe", rounds=1)
    assert [o.error for o in run_in_threads(config)[0]] == [None]
    resumed = strategy_config(tmp_path / "fedmoe", "fedmoe", rounds=2)
    outcomes, institutions = run_in_threads(resumed)
    assert [o.error for o in outcomes] == [None]
    for inst in institutions:  # past warm-up: a sub-MoE within half the experts' memory
        assert not inst.learner.strategy.held.all()


def test_an_unreadable_strategy_memory_is_refused_naming_the_file(tmp_path):
    config = strategy_config(tmp_path, "fedmoe", rounds=1)
    memory = config.run_dir / "institutions" / NAMES[0] / MEMORY_FILE
    memory.parent.mkdir(parents=True)
    memory.write_bytes(b"not safetensors")
    with pytest.raises(InstitutionError, match="delete the file") as info:
        make_institution(config, NAMES[0])
    assert str(memory) in str(info.value)
