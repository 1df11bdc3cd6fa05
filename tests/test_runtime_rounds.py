"""The institution's round logic (clients.runtime.rounds) driven message by message, no socket.

Each test probes what an institution releases, and in which order, when a coordinator sends it
well-formed, malformed, stale or foreign messages. Everything is real: the learner on the tiny
model, the audit ledger on disk, the SecAgg+ server and clients, the CKKS key. The round's other
participants are plain :class:`SecAggClient` objects with all-zero inputs (not under test: they
only let the round go on, and make the sum equal to the institution's own input).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import replace

import msgspec
import numpy as np
import pytest
from safetensors.numpy import load as load_numpy
from safetensors.torch import save as save_torch

from audit import Ledger
from audit import ledger_path
from clients.contract.config import FederationConfig
from clients.contract.extras import encode_extras
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import generate_keys
from clients.contract.keys import identity_keys
from clients.contract.keys import load_institution_keys
from clients.contract.keys import load_roster
from clients.contract.layout import WEIGHT
from clients.contract.messages import AffinityScores
from clients.contract.messages import Assignment
from clients.contract.messages import CkksInput
from clients.contract.messages import Decline
from clients.contract.messages import RoundEnd
from clients.contract.messages import RoundStart
from clients.contract.messages import round_id
from clients.runtime.institution import Institution
from clients.runtime.outputs import AppendMetrics
from clients.runtime.outputs import Output
from clients.runtime.outputs import PersistMemory
from clients.runtime.outputs import Send
from clients.strategies.fedamole import encode_assignment
from clients.strategies.fedamole import fedamole_config
from clients.strategies.fedamole import state_from_global
from coordinator.app.wiring import make_institution
from coordinator.service import Coordinator
from privacy import DPTrainingFacts
from privacy import ReleaseRefused
from secagg.client import SecAggClient
from secagg.errors import TooFewSurvivors
from secagg.messages import AdvertiseKeys
from secagg.messages import KeyRoster
from secagg.messages import MaskedInput
from secagg.messages import RoundParams
from secagg.messages import ShareKeys
from secagg.messages import SurvivorSignature
from secagg.messages import UnmaskShares
from secagg.server import SecAggServer
from tests.test_own_adapter_federation import own_config
from tests.test_runtime import DELTA
from tests.test_runtime import NAMES
from tests.test_runtime import ledger_lines
from tests.test_runtime import write_config
from tests.test_strategy_federation import strategy_config

TO_SERVER = (AdvertiseKeys, ShareKeys, MaskedInput, SurvivorSignature, UnmaskShares)


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def config(tmp_path) -> FederationConfig:
    """The runtime tests' tiny FedAvg federation (routing statistics under CKKS)."""
    generate_keys(tmp_path / "keys", NAMES)
    return write_config(tmp_path)


def kinds(outputs: list[Output]) -> list[str]:
    """The outputs by kind: a sent message by its type, any other output by its own."""
    return [type(o.message).__name__ if isinstance(o, Send) else type(o).__name__ for o in outputs]


def messages(outputs: list[Output]) -> list[msgspec.Struct]:
    return [o.message for o in outputs if isinstance(o, Send)]


def round_start(
    config: FederationConfig, inst: Institution, *, federation_round: int = 1, attempt: int = 0,
    **fields,
) -> RoundStart:  # fmt: skip
    """A RoundStart for every institution of the config, addressed to ``inst``."""
    layout = inst.learner.layout(inst.learner.local_state())
    params = config.secagg.round_params(
        round_id(federation_round, attempt),
        list(range(len(config.institution_names))),
        os.urandom(32),
        layout.length("mask"),
    )
    return RoundStart(
        params=params,
        client_id=config.institution_names.index(inst.name),
        federation_round=federation_round,
        **fields,
    )


def spend_until_this_round_is_refused(inst: Institution) -> None:
    """Other releases spend the budget after the round's check passed: charge what the round in
    progress would release (under other round ids) until the ledger refuses it."""
    releases = inst.rounds._round.local.releases
    with pytest.raises(ReleaseRefused):
        for other in range(1, 100):
            inst.ledger.charge([replace(r, round_id=other) for r in releases])


