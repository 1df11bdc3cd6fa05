"""The signed, hash-chained privacy ledger: write-ahead charges, refusals, tamper detection."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import dp_accounting
import msgspec
import pytest
import zmq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dp_accounting import pld
from dp_accounting import rdp

from audit import HeadFileError
from audit import HeadRefused
from audit import Ledger
from audit import LedgerError
from audit import LedgerTampered
from audit import check_extends
from audit import head_path
from audit import head_to_json
from audit import ledger_path
from audit import read_head
from audit import read_heads
from audit import verify_ledger
from audit.entry import chain_hash
from audit.entry import entry_digest
from audit.entry import head_signature_ok
from audit.entry import line_bytes
from audit.entry import line_hash
from audit.entry import sign_entry
from audit.entry import sign_head
from audit.events import EventFormatError
from audit.events import event_from_json
from audit.events import event_to_json
from audit.verify import parse_entry
from clients.contract.messages import decode_from_client
from clients.runtime.transport import InstitutionEndpoint
from coordinator.app.cli import main
from coordinator.service import Coordinator
from coordinator.store import RunStore
from coordinator.transport import CoordinatorEndpoint
from privacy import ADAPTER_UPDATE
from privacy import ROUTING_STATISTICS
from privacy import AlreadyReleased
from privacy import BudgetExceeded
from privacy import DPTrainingFacts
from privacy import GaussianMechanism
from privacy import Release
from privacy.head import MAX_PROOF
from privacy.head import LedgerHead
from secagg.errors import MalformedMessage

DELTA = 1e-5
NAME = "comedies"


@pytest.fixture(autouse=True)
def quiet_absl():
    logging.getLogger("absl").setLevel(logging.ERROR)


def round_releases(federation_round: int, sigma: float = 2.0, routing_sigma: float = 8.0):
    """A DP-SGD update and noised routing statistics, as an institution releases them."""
    rid = federation_round << 16
    facts = DPTrainingFacts(sigma, 0.25, 2, 1.0, DELTA)
    routing = GaussianMechanism(routing_sigma, 3.0, ROUTING_STATISTICS)
    return [facts.release(federation_round, rid), routing.release(federation_round, rid, "test")]


def cheap_releases(federation_round: int):
    """Two Gaussian releases (priced in milliseconds, where Poisson sampling takes 0.4 s)."""
    rid = federation_round << 16
    return [
        Release(federation_round, rid, ADAPTER_UPDATE, dp_accounting.GaussianDpEvent(6.0)),
        Release(federation_round, rid, ROUTING_STATISTICS, dp_accounting.GaussianDpEvent(9.0)),
    ]


def open_ledger(path: Path, key: Ed25519PrivateKey, budget: float = 8.0) -> Ledger:
    return Ledger(path, institution=NAME, identity=key, budget_epsilon=budget, delta=DELTA,
                  accountant="rdp")  # fmt: skip


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def ledger_file(tmp_path, key) -> Path:
    """A ledger of three charged rounds (six entries)."""
    path = tmp_path / "institutions" / NAME / "ledger.jsonl"
    ledger = open_ledger(path, key)
    ledger.charge(round_releases(1))
    for r in (2, 3):
        ledger.charge(cheap_releases(r))
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write(path: Path, rows: list[str]) -> None:
    path.write_text("".join(row + "\n" for row in rows))


def problem(path: Path, key: Ed25519PrivateKey, **kwargs) -> LedgerTampered:
    with pytest.raises(LedgerTampered) as info:
        verify_ledger(path, key.public_key(), **kwargs)
    return info.value


# ------------------------------------------------------------------------------ writing


def test_charge_is_on_disk_when_it_returns_and_reloads(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    ledger = open_ledger(path, key)
    written = ledger.charge(round_releases(1))
    rows = lines(path)  # read back through a separate file handle
    assert len(rows) == 2
    assert [parse_entry(r) for r in rows] == list(written)
    assert json.loads(rows[1])["prev"] == line_hash(rows[0].encode())
    again = open_ledger(path, key)
    assert again.spent() == pytest.approx(ledger.spent()) and again.spent() > 0
    assert again.head().entries == 2 and again.head().last_hash.hex() == line_hash(rows[1].encode())


def test_epsilon_equals_dp_accounting_computed_independently(tmp_path, key):
    ledger = open_ledger(tmp_path / "ledger.jsonl", key)
    for r in (1, 2):
        ledger.charge(round_releases(r))
    entries = ledger.entries
    accountants = {
        "rdp": rdp.RdpAccountant(),
        "pld": pld.PLDAccountant(value_discretization_interval=1e-4),
    }
    for round_number, pair in enumerate(zip(entries[::2], entries[1::2], strict=True), start=1):
        dp_sgd = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(2.0)), 2
        )
        for acc in accountants.values():
            acc.compose(dp_sgd)
            acc.compose(dp_accounting.GaussianDpEvent(8.0))
        assert all(e.federation_round == round_number for e in pair)
        for name, acc in accountants.items():
            assert getattr(pair[1].epsilon, name) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert entries[-1].epsilon.rdp != pytest.approx(entries[-1].epsilon.pld, rel=1e-3)


def test_a_release_over_budget_is_refused_recorded_and_not_charged(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    ledger = open_ledger(path, key, budget=1.5)
    ledger.charge(round_releases(1, sigma=4.0, routing_sigma=20.0))
    spent = ledger.spent()
    with pytest.raises(BudgetExceeded, match=r"budget is epsilon=1\.5") as info:
        ledger.charge(round_releases(2, sigma=0.5))
    assert info.value.projected > 1.5
    assert ledger.spent() == spent
    rows = [json.loads(r) for r in lines(path)]
    assert [r["kind"] for r in rows] == ["release", "release", "refusal"]
    assert rows[2]["what"] == "adapter-update+routing-statistics"
    assert rows[2]["epsilon"]["rdp"] == pytest.approx(info.value.projected)
    assert "budget exhausted" in rows[2]["reason"]
    assert verify_ledger(path, key.public_key()).spent.rdp == pytest.approx(spent)


def test_check_refuses_like_charge_without_charging(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    ledger = open_ledger(path, key, budget=0.5)
    with pytest.raises(BudgetExceeded):
        ledger.check(round_releases(1, sigma=0.5))
    assert ledger.spent() == 0.0
    assert [json.loads(r)["kind"] for r in lines(path)] == ["refusal"]
    ledger.check(round_releases(1, sigma=50.0, routing_sigma=50.0))  # fits: records nothing
    assert len(lines(path)) == 1


def test_a_second_release_in_one_round_id_is_refused_even_after_a_restart(ledger_file, key):
    restarted = open_ledger(ledger_file, key)
    with pytest.raises(AlreadyReleased, match="already has a adapter-update, routing-statistics"):
        restarted.charge(cheap_releases(3))
    assert json.loads(lines(ledger_file)[-1])["reason"].startswith("round id")
    verify_ledger(ledger_file, key.public_key())  # the refusal is a valid entry too


def test_a_torn_last_line_is_dropped_on_open_and_reported_by_verify(ledger_file, key):
    with ledger_file.open("a") as f:
        f.write('{"version": 1, "seq": 6, "pre')  # a crash in the middle of a write
    assert "last line is incomplete" in str(problem(ledger_file, key))
    assert len(open_ledger(ledger_file, key).entries) == 6  # repaired: never released
    verify_ledger(ledger_file, key.public_key())


def test_a_tampered_ledger_cannot_be_opened_for_more_charges(ledger_file, key):
    rows = lines(ledger_file)
    write(ledger_file, rows[:2] + rows[3:])
    with pytest.raises(LedgerError, match=r"ledger.jsonl:3: .*will not add to it"):
        open_ledger(ledger_file, key)


# ------------------------------------------------------------------------------ verify


def test_an_untouched_ledger_verifies_with_its_head(ledger_file, key):
    head = open_ledger(ledger_file, key).head()
    verified = verify_ledger(ledger_file, key.public_key(), institution=NAME, head=head)
    assert len(verified.entries) == 6 and verified.head_checked


def _edit(rows: list[str], index: int, **changes) -> list[str]:
    record = json.loads(rows[index])
    record.update(changes)
    return [*rows[:index], json.dumps(record), *rows[index + 1 :]]


@pytest.mark.parametrize(
    ("tamper", "line", "message"),
    [
        ("edited", 2, "signature does not verify"),
        ("deleted", 2, "sequence number 2 where 1 belongs"),
        ("inserted", 3, "sequence number 1 where 2 belongs"),
        ("reordered", 2, "sequence number 2 where 1 belongs"),
        ("not json", 4, "not JSON"),
        ("unknown field", 1, "not a ledger entry"),
    ],
)
def test_each_kind_of_tampering_is_detected(ledger_file, key, tamper, line, message):
    rows = lines(ledger_file)
    if tamper == "edited":  # a smaller noise multiplier would hide spending
        record = json.loads(rows[1])
        record["event"]["noise_multiplier"] = 80.0
        rows[1] = json.dumps(record)
    elif tamper == "deleted":
        del rows[1]
    elif tamper == "inserted":
        rows.insert(2, rows[1])
    elif tamper == "reordered":
        rows[1], rows[2] = rows[2], rows[1]
    elif tamper == "not json":
        rows[3] = rows[3][:-5]
    else:
        rows = _edit(rows, 0, note="hello")
    write(ledger_file, rows)
    found = problem(ledger_file, key)
    assert (found.path, found.line) == (ledger_file, line)
    assert message in found.problem
    assert str(found).startswith(f"{ledger_file}:{line}: ")


def test_a_renumbered_deletion_breaks_the_hash_chain(ledger_file, key):
    rows = lines(ledger_file)
    rows = [rows[0], *(_edit(rows, i, seq=i - 1)[i] for i in range(2, 6))]
    write(ledger_file, rows)
    found = problem(ledger_file, key)
    assert found.line == 2 and "prev does not match" in found.problem


def test_a_ledger_signed_by_another_key_is_detected(ledger_file, key):
    impostor = Ed25519PrivateKey.generate()
    prev, rows = "0" * 64, []
    for row in lines(ledger_file):  # a consistent chain, every entry re-signed
        entry = sign_entry(msgspec.structs.replace(parse_entry(row), prev=prev), impostor)
        rows.append(line_bytes(entry).decode())
        prev = line_hash(rows[-1].encode())
    write(ledger_file, rows)
    verify_ledger(ledger_file, impostor.public_key())
    found = problem(ledger_file, key)
    assert found.line == 1 and "signed by another key" in found.problem


def test_an_epsilon_that_does_not_follow_from_its_events_is_detected(ledger_file, key):
    rows = lines(ledger_file)
    entry = parse_entry(rows[3])  # a correctly signed and chained entry whose epsilon is low
    low = msgspec.structs.replace(entry.epsilon, rdp=entry.epsilon.rdp / 2)
    rows[3] = line_bytes(sign_entry(msgspec.structs.replace(entry, epsilon=low), key)).decode()
    write(ledger_file, rows[:4])
    found = problem(ledger_file, key)
    assert found.line == 4 and "rdp epsilon" in found.problem
    assert "does not follow from the recorded events" in found.problem


def test_a_format_1_or_non_canonical_line_is_named_as_such(ledger_file, key):
    rows = lines(ledger_file)
    write(ledger_file, [json.dumps(json.loads(rows[0]), sort_keys=True), *rows[1:]])
    found = problem(ledger_file, key)  # same fields, so same hash: still one spelling only
    assert found.line == 1 and "not in canonical form" in found.problem
    write(ledger_file, _edit(rows, 0, version=1))
    found = problem(ledger_file, key)
    assert found.line == 1 and "format version 1, this verifier reads 2" in found.problem


def test_deleted_tail_entries_are_detected_with_the_coordinators_head(ledger_file, key):
    head = open_ledger(ledger_file, key).head()
    write(ledger_file, lines(ledger_file)[:4])
    verify_ledger(ledger_file, key.public_key())  # without the head, a clean cut is invisible
    found = problem(ledger_file, key, head=head)
    assert "truncated" in found.problem and "entries 5..6 were deleted" in found.problem
    forged = LedgerHead(institution=NAME, entries=4, last_hash=head.last_hash,
                        signature=head.signature)  # fmt: skip
    assert "bad signature" in problem(ledger_file, key, head=forged).problem


# ------------------------------------------------------------------------------ heads


def run_ledger(run_dir: Path, key: Ed25519PrivateKey) -> Ledger:
    return open_ledger(ledger_path(run_dir, NAME), key)


def kept_heads(run_dir: Path) -> list[LedgerHead]:
    return read_heads(head_path(run_dir, NAME))


def honest_run(run_dir: Path, key: Ed25519PrivateKey, rounds: int = 3) -> RunStore:
    """A ledger charged for ``rounds`` rounds, its head accepted by the coordinator after each."""
    store, ledger = RunStore(run_dir), run_ledger(run_dir, key)
    for r in range(1, rounds + 1):
        ledger.charge(cheap_releases(r))
        assert store.save_head(ledger.head())
    return store


def rewritten(run_dir: Path, key: Ed25519PrivateKey, rounds: list[int]) -> Ledger:
    """The attack: the same institution's ledger, with its own key, charged only for ``rounds``
    (a past round's release dropped), written over its real ledger. By itself it verifies."""
    forged = tmp = run_dir / "forged.jsonl"
    ledger = open_ledger(forged, key)
    for r in rounds:
        ledger.charge(cheap_releases(r))
    tmp.replace(ledger_path(run_dir, NAME))
    ledger.path = ledger_path(run_dir, NAME)
    verify_ledger(ledger.path, key.public_key(), institution=NAME)
    return ledger


def test_an_honest_growing_ledger_is_accepted_at_every_head_and_verifies(tmp_path, key, capsys):
    run_dir = tmp_path / "run"
    store = honest_run(run_dir, key, rounds=3)
    ledger = run_ledger(run_dir, key)
    assert not store.save_head(ledger.head())  # the same head again: nothing new to keep
    ledger.charge(cheap_releases(4))  # this head is lost on the way ...
    ledger.charge(cheap_releases(5))
    assert store.save_head(ledger.head())  # ... the next one proves both rounds
    # a restarted coordinator reads its heads back; a torn last line (a crash) is cut off
    with head_path(run_dir, NAME).open("ab") as f:
        f.write(b'{"entries":12,"inst')
    store = RunStore(run_dir)
    ledger.charge(cheap_releases(6))
    assert store.save_head(ledger.head())
    heads = kept_heads(run_dir)
    assert [h.entries for h in heads] == [2, 4, 6, 10, 12]
    assert all(h.proof == () for h in heads)  # checked on arrival, not kept
    verified = verify_ledger(ledger.path, key.public_key(), institution=NAME, heads=heads)
    assert verified.heads_checked == 5 and verified.last_hash == heads[-1].last_hash.hex()
    roster = write_roster(tmp_path, key)
    assert main(["audit", "verify", "--run-dir", str(run_dir), "--roster", str(roster)]) == 0
    out = capsys.readouterr().out
    assert "OK: 1 ledgers verify" in out and "5 checked" in out


def test_a_rewritten_and_resigned_history_is_refused_and_fails_verify(tmp_path, key, capsys):
    run_dir = tmp_path / "run"
    store = honest_run(run_dir, key, rounds=3)
    before = kept_heads(run_dir)
    # round 2's releases dropped, the whole chain signed again by the institution, and longer
    forged = rewritten(run_dir, key, [1, 3, 4, 5])
    head = forged.head()
    assert head.entries == 8 > before[-1].entries and head_signature_ok(head, key.public_key())
    with pytest.raises(HeadRefused, match="history was rewritten"):
        store.save_head(head)
    assert kept_heads(run_dir) == before
    assert head_path(run_dir, NAME).read_bytes().count(b"\n") == 3
    found = problem(forged.path, key, institution=NAME, heads=before)
    assert found.line == 2 and "comedies: rewritten" in found.problem
    assert "head 1 of 3" in found.problem
    roster = write_roster(tmp_path, key)
    assert main(["audit", "verify", str(forged.path), "--roster", str(roster)]) == 1
    err = capsys.readouterr().err
    assert f"FAILED: {forged.path}:2: comedies: rewritten" in err and "head 1 of 3" in err
    # digests made up so the chain passes through the kept head: accepted, but no ledger the
    # institution can show matches it, so verify fails all the same
    digests = [entry_digest(e) for e in forged.entries[6:]]
    last = before[-1].last_hash.hex()
    for digest in digests:
        last = chain_hash(last, digest)
    made_up = sign_head(NAME, 8, last, key, digests)
    assert store.save_head(made_up)
    assert "rewritten" in problem(forged.path, key, heads=kept_heads(run_dir)).problem


def test_a_deleted_ledger_with_heads_on_file_fails_verify(tmp_path, key, capsys):
    run_dir = tmp_path / "run"
    honest_run(run_dir, key, rounds=2)
    path = ledger_path(run_dir, NAME)
    path.unlink()
    found = problem(path, key, institution=NAME, heads=kept_heads(run_dir))
    assert "comedies: the ledger is missing" in found.problem and "was deleted" in found.problem
    roster = write_roster(tmp_path, key)
    assert main(["audit", "verify", str(path), "--roster", str(roster)]) == 1
    assert "comedies: the ledger is missing" in capsys.readouterr().err
    # verifying the whole run directory finds it too: its heads are on file
    assert main(["audit", "verify", "--run-dir", str(run_dir), "--roster", str(roster)]) == 1
    assert "1 of 1 ledgers do not verify" in capsys.readouterr().err


def test_a_truncated_ledger_fails_verify_against_the_kept_heads(tmp_path, key, capsys):
    run_dir = tmp_path / "run"
    honest_run(run_dir, key, rounds=3)
    path = ledger_path(run_dir, NAME)
    write(path, lines(path)[:3])  # cut inside round 2: the heads at 4 and 6 entries are past it
    verify_ledger(path, key.public_key())  # without the heads, a clean cut is invisible
    found = problem(path, key, institution=NAME, heads=kept_heads(run_dir))
    assert "truncated: the coordinator holds a signed head at 4 entries (head 2 of 3)" in str(found)
    roster = write_roster(tmp_path, key)
    assert main(["audit", "verify", str(path), "--roster", str(roster)]) == 1
    assert "comedies: truncated" in capsys.readouterr().err


def test_rolled_back_forked_and_malformed_heads_are_refused_with_a_reason(tmp_path, key):
    run_dir = tmp_path / "run"
    store = honest_run(run_dir, key, rounds=2)
    kept = kept_heads(run_dir)
    ledger = run_ledger(run_dir, key)
    h2 = kept[0]
    cases = [
        (sign_head(NAME, 2, h2.last_hash.hex(), key), "rolled back"),
        (sign_head(NAME, 4, "cd" * 32, key, ledger.head().proof[-2:]), "two histories"),
        (sign_head(NAME, 1, "ab" * 32, key, [bytes(32)] * 2), "2 digests for 1 entries"),
        (sign_head(NAME, 7, "ab" * 32, key, [bytes(32)] * 2), "entries 5..5 are unproven"),
        (sign_head(NAME, 5, "ab" * 32, key, [bytes(32)] * 5), "history was rewritten"),
    ]
    for head, reason in cases:
        with pytest.raises(HeadRefused, match=reason):
            store.save_head(head)
    assert kept_heads(run_dir) == kept
    with pytest.raises(HeadRefused, match="'other'"):
        check_extends(kept[-1], sign_head("other", 5, "ab" * 32, key, [bytes(32)]))


def test_a_ledger_head_crosses_the_wire_and_its_file_round_trips(tmp_path, key):
    head = sign_head(NAME, 5, "12" * 32, key, [bytes([i]) * 32 for i in range(5)])
    assert decode_from_client(msgspec.msgpack.encode(head)) == head
    path = tmp_path / "heads.jsonl"
    path.write_bytes(head_to_json(head) + b"\n")
    assert read_head(path) == msgspec.structs.replace(head, proof=())
    path.write_bytes(b"{}\n")
    with pytest.raises(HeadFileError, match=r"heads\.jsonl:1: not a ledger head"):
        read_heads(path)


def as_frame_fields(head: LedgerHead) -> dict:
    """The fields of ``head`` as msgpack encodes them (bytes kept), with its type tag."""
    return {"type": "LedgerHead", **msgspec.structs.asdict(head)}


@pytest.mark.parametrize(
    ("proof", "what"),
    [
        ([bytes(32)] * (MAX_PROOF + 1), "Expected `array` of length <= 1024"),
        ([bytes(31)], "Expected `bytes` of length >= 32"),
        (["0" * 64], "Expected `bytes`"),
    ],
)
def test_an_oversized_or_malformed_proof_is_a_typed_error(key, proof, what):
    head = as_frame_fields(sign_head(NAME, 2000, "12" * 32, key))
    with pytest.raises(MalformedMessage, match=re.escape(what)):
        decode_from_client(msgspec.msgpack.encode({**head, "proof": proof}))


def test_the_coordinator_logs_a_refused_head_and_keeps_serving(tmp_path, key, caplog):
    run_dir = tmp_path / "run"
    store = honest_run(run_dir, key, rounds=2)
    coordinator = SimpleNamespace(identity_by_name={NAME: key.public_key()}, store=store)
    caplog.set_level(logging.WARNING)
    bad = sign_head(NAME, 5, "ab" * 32, key, [bytes(32)] * 6)
    Coordinator._accept_head(coordinator, NAME, bad)  # type: ignore[arg-type]
    assert "refused a ledger head from comedies at 5 entries: its proof has 6 digests" in (
        caplog.text
    )
    Coordinator._accept_head(coordinator, NAME, rewritten(run_dir, key, [1, 3, 4]).head())
    assert "history was rewritten" in caplog.text
    head_path(run_dir, NAME).write_text("not json\n")  # tampered from outside
    Coordinator._accept_head(coordinator, "comedies", sign_head(NAME, 9, "ab" * 32, key))
    Coordinator._accept_head(SimpleNamespace(identity_by_name={NAME: key.public_key()},
                                             store=RunStore(run_dir)), NAME, bad)  # fmt: skip
    assert "the kept heads do not read" in caplog.text


def test_heads_with_their_proofs_cross_real_curvezmq_sockets(tmp_path, key, caplog):
    """An institution's heads over CurveZMQ loopback: honest ones kept, a frame with an
    oversized proof dropped and logged, and the connection keeps serving."""
    limit = 1 << 16
    coordinator_keys, institution_keys = zmq.curve_keypair(), zmq.curve_keypair()
    endpoint = CoordinatorEndpoint(
        "tcp://127.0.0.1:*",
        coordinator_keys[1],
        coordinator_keys[0],
        {NAME: institution_keys[0]},
        limit,
    )
    institution = InstitutionEndpoint(endpoint.address, institution_keys[1], institution_keys[0],
                                      coordinator_keys[0], limit)  # fmt: skip
    caplog.set_level(logging.WARNING)
    try:
        store = RunStore(tmp_path / "run")
        ledger = run_ledger(tmp_path / "run", key)
        oversized = as_frame_fields(sign_head(NAME, 2000, "12" * 32, key))
        oversized["proof"] = [bytes(32)] * (MAX_PROOF + 1)
        for r in (1, 2, 3):
            ledger.charge(cheap_releases(r))
            if r == 2:  # a hostile frame between honest heads
                institution._socket.send(msgspec.msgpack.encode(oversized))
            institution.send(ledger.head())
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 3 and time.monotonic() < deadline:
            item = endpoint.recv(0.5)
            if item is not None:
                got.append(item)
        assert [name for name, _ in got] == [NAME] * 3
        assert all(store.save_head(head) for _, head in got)
        assert [h.entries for h in kept_heads(tmp_path / "run")] == [2, 4, 6]
        assert sum("dropped a frame from comedies" in r.getMessage() for r in caplog.records) == 1
    finally:
        institution.close()
        endpoint.close()


# ------------------------------------------------------------------------------ events


def test_events_round_trip_and_the_decoder_is_strict():
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.5)), 7
        ),
        dp_accounting.LaplaceDpEvent(2.0),
        dp_accounting.NoOpDpEvent(),
    ])  # fmt: skip
    assert event_from_json(json.loads(json.dumps(event_to_json(event)))) == event
    bad = [
        ({"kind": "pickle"}, "unknown event kind"),
        ({"kind": "gaussian", "noise_multiplier": 1.0, "extra": 1}, "extra ['extra']"),
        ({"kind": "gaussian"}, "missing fields ['noise_multiplier']"),
        ({"kind": "gaussian", "noise_multiplier": -1.0}, "must be > 0"),
        ({"kind": "self_composed", "count": 1.5, "event": {"kind": "no_op"}}, "$.count"),
        ({"kind": "composed", "events": [{"kind": "x"}]}, "$.events[0].kind"),
    ]
    for value, message in bad:
        with pytest.raises(EventFormatError) as info:
            event_from_json(value)
        assert message in str(info.value)
    deep: dict = {"kind": "no_op"}
    for _ in range(20):
        deep = {"kind": "self_composed", "count": 1, "event": deep}
    with pytest.raises(EventFormatError, match="nested deeper"):
        event_from_json(deep)
    with pytest.raises(EventFormatError, match="cannot record"):
        event_to_json(dp_accounting.ZCDpEvent(0.1))


