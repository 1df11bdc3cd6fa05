"""FedAMoLE and DDOME driven by the ZeroMQ runtime over real loopback sockets.

Each round's checkpoint equals the strategy's coordinator side applied to the plaintext sum of
the institutions' recorded submissions. FedAMoLE: the selection stage carries exactly the
noised scores the institutions computed, each charged to its ledger before it left; every
assignment meets its constraints and is the solver's answer to those scores; malformed scores
are refused and the round goes on without their sender.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from audit.verify import verify_ledger
from clients.contract.config import FederationConfig
from clients.contract.config import load_config
from clients.contract.keys import load_roster
from clients.contract.layout import CHANNEL_BOUND
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import GlobalState
from clients.contract.messages import AffinityScores
from clients.contract.messages import Assignment
from clients.contract.messages import decode_from_client
from clients.contract.messages import decode_from_server
from clients.runtime.rounds import InstitutionRounds
from clients.strategies.ddome import CHOICE_SENSITIVITY
from clients.strategies.ddome import EXPERT_COUNTS
from clients.strategies.ddome import DDOMEClient
from clients.strategies.fedamole import ASSIGNMENT
from clients.strategies.fedamole import KEY_COUNTS
from clients.strategies.fedamole import KEYS
from clients.strategies.fedamole import FedAMoLEClient
from clients.strategies.fedamole import FedAMoLELearner
from clients.strategies.fedamole import amole_modules
from clients.strategies.fedamole import decode_assignment
from clients.strategies.fedamole import decode_embedding
from clients.strategies.fedamole import fedamole_config
from clients.strategies.fedamole import score_embedding
from clients.strategies.fedamole import state_from_global
from coordinator.service import Coordinator
from coordinator.strategies.fedamole import FedAMoLEStrategy
from coordinator.strategies.fedamole import assign
from coordinator.strategies.fedamole import public_state
from coordinator.strategies.registry import coordinator_strategy
from privacy import BudgetExceeded
from secagg import FixedPointCodec
from secagg.errors import MalformedMessage
from secagg.messages import encode
from tests.federation_harness import assert_caps_admit
from tests.federation_harness import record_frames
from tests.federation_harness import run_in_threads
from tests.test_federation import NAMES
from tests.test_federation import write_config

Recorded = dict[tuple[int, str], dict[str, np.ndarray]]


def own_config(
    tmp_path: Path, strategy: str, rounds: int, *, romances: bool = False
) -> FederationConfig:
    """The tiny federation with FedAMoLE (scores on its 8 validation blocks) or DDOME.

    ``romances`` adds a fourth institution, so that a round can go on without one.
    """
    path = write_config(tmp_path, rounds=rounds, romances=romances)
    path.write_text(re.sub(r'(?m)^strategy = "\w+"', f'strategy = "{strategy}"', path.read_text()))
    return load_config(path)


def record_submissions(monkeypatch, cls: type) -> Recorded:
    """(round, institution) -> the values it submitted."""
    recorded: Recorded = {}
    original = cls.submit

    def submit(self, state, update, weight, *args):
        submission = original(self, state, update, weight, *args)
        name = threading.current_thread().name
        r = 1 + sum(1 for (_, n) in recorded if n == name)
        recorded[(r, name)] = {k: np.array(v, copy=True) for k, v in submission.values.items()}
        return submission

    monkeypatch.setattr(cls, "submit", submit)
    return recorded


def checkpoint(config: FederationConfig, r: int, like: GlobalState) -> GlobalState:
    from clients.contract.extras import decode_extras

    base = config.run_dir / "checkpoints" / f"round-{r:04d}"
    extras = decode_extras(base.with_suffix(".extras").read_bytes())
    return GlobalState(load_file(base.with_suffix(".safetensors")), like.routing, extras)


def assert_rounds_match_plaintext(
    config: FederationConfig,
    outcomes,
    recorded: Recorded,
    states: dict[int, GlobalState],
    institutions,
) -> None:
    """Round r's checkpoint is the coordinator side applied to the plaintext sum of round r's
    submissions, from ``states[r]`` (the state the institutions trained from)."""
    cap = config.data.max_blocks.train
    lightest = min(min(len(inst.data["train"]), cap) / cap for inst in institutions)
    strategy = coordinator_strategy(config)
    q = FixedPointCodec(
        clip=CHANNEL_BOUND, bits=config.secagg.bits, modulus_bits=config.secagg.modulus_bits,
        max_clients=len(NAMES),
    ).max_error_per_client  # fmt: skip
    for outcome in outcomes:
        r, included = outcome.federation_round, outcome.included
        layout = strategy.layout(states[r])
        packed = [layout.pack(recorded[(r, n)])["mask"] for n in included]
        expected = strategy.aggregate(states[r], {"mask": np.sum(packed, axis=0)})
        got = checkpoint(config, r, states[r])
        moved = 0.0
        m = len(included)
        for name, old in states[r].adapters.items():
            want, have = expected.adapters[name].double(), got.adapters[name].double()
            step = (want - old.double()).abs().numpy()
            # every divisor is a sum of >= 1 weight of >= `lightest`; each of the m summands is
            # off by < q (times the bound) in the delta sum and in the weight sum
            bound = layout[DELTA_PREFIX + name].bound
            atol = m * q * (bound + step) / (lightest - m * q)
            np.testing.assert_array_less(np.abs(have.numpy() - want.numpy()), atol + 1e-7)
            moved = max(moved, float(step.max()))
        assert moved > 1e-4  # real updates were compared, not zeros
        assert got.extras.keys() == expected.extras.keys()
        for key, value in expected.extras.items():
            np.testing.assert_allclose(got.extras[key], value, atol=4 * len(included) * q)


def ledger_entries(config: FederationConfig, name: str) -> list[dict]:
    path = config.run_dir / "institutions" / name / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ddome_rounds_equal_plaintext_and_every_institution_evaluates_the_result(
    tmp_path, monkeypatch
):
    config = own_config(tmp_path, "ddome", rounds=2)
    recorded = record_submissions(monkeypatch, DDOMEClient)
    frames = record_frames(monkeypatch)
    outcomes, institutions = run_in_threads(config)
    assert [o.error for o in outcomes] == [None, None]
    assert_caps_admit(config, frames)
    initial = Coordinator(config).initial_state()
    states = {1: initial, 2: checkpoint(config, 1, initial)}
    assert_rounds_match_plaintext(config, outcomes, recorded, states, institutions)
    # the counts say how many institutions trained each expert: top_k each
    counts = checkpoint(config, 2, initial).extras[EXPERT_COUNTS]
    assert counts.sum() == pytest.approx(len(NAMES) * config.model.moe.top_k, abs=0.01)
    for inst in institutions:
        lines = [json.loads(x) for x in inst.metrics_path.read_text().splitlines()]
        assert [x["event"] for x in lines] == ["initial", "round", "round", "final"]
        assert np.isfinite(lines[-1]["test"]["perplexity"])
        # DDOME releases its noised expert choice, then its DP-SGD update, once per round
        entries = [e for e in ledger_entries(config, inst.name) if e["kind"] == "release"]
        assert [e["what"] for e in entries] == ["expert-choice", "adapter-update"] * 2
        choice = entries[0]["parameters"]
        assert choice["l2_sensitivity"] == CHOICE_SENSITIVITY == 1.0
        assert choice["noise_std"] == config.aggregation.ddome.choice_noise_multiplier


def test_fedamole_selection_stage_releases_only_charged_scores_and_solves_the_assignment(
    tmp_path, monkeypatch
):
    config = own_config(tmp_path, "fedamole", rounds=3)
    recorded = record_submissions(monkeypatch, FedAMoLEClient)
    computed: dict[tuple[int, str], bytes] = {}  # the embedding each institution released
    received: list[tuple[GlobalState, dict[int, np.ndarray], GlobalState]] = []
    sent_assignments: list[bytes] = []
    original_scores, original_select = FedAMoLELearner.scores, FedAMoLEStrategy.select

    def scores(self, state, federation_round, round_id, charge):
        out = original_scores(self, state, federation_round, round_id, charge)
        computed[(federation_round, threading.current_thread().name)] = out.tobytes()
        return out

    def select(self, state, scores):
        chosen = original_select(self, state, scores)
        received.append((state, {c: s.copy() for c, s in scores.items()}, chosen))
        return chosen

    original_on_assignment = InstitutionRounds._on_assignment

    def on_assignment(self, message):
        sent_assignments.append(message.selection)
        original_on_assignment(self, message)

    monkeypatch.setattr(FedAMoLELearner, "scores", scores)
    monkeypatch.setattr(FedAMoLEStrategy, "select", select)
    monkeypatch.setattr(InstitutionRounds, "_on_assignment", on_assignment)
    frames = record_frames(monkeypatch)
    outcomes, institutions = run_in_threads(config)
    assert [o.error for o in outcomes] == [None, None, None]
    assert_caps_admit(config, frames)  # scores, assignments and keys fit the computed caps

    fed = fedamole_config(config)
    initial = Coordinator(config).initial_state()
    # round 1 has no keys: no scores, the public round-0 assignment
    assert {r for r, _ in computed} == {2, 3} and len(received) == 2
    public = public_state(fed, initial.adapters, amole_modules(initial.adapters))
    np.testing.assert_array_equal(initial.extras[ASSIGNMENT], public.assignment)
    for federation_round, (before, scores_in, chosen) in enumerate(received, start=2):
        assert sorted(scores_in) == [0, 1, 2]
        sent_shape = (len(state_from_global(fed, before).modules), fed.adapter.rank)
        for cid, name in enumerate(NAMES):  # the coordinator scored exactly what was released
            embedding = decode_embedding(computed[(federation_round, name)], sent_shape)
            expected = score_embedding(fed, state_from_global(fed, before), embedding)
            np.testing.assert_array_equal(scores_in[cid], expected)
        assignment = state_from_global(fed, chosen).assignment  # [M, E, C]
        assert np.all(assignment.sum(-1) == fed.params.clients_per_expert)
        held = assignment.sum(1)
        assert np.all((fed.params.min_experts <= held) & (held <= fed.params.max_experts))
        solved = assign(fed, state_from_global(fed, before), scores_in)
        np.testing.assert_array_equal(assignment, solved.assignment)
    # each institution received the assignment, as bytes of the public shape
    assert len(sent_assignments) == 2 * len(NAMES)
    shape = initial.extras[ASSIGNMENT].shape
    choices = [state_from_global(fed, c).assignment for _, _, c in received]
    for selection in sent_assignments:
        assert any(np.array_equal(decode_assignment(selection, shape), a) for a in choices)

    # every score that left an institution has a ledger entry for its round, and the chain
    # (scores, then DP-SGD and keys) verifies against the roster's identity key
    roster = load_roster(config.keys_dir / "roster.toml")
    for name in NAMES:
        entries = ledger_entries(config, name)
        releases = [(e["federation_round"], e["what"]) for e in entries if e["kind"] == "release"]
        assert releases == [
            (1, "adapter-update"), (1, "expert-keys"),
            (2, "affinity-scores"), (2, "adapter-update"), (2, "expert-keys"),
            (3, "affinity-scores"), (3, "adapter-update"), (3, "expert-keys"),
        ]  # fmt: skip
        verify_ledger(
            config.run_dir / "institutions" / name / "ledger.jsonl",
            roster.institution(name).identity_key,
        )

    # rounds 2 and 3 trained from the last checkpoint's adapters and keys, newly assigned
    states = {1: initial, 2: received[0][2], 3: received[1][2]}
    for r in (2, 3):
        kept = checkpoint(config, r - 1, initial)
        for key in (KEYS, KEY_COUNTS):
            np.testing.assert_array_equal(states[r].extras[key], kept.extras[key])
        for name, tensor in kept.adapters.items():
            np.testing.assert_array_equal(states[r].adapters[name].numpy(), tensor.numpy())
    assert_rounds_match_plaintext(config, outcomes, recorded, states, institutions)


def test_malformed_scores_are_refused_and_the_round_goes_on_without_their_sender(
    tmp_path, monkeypatch, caplog
):
    config = own_config(tmp_path, "fedamole", rounds=2, romances=True)
    original_scores = FedAMoLELearner.scores

    def short_scores(self, state, federation_round, round_id, charge):
        out = original_scores(self, state, federation_round, round_id, charge)
        return out.ravel()[:-1] if threading.current_thread().name == NAMES[2] else out

    monkeypatch.setattr(FedAMoLELearner, "scores", short_scores)
    with caplog.at_level(logging.WARNING, logger="coordinator.service"):
        outcomes, _ = run_in_threads(config)
    assert [o.error for o in outcomes] == [None, None]
    assert outcomes[1].included == [*NAMES[:2], "romances"]
    assert any(
        "refused the scores of histories" in r.getMessage() and "bytes" in r.getMessage()
        for r in caplog.records
    )
    final = checkpoint(config, 2, Coordinator(config).initial_state())
    assignment = state_from_global(fedamole_config(config), final).assignment
    assert not assignment[:, :, 2].any()  # the refused institution held no expert in round 2


def test_selection_messages_only_travel_in_their_direction():
    scores = AffinityScores(round_id=7, client_id=1, scores=np.zeros(4).tobytes())
    choice = Assignment(round_id=7, selection=bytes(8))
    assert decode_from_client(encode(scores)) == scores
    assert decode_from_server(encode(choice)) == choice
    with pytest.raises(MalformedMessage):
        decode_from_server(encode(scores))
    with pytest.raises(MalformedMessage):
        decode_from_client(encode(choice))


def test_an_institution_that_declines_at_the_scores_is_left_out_and_the_round_goes_on(
    tmp_path, monkeypatch
):
    config = own_config(tmp_path, "fedamole", rounds=2, romances=True)
    original_check = InstitutionRounds._on_round_start

    def refusing(self, start):  # histories' officer refuses every release from round 2 on
        if self.name == NAMES[2] and start.federation_round == 2:

            def refuse(releases):
                raise BudgetExceeded(self.ledger.spent(), 99.0, 1.0, self.ledger.delta)

            monkeypatch.setattr(self.ledger, "check", refuse)
        original_check(self, start)

    monkeypatch.setattr(InstitutionRounds, "_on_round_start", refusing)
    outcomes, _ = run_in_threads(config)
    assert [o.error for o in outcomes] == [None, None]
    assert outcomes[1].included == [*NAMES[:2], "romances"]
    kinds = [
        (e["federation_round"], e["what"])
        for e in ledger_entries(config, NAMES[2])
        if e["kind"] == "release"
    ]
    assert kinds == [(1, "adapter-update"), (1, "expert-keys")]  # nothing left in round 2
    final = checkpoint(config, 2, Coordinator(config).initial_state())
    assert not state_from_global(fedamole_config(config), final).assignment[:, :, 2].any()
