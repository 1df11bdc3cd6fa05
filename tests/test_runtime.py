"""The institution runtime, its budget ledger and the shared setup, against a scripted coordinator.

The coordinator side here is the real one at the transport level (CoordinatorEndpoint,
SecAggServer, CkksAggregator, FedAvgCoordinator) driven step by step by the test, over loopback
TCP with CurveZMQ; the institutions are real :class:`clients.runtime.institution.Institution`
processes' loops, run in threads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from audit import Ledger
from audit import head_path
from audit import ledger_path
from audit import read_heads
from audit import verify_ledger
from clients.contract.config import FederationConfig
from clients.contract.config import load_config
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import client_id
from clients.contract.keys import generate_keys
from clients.contract.keys import identity_keys
from clients.contract.keys import load_ckks_key_holder
from clients.contract.keys import load_ckks_public_context
from clients.contract.keys import load_coordinator_keys
from clients.contract.keys import load_institution_keys
from clients.contract.keys import load_roster
from clients.contract.layout import ROUTING
from clients.contract.layout import WEIGHT
from clients.contract.layout import GlobalState
from clients.contract.messages import CkksInput
from clients.contract.messages import Decline
from clients.contract.messages import Hello
from clients.contract.messages import RoundEnd
from clients.contract.messages import RoundStart
from clients.contract.messages import Shutdown
from clients.contract.messages import round_id
from clients.data.sources import institution_data
from clients.models.build import ByteTokenizer
from clients.models.build import build_model
from clients.models.moe_lora import adapter_state
from clients.models.moe_lora import routing_statistics
from clients.runtime.institution import METRICS_FILE
from clients.runtime.institution import Institution
from clients.runtime.institution import routing_from_channel
from clients.strategies.fedavg import FedAvgConfig
from clients.strategies.fedavg import fedavg_config
from coordinator.app.wiring import make_institution
from coordinator.store import RunStore
from coordinator.strategies.fedavg import FedAvgCoordinator
from coordinator.transport import CoordinatorEndpoint
from privacy import DPTrainingFacts
from privacy.head import LedgerHead
from secagg.ckks import CkksAggregator
from secagg.ckks import CkksKeyHolder
from secagg.ckks import EncryptedBatch
from secagg.errors import SecAggError
from secagg.errors import TooFewSurvivors
from secagg.server import SecAggServer

NAMES = ["comedies", "tragedies", "histories", "romances"]  # t = 3 of 4: one may decline
WAIT = 120.0  # generous bound for a stage; reached only if something is broken
DELTA = 1e-5


def facts(sigma: float = 1.0, q: float = 0.1, steps: int = 10) -> DPTrainingFacts:
    return DPTrainingFacts(
        noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0, delta=DELTA
    )


def ledger_lines(config: FederationConfig, name: str) -> list[dict]:
    return [json.loads(line) for line in ledger_path(config.run_dir, name).read_text().splitlines()]


# ------------------------------------------------------------------------------ shared setup

TOML = """
[federation]
name = "rt"
rounds = {rounds}
seed = {seed}
run_dir = "run"

[coordinator]
bind = "{bind}"
stage_timeout_s = 60.0
keys_dir = "keys"

[model]
name = "tiny-dense"

[model.moe]
num_experts = 4
top_k = 2
rank = 2
alpha = 4.0
target_modules = ["q_proj", "v_proj"]

[data]
block_len = 32
max_chars_per_institution = 12_000
max_blocks = {{ train = 32, validation = 4, test = 4 }}

[training]
local_steps = 2
batch_size = 8
lr = 5e-3
device = "cpu"

[privacy]
target_epsilon = 8.0
target_delta = 1e-5

[secagg]
threshold = 3

[aggregation]
expert_updates = "mask"
routing_statistics = "ckks"

[[institutions]]
name = "comedies"

[[institutions]]
name = "tragedies"

[[institutions]]
name = "histories"
privacy = {{ target_epsilon = 4.0, target_delta = 1e-5 }}