# ------------------------------------------------------------------------------ command line


def write_roster(folder: Path, key: Ed25519PrivateKey) -> Path:
    """A roster holding ``NAME``'s identity key."""
    roster = folder / "roster.toml"
    public = key.public_key().public_bytes_raw().hex()
    roster.write_text(
        'version = 1\n[coordinator]\nname = "coordinator"\n'
        f'curve_public = "{"a" * 40}"\nidentity_public = "{"1" * 64}"\n'
        f'[[institutions]]\nname = "{NAME}"\ncurve_public = "{"b" * 40}"\n'
        f'identity_public = "{public}"\n'
    )
    return roster


def test_sealmoe_audit_verify_exit_status_and_message(ledger_file, key, tmp_path, capsys):
    roster = write_roster(tmp_path, key)
    assert main(["audit", "verify", str(ledger_file), "--roster", str(roster)]) == 0
    assert "OK: 1 ledgers verify" in capsys.readouterr().out
    rows = lines(ledger_file)
    write(ledger_file, [rows[0], rows[2]])
    assert main(["audit", "verify", str(ledger_file), "--roster", str(roster)]) == 1
    err = capsys.readouterr().err
    assert f"FAILED: {ledger_file}:2: sequence number 2 where 1 belongs" in err
    assert main(["audit", "verify", str(ledger_file)]) == 2  # no roster: a setup error
    assert "pass --roster" in capsys.readouterr().err
    # the coordinator's head, found in the ledger's own run directory, exposes a cut tail
    write(ledger_file, rows)
    RunStore(ledger_file.parents[2]).save_head(open_ledger(ledger_file, key).head())
    write(ledger_file, rows[:5])
    assert main(["audit", "verify", str(ledger_file), "--roster", str(roster)]) == 1
    assert "truncated: the coordinator holds a signed head at 6 entries" in capsys.readouterr().err