class SecAggRound:
    """A real SecAgg+ server and the other participants (zero inputs), for ``inst``'s round."""

    def __init__(self, config: FederationConfig, inst: Institution, params: RoundParams) -> None:
        identities = identity_keys(config, load_roster(config.keys_dir / ROSTER_FILE))
        self.me = config.institution_names.index(inst.name)
        self.inst = inst
        self.server = SecAggServer(params, identities)
        self.others = {
            cid: SecAggClient(
                params, cid, np.zeros(params.vector_length),
                load_institution_keys(config.keys_dir, config.institution_names[cid]).identity,
                identities,
            )
            for cid in params.client_ids if cid != self.me
        }  # fmt: skip
        self.ledger_entries_before: dict[str, int] = {}  # by the server message handled
        self.replies: dict[str, list[Output]] = {}

    def deliver(self, outputs: list[Output]) -> None:
        """Carry the institution's outputs out as its loop would (counting the bytes)."""
        for message in messages(outputs):
            self.inst.rounds.sent(message)
            if isinstance(message, TO_SERVER):
                self.server.receive(self.me, message)

    def run(self, advertised: list[Output]) -> None:
        """From the institution's advertisement to the end of the round."""
        self.deliver(advertised)
        for cid, client in self.others.items():
            self.server.receive(cid, client.advertise())
        while self.server.stage is not None:
            for cid, message in self.server.advance().items():
                if cid != self.me:
                    self.server.receive(cid, self.others[cid].handle(message))
                    continue
                what = type(message).__name__
                self.ledger_entries_before[what] = self.inst.ledger.head().entries
                self.replies[what] = self.inst.rounds.handle(message)
                self.deliver(self.replies[what])


# ------------------------------------------------------------------------------ a whole round


def test_a_round_charges_then_sends_the_head_before_the_ckks_and_masked_inputs(config):
    inst = make_institution(config, NAMES[0])
    start = round_start(config, inst)
    advertised = inst.rounds.handle(start)
    assert kinds(advertised) == ["AdvertiseKeys"]  # nothing released, nothing charged yet
    assert not ledger_path(config.run_dir, NAMES[0]).exists() or not ledger_lines(config, NAMES[0])

    secagg = SecAggRound(config, inst, start.params)
    secagg.run(advertised)
    assert kinds(secagg.replies["KeyRoster"]) == ["ShareKeys"]
    released = secagg.replies["RelayedShares"]
    assert kinds(released) == ["LedgerHead", "CkksInput", "MaskedInput"]
    # the charge was on disk when the head was made: the head covers both releases
    head = messages(released)[0]
    assert secagg.ledger_entries_before["RelayedShares"] == 0
    assert head.entries == 2 and head == inst.ledger.head()
    entries = ledger_lines(config, NAMES[0])
    assert [(e["federation_round"], e["what"], e["round_id"]) for e in entries] == [
        (1, "adapter-update", start.params.round_id),
        (1, "routing-statistics", start.params.round_id),
    ]
    assert secagg.server.included == [0, 1, 2, 3]

    # what was masked and encrypted is this institution's submission (the others sent zeros)
    ckks = messages(released)[1]
    assert isinstance(ckks, CkksInput) and ckks.round_id == start.params.round_id
    layout = inst.learner.layout(inst.learner.local_state())
    sums = {
        "mask": start.params.codec.decode(secagg.server.result),
        "ckks": inst.ckks.decrypt(ckks.batch)[0],
    }
    assert layout.unpack(sums)[WEIGHT][0] == pytest.approx(1.0, abs=1e-3)

    ended = inst.rounds.handle(RoundEnd(round_id=start.params.round_id, included=[0, 1, 2, 3]))
    assert kinds(ended) == ["AppendMetrics"]  # a metrics line, nothing sent
    line = ended[0].line
    assert (line["event"], line["round"], line["included"], line["declined"]) == (
        "round", 1, True, None,
    )  # fmt: skip
    assert line["train"]["loss"] > 0 and line["bytes_sent"] > layout.length("mask")
    assert line["epsilon_spent"] == pytest.approx(inst.ledger.spent()) and line["epsilon_spent"] > 0
    assert inst.rounds.round_id is None