[[institutions]]
name = "romances"
"""


def write_config(
    folder: Path, *, rounds: int = 1, seed: int = 0, bind: str = "tcp://127.0.0.1:5599"
) -> FederationConfig:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "federation.toml"
    path.write_text(TOML.format(rounds=rounds, seed=seed, bind=bind))
    return load_config(path)


def test_build_model_is_reproducible_from_the_seed(tmp_path):
    states = [
        adapter_state(build_model(write_config(tmp_path / f"c{i}", seed=seed))[0])
        for i, seed in enumerate([3, 3, 4])
    ]
    assert list(states[0]) == list(states[1])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_byte_tokenizer_round_trips_utf8():
    tokenizer = ByteTokenizer()
    ids = tokenizer("Thou art — Æ")["input_ids"]
    assert max(ids) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == "Thou art — Æ"


def test_institution_data_is_deterministic_and_distinct(tmp_path):
    config = write_config(tmp_path)
    tokenizer = ByteTokenizer()
    first = institution_data(config, "comedies", tokenizer)
    again = institution_data(config, "comedies", tokenizer)
    other = institution_data(config, "tragedies", tokenizer)
    assert set(first) == {"train", "validation", "test"}
    assert first["train"].shape == (32, 32)
    assert first["validation"].shape[0] >= 1
    assert all(torch.equal(first[s], again[s]) for s in first)
    assert not torch.equal(first["train"], other["train"])
    with pytest.raises(KeyError, match="nobody"):
        institution_data(config, "nobody", tokenizer)


def test_fedavg_config_and_client_ids_follow_the_config(tmp_path):
    config = write_config(tmp_path)
    fedavg = fedavg_config(config)
    assert fedavg.min_weight == 1.0  # every institution declares the default weight
    assert [config.public_weight(n) for n in NAMES] == [1.0] * 4
    assert (fedavg.delta_channel, fedavg.routing_channel) == ("mask", "ckks")
    assert [client_id(config, n) for n in NAMES] == [0, 1, 2, 3]


@pytest.mark.parametrize("expert_updates", ["mask", "ckks"])
def test_routing_is_read_back_from_a_packed_ckks_sum(expert_updates):
    adapters = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    state = GlobalState.initial(adapters, ("l0", "l1"), num_experts=2)
    layout = FedAvgConfig(delta_channel=expert_updates).layout(state)
    rng = np.random.default_rng(0)
    submissions = [
        {seg.name: rng.uniform(0, 50, seg.length) for seg in layout.segments} for _ in range(2)
    ]
    ckks_sum = sum(layout.pack(s)["ckks"] for s in submissions)
    routing_sum = submissions[0][ROUTING] + submissions[1][ROUTING]
    np.testing.assert_allclose(routing_from_channel(layout, [ckks_sum]), routing_sum)
    # the window a coordinator relays: some values of the channel before it, then the routing
    offset = layout.length("ckks") - len(routing_sum)
    window = [ckks_sum[offset - 3 : offset], ckks_sum[offset:]]
    np.testing.assert_allclose(routing_from_channel(layout, window), routing_sum)
    with pytest.raises(ValueError, match="decrypted routing has 1 values"):
        routing_from_channel(layout, [np.zeros(1)])


# ------------------------------------------------------------------------------ federation


class ScriptedCoordinator:
    """The coordinator's side of the protocol, one explicit step at a time, for tests."""

    def __init__(self, config: FederationConfig, peek_key: CkksKeyHolder) -> None:
        self.config = config
        self.peek_key = peek_key
        keys = load_coordinator_keys(config.keys_dir)
        roster = load_roster(config.keys_dir / ROSTER_FILE)
        self.identities = identity_keys(config, roster)
        self.endpoint = CoordinatorEndpoint(
            config.coordinator.bind,
            keys.curve_secret,
            keys.curve_public,
            {e.name: e.curve_public for e in roster.institutions},
        )
        self.ckks_context = load_ckks_public_context(config.keys_dir)
        self.strategy = FedAvgCoordinator(fedavg_config(config))
        model, _ = build_model(config)
        local = routing_statistics(model)
        self.state = GlobalState.initial(
            adapter_state(model), local.layer_names, local.num_experts, local.top_k
        )
        self.routing: EncryptedBatch | None = None
        self.declines: dict[str, str] = {}
        self.heads: dict[str, LedgerHead] = {}
        self.all_heads: dict[str, list[LedgerHead]] = {}
        self.received: dict[str, list[str]] = {}
        self.ends: list[RoundEnd] = []

    def wait_for_hellos(self) -> None:
        deadline = time.monotonic() + WAIT
        while self.endpoint.connected != set(NAMES) and time.monotonic() < deadline:
            self.endpoint.recv(0.2)
        assert self.endpoint.connected == set(NAMES)

    def run_round(self, federation_round: int) -> dict[str, np.ndarray]:
        """One round with every institution; returns the decoded per-channel sums."""
        names = dict(enumerate(self.config.institution_names))
        ids = {name: i for i, name in names.items()}
        layout = self.strategy.layout(self.state)
        params = self.config.secagg.round_params(
            round_id(federation_round, 0), sorted(names), os.urandom(32), layout.length("mask")
        )
        server = SecAggServer(params, self.identities)
        blob = safetensors.torch.save(self.state.adapters)
        for name, i in ids.items():
            self.endpoint.send(
                name,
                RoundStart(
                    params=params,
                    client_id=i,
                    federation_round=federation_round,
                    global_state=blob,
                    routing_encrypted=self.routing,
                ),
            )
        declined: set[int] = set()
        ckks: dict[int, EncryptedBatch] = {}
        while server.stage is not None:
            deadline = time.monotonic() + WAIT
            while server.expected - declined and time.monotonic() < deadline:
                received = self.endpoint.recv(0.2)
                if received is None:
                    continue
                name, message = received
                if isinstance(message, Hello):
                    continue
                self.received.setdefault(name, []).append(type(message).__name__)
                if isinstance(message, LedgerHead):
                    self.heads[name] = message
                    self.all_heads.setdefault(name, []).append(message)
                elif isinstance(message, Decline):
                    declined.add(ids[name])
                    self.declines[name] = message.reason
                elif isinstance(message, CkksInput):
                    ckks[ids[name]] = message.batch
                else:
                    try:
                        server.receive(ids[name], message)
                    except SecAggError as exc:
                        logging.getLogger(__name__).warning("rejected from %s: %s", name, exc)
            try:
                outgoing = server.advance()
            except TooFewSurvivors as exc:
                self._end(RoundEnd(round_id=params.round_id, included=[], error=str(exc)))
                raise
            for i, message in outgoing.items():
                self.endpoint.send(names[i], message)
        self._end(RoundEnd(round_id=params.round_id, included=server.included))
        assert server.result is not None
        sums = {"mask": params.codec.decode(server.result)}
        aggregator = CkksAggregator(self.ckks_context)
        for i in server.included:
            aggregator.add(ckks[i])
        self.routing = aggregator.sum()
        # the coordinator never decrypts; the test peeks with an institution's key
        sums["ckks"] = self.peek_key.decrypt(self.routing)[0]
        self.state = self.strategy.aggregate(self.state, sums)
        return sums

    def _end(self, end: RoundEnd) -> None:
        self.ends.append(end)
        for name in NAMES:
            self.endpoint.send(name, end)

    def shutdown(self) -> None:
        for name in NAMES:
            self.endpoint.send(name, Shutdown(reason="test over"))