def test_an_invalid_share_is_reported_and_the_institution_goes_on(config, caplog):
    """Another institution sends this one garbage instead of its share: this one names it to
    the server with its masked input (released as usual) instead of abandoning the round.
    Four institutions at their active bound t = 3: only 2 valid holders of the accused's mask
    key remain, so the round ends on the survivors' revealed seeds with it."""
    inst = make_institution(config, NAMES[0])
    start = round_start(config, inst)
    secagg = SecAggRound(config, inst, start.params)
    secagg.deliver(inst.rounds.handle(start))
    bad = 1
    for cid, client in secagg.others.items():
        secagg.server.receive(cid, client.advertise())
    for cid, message in secagg.server.advance().items():  # rosters: everyone shares keys
        if cid == secagg.me:
            secagg.deliver(inst.rounds.handle(message))
            continue
        reply = secagg.others[cid].handle(message)
        if cid == bad:
            garbage = [
                type(s)(peer=s.peer, ciphertext=bytes(len(s.ciphertext)))
                if s.peer == secagg.me else s
                for s in reply.shares
            ]  # fmt: skip
            reply = ShareKeys(round_id=reply.round_id, client_id=bad, shares=garbage)
        secagg.server.receive(cid, reply)
    relayed = secagg.server.advance()
    with caplog.at_level(logging.WARNING):
        released = inst.rounds.handle(relayed[secagg.me])
    assert f"accuses client {bad}" in caplog.text and "abandoned" not in caplog.text
    assert kinds(released) == ["LedgerHead", "CkksInput", "MaskedInput"]
    assert messages(released)[-1].accused == [bad]
    secagg.deliver(released)
    for cid, client in secagg.others.items():
        secagg.server.receive(cid, client.handle(relayed[cid]))
    outgoing = secagg.server.advance()
    assert secagg.server.masked == [0, 2, 3] and secagg.server.dropped == [bad]
    assert start.params.threshold == 3  # the active bound for 4 holders
    while secagg.server.stage is not None:  # consistency, then unmasking, without the accused
        for cid, message in outgoing.items():
            if cid == secagg.me:
                replies = inst.rounds.handle(message)
                secagg.deliver(replies)
            else:
                secagg.server.receive(cid, secagg.others[cid].handle(message))
        outgoing = secagg.server.advance()
    unmask = messages(replies)[-1]
    assert [item.peer for item in unmask.mask_seeds] == [bad] and bad not in unmask.mask_key_shares
    assert secagg.server.included == [0, 2, 3]
    layout = inst.learner.layout(inst.learner.local_state())
    total = start.params.codec.decode(secagg.server.result)  # the others sent zeros
    sums = layout.unpack({"mask": total, "ckks": np.zeros(layout.length("ckks"))})
    assert sums[WEIGHT][0] == pytest.approx(1.0, abs=1e-3)  # exactly this institution's weight


def test_a_charge_refused_at_release_sends_the_head_then_a_decline_and_no_input(config):
    inst = make_institution(config, NAMES[0])
    start = round_start(config, inst)
    advertised = inst.rounds.handle(start)
    spend_until_this_round_is_refused(inst)
    entries = inst.ledger.head().entries

    secagg = SecAggRound(config, inst, start.params)
    secagg.run(advertised)
    assert secagg.server.included == [1, 2, 3]  # the round went on without it
    released = secagg.replies["RelayedShares"]
    assert kinds(released) == ["LedgerHead", "Decline"]  # no CKKS input, no masked input
    head, decline = messages(released)
    assert head.entries == entries + 1 and head == inst.ledger.head()  # the refusal, on record
    assert "budget exhausted" in decline.reason and decline.round_id == start.params.round_id
    assert ledger_lines(config, NAMES[0])[-1]["kind"] == "refusal"


# ------------------------------------------------------------------------------ refusals


def spend_earlier_run(config: FederationConfig, name: str) -> None:
    """Charge ``name``'s ledger with an earlier run's release that uses up its epsilon-4 budget."""
    spent = Ledger(ledger_path(config.run_dir, name), institution=name, delta=DELTA,
                   identity=load_institution_keys(config.keys_dir, name).identity,
                   budget_epsilon=100.0, accountant="rdp")  # fmt: skip
    spent.charge([DPTrainingFacts(noise_multiplier=0.6, sample_rate=1.0, steps=20,
                                  max_grad_norm=1.0, delta=DELTA).release(0, 1)])  # fmt: skip