@pytest.fixture
def federation(tmp_path):
    """(config, coordinator, start) where start() runs the institutions in threads."""
    keys_dir = tmp_path / "keys"
    generate_keys(keys_dir, NAMES)
    probe = write_config(tmp_path, bind="tcp://127.0.0.1:5599")
    keys = load_coordinator_keys(probe.keys_dir)
    # find a free port by binding a throwaway endpoint, then let the config name it
    with CoordinatorEndpoint("tcp://127.0.0.1:*", keys.curve_secret, keys.curve_public, {}) as e:
        address = e.address
    opened: list[ScriptedCoordinator] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()
    outcomes: dict[str, object] = {}

    def make(rounds: int) -> tuple[FederationConfig, ScriptedCoordinator]:
        config = write_config(tmp_path, rounds=rounds, bind=address)
        coordinator = ScriptedCoordinator(config, load_ckks_key_holder(config.keys_dir, NAMES[0]))
        opened.append(coordinator)
        return config, coordinator

    def start(config: FederationConfig) -> dict[str, object]:
        institutions = [make_institution(config, name) for name in NAMES]

        def serve(inst: Institution) -> None:
            try:
                outcomes[inst.name] = inst.run(stop)
            except Exception as exc:  # reported by the test
                outcomes[inst.name] = exc

        for inst in institutions:
            thread = threading.Thread(target=serve, args=(inst,), daemon=True)
            thread.start()
            threads.append(thread)
        return outcomes

    yield make, start, threads
    stop.set()
    for thread in threads:
        thread.join(WAIT)
    for coordinator in opened:
        coordinator.endpoint.close()