def test_a_round_over_budget_sends_the_head_then_a_decline_and_nothing_else(config):
    name = NAMES[2]  # a budget of epsilon 4, already spent by an earlier run
    spend_earlier_run(config, name)
    inst = make_institution(config, name)
    start = round_start(config, inst)

    outputs = inst.rounds.handle(start)
    assert kinds(outputs) == ["LedgerHead", "Decline"]  # no training, no keys, no memory
    head, decline = messages(outputs)
    assert head.entries == 2 and head == inst.ledger.head()  # the refusal, on record first
    assert "budget exhausted" in decline.reason
    assert (decline.round_id, decline.client_id) == (start.params.round_id, 2)
    assert [e["kind"] for e in ledger_lines(config, name)] == ["release", "refusal"]
    # the coordinator cannot pull it back into the round
    secagg = SecAggRound(config, inst, start.params)
    for cid, client in secagg.others.items():
        secagg.server.receive(cid, client.advertise())
    roster = secagg.server.advance()
    assert inst.rounds.handle(replace_round(roster[0], start.params.round_id)) == []
    line = inst.rounds.handle(RoundEnd(round_id=start.params.round_id, included=[0, 1]))[0].line
    assert line["included"] is False and line["train"] is None
    assert "budget exhausted" in line["declined"]


def replace_round(message: msgspec.Struct, rid: int) -> msgspec.Struct:
    return msgspec.structs.replace(message, round_id=rid)


@pytest.mark.parametrize(
    ("extras", "match"),
    [
        (b"not safetensors", "not valid safetensors"),
        (encode_extras({"unexpected": np.zeros(3)}), "expects"),
    ],
)
def test_malformed_extras_are_declined_with_no_advertisement_and_serving_goes_on(
    config, caplog, extras, match
):
    inst = make_institution(config, NAMES[0])
    bad = round_start(config, inst, extras=extras)
    with caplog.at_level(logging.WARNING, logger="clients.runtime.rounds"):
        outputs = inst.rounds.handle(bad)
    assert kinds(outputs) == ["Decline"]  # no keys, no memory, no charge
    (decline,) = messages(outputs)
    assert decline.reason.startswith("malformed extras") and re.search(match, decline.reason)
    assert any("refused the broadcast extras" in r.getMessage() for r in caplog.records)
    assert inst.ledger.head().entries == 0
    # a key roster for the declined round gets nothing out of it
    assert inst.rounds.handle(KeyRoster(round_id=bad.params.round_id, keys=[])) == []

    good = round_start(config, inst, attempt=1)
    outputs = inst.rounds.handle(good)
    assert kinds(outputs) == ["AdvertiseKeys"]
    assert messages(outputs)[0].round_id == good.params.round_id


# ------------------------------------------------------------------------------ stale, foreign


def test_stale_foreign_and_unawaited_messages_give_no_output(config, caplog):
    caplog.set_level(logging.INFO, logger="clients.runtime.rounds")
    inst = make_institution(config, NAMES[0])
    rounds = inst.rounds
    assert rounds.handle(Assignment(round_id=1, selection=b"\x01")) == []  # no round at all
    assert rounds.handle(KeyRoster(round_id=1, keys=[])) == []
    assert rounds.handle(RoundEnd(round_id=1, included=[0])) == []

    start = round_start(config, inst)
    rid = start.params.round_id
    advertised = rounds.handle(start)
    assert kinds(advertised) == ["AdvertiseKeys"]
    # FedAvg never awaits an assignment: not for this round, not for another
    assert rounds.handle(Assignment(round_id=rid, selection=b"\x01")) == []
    assert rounds.handle(Assignment(round_id=rid + 1, selection=b"\x01")) == []

    secagg = SecAggRound(config, inst, start.params)
    secagg.deliver(advertised)
    for cid, client in secagg.others.items():
        secagg.server.receive(cid, client.advertise())
    roster = secagg.server.advance()[0]
    for foreign in (rid - 1, rid + 1):  # a stale attempt, a round not started yet
        assert rounds.handle(replace_round(roster, foreign)) == []
        assert rounds.handle(RoundEnd(round_id=foreign, included=[0, 1, 2])) == []
    assert rounds.round_id == rid
    assert any("ignored KeyRoster for round" in r.getMessage() for r in caplog.records)
    assert any("ignored an Assignment" in r.getMessage() for r in caplog.records)
    # none of it disturbed the round: the real roster is answered
    assert kinds(rounds.handle(roster)) == ["ShareKeys"]
    assert inst.ledger.head().entries == 0


# ------------------------------------------------------------------------------ FedAMoLE