def metrics_lines(config: FederationConfig, name: str) -> list[dict]:
    path = config.run_dir / "institutions" / name / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_three_institutions_run_two_rounds_and_shut_down(federation):
    make, start, threads = federation
    config, coordinator = make(rounds=2)
    outcomes = start(config)
    coordinator.wait_for_hellos()
    initial = {k: v.clone() for k, v in coordinator.state.adapters.items()}

    sums = coordinator.run_round(1)
    layout = coordinator.strategy.layout(coordinator.state)
    assert coordinator.ends[-1].included == [0, 1, 2, 3]
    assert sums["mask"].shape == (layout.length("mask"),)
    # every institution declares the default public weight 1, whatever its data size
    values = layout.unpack(sums)
    assert values[WEIGHT][0] == pytest.approx(4.0, abs=1e-3)
    # The noised routing sum came through CKKS (its noise, std 56.6 per value here, can push a
    # layer's token sum to the clamp at 0, so only check that something arrived).
    assert np.abs(coordinator.state.routing.as_vector()).max() > 0
    assert any(not torch.equal(initial[k], coordinator.state.adapters[k]) for k in initial)

    coordinator.run_round(2)  # institutions decrypt round 1's CKKS routing sum
    assert coordinator.ends[-1].included == [0, 1, 2, 3]
    coordinator.shutdown()
    for thread in threads:
        thread.join(WAIT)
    assert outcomes == dict.fromkeys(NAMES, 0)

    for name in NAMES:
        lines = metrics_lines(config, name)
        assert [line["event"] for line in lines] == ["initial", "round", "round", "final"]
        first, second = lines[1], lines[2]
        assert (first["round"], second["round"], first["included"]) == (1, 2, True)
        assert first["train"]["perplexity"] > 1
        assert first["validation"]["perplexity"] > 1
        assert first["bytes_sent"] > layout.length("mask")  # the masked vector went out
        assert 0 < first["epsilon_spent"] < second["epsilon_spent"]
        assert second["epsilon_spent"] <= config.budget(name).target_epsilon
        assert "test" in lines[0] and "test" in lines[-1]
        entries = ledger_lines(config, name)
        assert [(e["federation_round"], e["what"]) for e in entries] == [
            (1, "adapter-update"), (1, "routing-statistics"),
            (2, "adapter-update"), (2, "routing-statistics"),
        ]  # fmt: skip
        assert {e["kind"] for e in entries} == {"release"}
        assert entries[-1]["epsilon"]["pld"] == pytest.approx(second["epsilon_spent"])
        # the coordinator got the signed head of the full ledger before the release
        public = load_roster(config.keys_dir / ROSTER_FILE).institution(name).identity_key
        verified = verify_ledger(ledger_path(config.run_dir, name), public,
                                 head=coordinator.heads[name])  # fmt: skip
        assert coordinator.heads[name].entries == 4 and verified.head_checked
        # each head, as it crossed the sockets, proves it extends the one before
        store = RunStore(config.run_dir / "heads-check")
        assert [h.entries for h in coordinator.all_heads[name]] == [2, 4]
        assert all(store.save_head(h) for h in coordinator.all_heads[name])
        heads = read_heads(head_path(config.run_dir / "heads-check", name))
        verified = verify_ledger(ledger_path(config.run_dir, name), public, heads=heads)
        assert verified.heads_checked == 2


def test_an_institution_out_of_budget_declines_and_the_round_goes_on(federation, caplog):
    caplog.set_level(logging.WARNING, logger="clients.runtime.rounds")
    make, start, threads = federation
    config, coordinator = make(rounds=1)
    spent = ledger_path(config.run_dir, "histories")
    identity = load_institution_keys(config.keys_dir, "histories").identity
    generous = Ledger(spent, institution="histories", identity=identity, budget_epsilon=100.0,
                      delta=DELTA, accountant="rdp")  # fmt: skip
    generous.charge([facts(sigma=0.6, q=1.0, steps=20).release(0, 1)])
    assert generous.spent() > 4.0
    start(config)
    coordinator.wait_for_hellos()

    sums = coordinator.run_round(1)
    assert coordinator.ends[-1].included == [0, 1, 3]
    assert "budget exhausted" in coordinator.declines["histories"]
    layout = coordinator.strategy.layout(coordinator.state)
    assert layout.unpack(sums)[WEIGHT][0] == pytest.approx(3.0, abs=1e-3)
    coordinator.shutdown()
    for thread in threads:
        thread.join(WAIT)

    line = metrics_lines(config, "histories")[1]
    assert line["included"] is False
    assert "budget exhausted" in line["declined"]
    assert line["train"] is None
    entries = ledger_lines(config, "histories")
    assert [e["kind"] for e in entries] == ["release", "refusal"]  # the refusal is on record
    assert entries[1]["what"] == "adapter-update+routing-statistics"
    assert "budget exhausted" in entries[1]["reason"]
    assert coordinator.heads["histories"].entries == 2  # the refusal's head came before Decline
    assert coordinator.received["histories"] == ["LedgerHead", "Decline"]  # nothing released
    assert any("declines round 1" in r.getMessage() for r in caplog.records)