def fedamole_round_with_keys(config: FederationConfig, inst: Institution, federation_round: int):
    """A RoundStart whose broadcast state has expert keys, so the round starts with scores."""
    fed = fedamole_config(config)
    initial = Coordinator(config).initial_state()
    state = state_from_global(fed, initial)
    rng = np.random.default_rng(0)
    keyed = replace(
        state,
        keys=rng.normal(size=state.keys.shape),
        key_counts=np.ones(state.key_counts.shape),
    ).to_global()
    start = round_start(
        config, inst, federation_round=federation_round,
        global_state=save_torch(keyed.adapters), extras=encode_extras(keyed.extras),
    )  # fmt: skip
    return start, encode_assignment(state.assignment)


@pytest.fixture
def fedamole(tmp_path) -> FederationConfig:
    """The federation tests' tiny FedAMoLE federation."""
    return own_config(tmp_path, "fedamole", rounds=3)


def test_fedamole_scores_are_charged_and_the_head_sent_before_them(fedamole):
    config = fedamole
    inst = make_institution(config, NAMES[0])
    start, assignment = fedamole_round_with_keys(config, inst, federation_round=2)
    rid = start.params.round_id

    outputs = inst.rounds.handle(start)
    assert kinds(outputs) == ["LedgerHead", "AffinityScores"]  # no keys advertised yet
    head, scores = messages(outputs)
    assert head.entries == 1 and head == inst.ledger.head()
    assert [(e["what"], e["round_id"]) for e in ledger_lines(config, NAMES[0])] == [
        ("affinity-scores", rid)
    ]
    assert isinstance(scores, AffinityScores) and scores.round_id == rid and scores.client_id == 0

    # awaiting the assignment: one for another round, or a stale one, is ignored
    assert inst.rounds.handle(Assignment(round_id=rid + 1, selection=assignment)) == []
    assert inst.rounds.handle(Assignment(round_id=rid - 1, selection=assignment)) == []
    trained = inst.rounds.handle(Assignment(round_id=rid, selection=assignment))
    assert kinds(trained) == ["AdvertiseKeys"]
    # the assignment was used once: a replay gets nothing
    assert inst.rounds.handle(Assignment(round_id=rid, selection=assignment)) == []


def test_fedamole_malformed_assignment_is_declined_and_serving_goes_on(fedamole, caplog):
    config = fedamole
    inst = make_institution(config, NAMES[0])
    start, _ = fedamole_round_with_keys(config, inst, federation_round=2)
    assert kinds(inst.rounds.handle(start)) == ["LedgerHead", "AffinityScores"]
    with caplog.at_level(logging.WARNING, logger="clients.runtime.rounds"):
        outputs = inst.rounds.handle(Assignment(round_id=start.params.round_id, selection=b"\x01"))
    assert kinds(outputs) == ["Decline"]
    assert messages(outputs)[0].reason.startswith("malformed assignment")
    assert any("refused the assignment" in r.getMessage() for r in caplog.records)

    again, _ = fedamole_round_with_keys(config, inst, federation_round=3)
    assert kinds(inst.rounds.handle(again)) == ["LedgerHead", "AffinityScores"]


def test_fedamole_scores_over_budget_send_the_head_then_a_decline(fedamole):
    config = fedamole
    name = NAMES[2]
    spend_earlier_run(config, name)
    inst = make_institution(config, name)
    start, _ = fedamole_round_with_keys(config, inst, federation_round=2)
    outputs = inst.rounds.handle(start)
    assert kinds(outputs) == ["LedgerHead", "Decline"]  # no scores left
    assert "budget exhausted" in messages(outputs)[1].reason
    assert [e["kind"] for e in ledger_lines(config, name)] == ["release", "refusal"]


# ------------------------------------------------------------------------------ memory


class Outbox:
    """Stands in for the institution's endpoint (not under test): keeps what it sends."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)


@pytest.fixture
def fedalign(tmp_path) -> FederationConfig:
    """The federation tests' tiny FedAlign-MoE federation (it keeps memory between rounds)."""
    return strategy_config(tmp_path, "fedalign")


def test_strategy_memory_is_kept_after_the_charge_before_the_input_or_the_round_is_declined(
    fedalign,
):
    config = fedalign
    inst = make_institution(config, NAMES[0])
    start = round_start(config, inst)
    advertised = inst.rounds.handle(start)
    assert kinds(advertised) == ["AdvertiseKeys"]  # nothing kept before the charge
    secagg = SecAggRound(config, inst, start.params)
    secagg.run(advertised)
    released = secagg.replies["RelayedShares"]
    assert kinds(released)[:2] == ["PersistMemory", "LedgerHead"]
    assert kinds(released)[-1] == "MaskedInput"
    assert set(load_numpy(released[0].data)) == set(inst.learner.adapters())

    # the loop: memory that cannot be kept is never followed by the head or the input
    inst.memory_path.mkdir()  # a folder where the file goes: the write fails
    again = round_start(config, inst, attempt=1)
    secagg = SecAggRound(config, inst, again.params)
    inst._endpoint = outbox = Outbox()
    inst._carry_out(inst.rounds.handle(again))
    for cid, client in secagg.others.items():
        secagg.server.receive(cid, client.advertise())
    for _ in range(10):  # the round's stages, until the institution declines
        for message in outbox.sent[-1:]:
            if isinstance(message, TO_SERVER):
                secagg.server.receive(secagg.me, message)
        if Decline in map(type, outbox.sent):
            break
        for cid, message in secagg.server.advance().items():
            if cid == secagg.me:
                inst._carry_out(inst.rounds.handle(message))
            else:
                secagg.server.receive(cid, secagg.others[cid].handle(message))
    sent = [type(m) for m in outbox.sent]
    assert sent == [AdvertiseKeys, ShareKeys, Decline]  # no head, no CKKS or masked input
    assert outbox.sent[-1].reason.startswith("local failure")
    assert ledger_lines(config, NAMES[0])[-1]["round_id"] == again.params.round_id  # charged
    inst.memory_path.rmdir()


def fedmoe_round(config: FederationConfig, inst: Institution, attempt: int = 0) -> SecAggRound:
    """One FedMoE round of ``inst`` with real SecAgg+ peers, run to its end."""
    start = round_start(config, inst, attempt=attempt)
    advertised = inst.rounds.handle(start)
    assert kinds(advertised) == ["AdvertiseKeys"]
    secagg = SecAggRound(config, inst, start.params)
    secagg.run(advertised)
    return secagg


def test_fedmoe_validation_signal_is_charged_with_the_round_before_anything_leaves(tmp_path):
    """FedMoE's noised validation signal steers the next rounds' sub-MoE: it is on the ledger
    (with the update and the routing statistics) when the head goes out, before any input, and
    the strategy takes it (and keeps it in its memory) only after that charge."""
    config = strategy_config(tmp_path, "fedmoe")
    inst = make_institution(config, NAMES[0])
    assert math.isnan(inst.learner.strategy.signal)
    secagg = fedmoe_round(config, inst)
    released = secagg.replies["RelayedShares"]
    assert kinds(released)[:2] == ["PersistMemory", "LedgerHead"]
    assert kinds(released)[-1] == "MaskedInput"
    memory = load_numpy(released[0].data)
    assert math.isfinite(memory["lam_signal"][1])  # kept locally, never sent
    assert memory["lam_signal"][1] == inst.learner.strategy.signal
    head = messages(released)[0]
    assert secagg.ledger_entries_before["RelayedShares"] == 0
    assert head.entries == 3 and head == inst.ledger.head()
    entries = ledger_lines(config, NAMES[0])
    round_id_ = secagg.server.params.round_id
    assert [(e["what"], e["round_id"]) for e in entries] == [
        ("adapter-update", round_id_),
        ("routing-statistics", round_id_),
        ("validation-signal", round_id_),
    ]


def test_a_refused_fedmoe_release_steers_nothing(tmp_path):
    """When the charge is refused, the noised validation signal of that round is dropped: the
    strategy's state and memory are as before the round."""
    config = strategy_config(tmp_path, "fedmoe")
    inst = make_institution(config, NAMES[0])
    start = round_start(config, inst)
    advertised = inst.rounds.handle(start)
    spend_until_this_round_is_refused(inst)
    secagg = SecAggRound(config, inst, start.params)
    with pytest.raises(TooFewSurvivors):  # this federation's threshold needs every institution
        secagg.run(advertised)
    assert kinds(secagg.replies["RelayedShares"]) == ["LedgerHead", "Decline"]
    assert math.isnan(inst.learner.strategy.signal)  # the uncharged signal was never taken


def test_the_outputs_are_only_records(config):
    """The round logic hands out records; it never writes the metrics itself."""
    inst = make_institution(config, NAMES[0])
    (initial,) = inst.rounds.begin()
    assert isinstance(initial, AppendMetrics) and initial.line["event"] == "initial"
    assert not inst.metrics_path.exists()
    assert not any(isinstance(o, PersistMemory) for o in inst.rounds.begin())
