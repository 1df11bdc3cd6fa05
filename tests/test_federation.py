"""The whole federation over real loopback sockets: FedAvg equals plaintext, dropouts, crashes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from audit import Ledger
from audit import head_path
from audit import ledger_path
from audit import read_head
from audit import read_heads
from audit import verify_ledger
from clients.contract.config import FederationConfig
from clients.contract.config import load_config
from clients.contract.keys import generate_keys
from clients.contract.keys import load_ckks_key_holder
from clients.contract.keys import load_institution_keys
from clients.contract.layout import CHANNEL_BOUND
from clients.contract.layout import DELTA_PREFIX
from clients.contract.layout import WEIGHT
from clients.models.moe_lora import adapter_state
from clients.runtime.trained_model import MODEL_DIR
from clients.runtime.trained_model import from_pretrained
from clients.strategies.fedavg import FedAvgClient
from clients.strategies.fedavg import fedavg_config
from coordinator.app.wiring import make_institution
from coordinator.app.wiring import open_ledger
from coordinator.service import Coordinator
from coordinator.store import JOURNAL
from coordinator.store import RoutingRelay
from coordinator.store import RunStore
from coordinator.store import StoreError
from privacy import DPTrainingFacts
from secagg import FixedPointCodec
from secagg.ckks import DEFAULT_ABS_ERROR_PER_SUMMAND
from secagg.ckks import SCALING_ERROR_FLOOR
from secagg.ckks import SCALING_ERROR_PER_FACTOR_AND_SUMMAND
from secagg.ckks import CkksKeyHolder
from secagg.ckks import EncryptedBatch
from tests.federation_harness import assert_caps_admit
from tests.federation_harness import record_frames
from tests.federation_harness import record_submissions
from tests.federation_harness import run_in_threads

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["comedies", "tragedies", "histories"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(
    tmp_path: Path,
    *,
    rounds: int = 2,
    stage_timeout_s: float = 20.0,
    threshold: int = 3,
    expert_updates: str = "mask",
    romances: bool = False,
) -> Path:
    """examples/tiny.toml with its own port, run and key folders, and shorter timeouts.

    ``romances`` adds a fourth institution, so that 3 of 4 (the active-adversary bound) leave
    room for one to drop out of a round.
    """
    text = (ROOT / "examples" / "tiny.toml").read_text()
    text = text.replace('expert_updates = "mask"', f'expert_updates = "{expert_updates}"')
    text = text.replace("threshold = 3 ", f"threshold = {threshold} ")
    if romances:
        text += '\n[[institutions]]\nname = "romances"\n'
    text = text.replace("tcp://127.0.0.1:5561", f"tcp://127.0.0.1:{_free_port()}")
    text = text.replace("rounds = 2", f"rounds = {rounds}")
    text = text.replace("stage_timeout_s = 30.0", f"stage_timeout_s = {stage_timeout_s}")
    text = text.replace('run_dir = "runs/tiny"', f'run_dir = "{tmp_path / "run"}"')
    text = text.replace('keys_dir = "keys/tiny"', f'keys_dir = "{tmp_path / "keys"}"')
    path = tmp_path / "federation.toml"
    path.write_text(text)
    config = load_config(path)
    generate_keys(config.keys_dir, config.institution_names, ckks=config.aggregation.ckks.params())
    return path


def journal(run_dir: Path) -> list[dict]:
    path = run_dir / JOURNAL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_each_round_equals_plaintext_fedavg_of_the_same_deltas(tmp_path, monkeypatch):
    config = load_config(write_config(tmp_path))
    submitted = record_submissions(monkeypatch, FedAvgClient)
    frames = record_frames(monkeypatch)
    outcomes, _ = run_in_threads(config)
    assert [o.error for o in outcomes] == [None, None]
    assert_caps_admit(config, frames)  # the caps sized from the layout admit the real round

    initial = Coordinator(config).initial_state()
    layout = fedavg_config(config).layout(initial)
    q = FixedPointCodec(
        clip=CHANNEL_BOUND, bits=config.secagg.bits,
        modulus_bits=config.secagg.modulus_bits, max_clients=len(NAMES),
    ).max_error_per_client  # fmt: skip
    previous = initial.adapters
    for outcome in outcomes:
        r = outcome.federation_round
        assert sorted(outcome.included) == sorted(NAMES)
        weights = np.array([submitted[(r, n)][1][WEIGHT][0] for n in outcome.included])
        total = weights.sum()
        checkpoint = load_file(config.run_dir / "checkpoints" / f"round-{r:04d}.safetensors")
        for name, before in previous.items():
            key = DELTA_PREFIX + name
            weighted = sum(np.ravel(submitted[(r, n)][1][key]) for n in outcome.included)
            expected = before.double().numpy().ravel() + weighted / total
            got = checkpoint[name].double().numpy().ravel()
            bound = layout[key].bound
            # m clients each add < one quantisation step (of bound * q) to both sums.
            m = len(outcome.included)
            atol = (m * bound * q + np.abs(weighted / total) * m * q) / (total - m * q) + 1e-6
            np.testing.assert_array_less(np.abs(got - expected), atol + 1e-12)
            assert np.abs(weighted).max() > 0  # the test compares real updates, not zeros
        previous = {k: v.clone() for k, v in checkpoint.items()}


def test_ckks_expert_updates_equal_plaintext_fedavg_and_stay_unreadable(tmp_path, monkeypatch):
    """expert_updates = "ckks": the coordinator folds encrypted sums into an encrypted state.

    Each round's decrypted checkpoint equals the previous one plus the plaintext FedAvg of the
    same deltas; no plaintext adapters reach the coordinator's disk or its messages; every
    institution ends with the state the federation produced.
    """
    config = load_config(write_config(tmp_path, expert_updates="ckks"))
    assert fedavg_config(config).delta_channel == "ckks"
    submitted = record_submissions(monkeypatch, FedAvgClient)
    frames = record_frames(monkeypatch)
    outcomes, institutions = run_in_threads(config)
    assert [o.error for o in outcomes] == [None, None]
    assert_caps_admit(config, frames)  # encrypted broadcasts and inputs fit the computed caps

    checkpoints = config.run_dir / "checkpoints"
    assert not list(checkpoints.glob("*.safetensors"))  # the coordinator holds no plaintext
    key = load_ckks_key_holder(config.keys_dir, NAMES[0])
    initial = Coordinator(config).initial_state().adapters
    names = list(initial)
    previous = {k: v.double().numpy() for k, v in initial.items()}
    q_mask = FixedPointCodec(
        clip=CHANNEL_BOUND, bits=config.secagg.bits,
        modulus_bits=config.secagg.modulus_bits, max_clients=len(NAMES),
    ).max_error_per_client  # fmt: skip
    bound = fedavg_config(config).delta_bound
    for outcome in outcomes:
        r, m = outcome.federation_round, len(outcome.included)
        assert sorted(outcome.included) == sorted(NAMES)
        state = msgspec.msgpack.decode(
            (checkpoints / f"round-{r:04d}.ckks").read_bytes(), type=EncryptedBatch
        )
        decrypted = dict(zip(names, key.decrypt(state), strict=True))
        total = sum(submitted[(r, n)][1][WEIGHT][0] for n in outcome.included)
        for name in names:
            weighted = sum(submitted[(r, n)][1][DELTA_PREFIX + name] for n in outcome.included)
            update = weighted.reshape(previous[name].shape) / total
            # Masked weight: off by < m*q; CKKS: the packed sum and the scaling.
            factor = bound / (total - m * q_mask)
            tol = (
                np.abs(update) * m * q_mask / (total - m * q_mask)
                + m
                * factor
                * (DEFAULT_ABS_ERROR_PER_SUMMAND + SCALING_ERROR_PER_FACTOR_AND_SUMMAND)
                + SCALING_ERROR_FLOOR
            )
            np.testing.assert_array_less(np.abs(decrypted[name] - previous[name] - update), tol)
            assert np.abs(update).max() > 100 * tol.max()  # real updates, far above the error
        previous = decrypted
    for inst in institutions:  # Shutdown carried the encrypted final state; each decrypted it
        final = adapter_state(inst.model)
        kept, _ = from_pretrained(inst.dir / MODEL_DIR)  # and keeps it, in its own folder
        for name in names:
            np.testing.assert_allclose(final[name].double().numpy(), previous[name], atol=1e-6)
            np.testing.assert_array_equal(adapter_state(kept)[name], final[name])


def test_run_store_keeps_an_encrypted_state_without_plaintext(tmp_path):
    key = CkksKeyHolder.generate()
    batch = key.encrypt([np.arange(6.0).reshape(2, 3)])
    store = RunStore(tmp_path)
    store.started(1, 0, 65536, NAMES)
    store.completed(1, 0, batch, RoutingRelay(), NAMES, {"round": 1.0})
    resume = RunStore(tmp_path).resume()
    assert resume.last_round == 1 and resume.adapters == batch
    np.testing.assert_allclose(
        key.decrypt(resume.adapters)[0], np.arange(6.0).reshape(2, 3), rtol=0, atol=1e-8
    )
    checkpoint = tmp_path / "checkpoints" / "round-0001.ckks"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    with pytest.raises(StoreError, match="does not match the journal"):
        RunStore(tmp_path).resume()


def test_rounds_below_threshold_abort_and_the_next_round_starts(tmp_path, caplog):
    """An institution out of budget declines; with threshold 3 of 3 every round aborts cleanly."""
    caplog.set_level(logging.INFO, logger="coordinator.transport")
    config = load_config(write_config(tmp_path, threshold=3, stage_timeout_s=20.0))
    delta = config.budget("histories").target_delta
    # An earlier release (recorded under a generous budget) already spent far more than 4.
    Ledger(
        ledger_path(config.run_dir, "histories"),
        institution="histories",
        identity=load_institution_keys(config.keys_dir, "histories").identity,
        budget_epsilon=1000.0,
        delta=delta,
        accountant="rdp",
    ).charge([DPTrainingFacts(0.6, 1.0, 20, 1.0, delta).release(0, 1)])
    coordinator = Coordinator(config)
    institutions = [make_institution(config, name) for name in NAMES]
    stop = threading.Event()
    threads = [threading.Thread(target=inst.run, args=(stop,)) for inst in institutions]
    for t in threads:
        t.start()
    try:
        outcomes = coordinator.run()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert [o.federation_round for o in outcomes] == [1, 2]
    assert all(o.error and "threshold" in o.error for o in outcomes)
    messages = [r.getMessage() for r in caplog.records]
    assert any("histories declined" in m for m in messages)
    assert not any("timed out" in m for m in messages)  # the decline ended the stage at once
    events = [(e["round"], e["event"]) for e in journal(config.run_dir)]
    assert events == [(1, "started"), (1, "aborted"), (2, "started"), (2, "aborted")]
    assert not list((config.run_dir / "checkpoints").iterdir())
    assert RunStore(config.run_dir).resume().last_round == 2


# Four parties share the machine: one thread each for torch and numpy (as `sealmoe run` does);
# otherwise their thread pools spin against each other and a stage can exceed its timeout.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator.app.cli", *args],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **ONE_THREAD},
    )


def _started(
    path: Path, processes: list[subprocess.Popen]
) -> tuple[FederationConfig, Path, subprocess.Popen, dict[str, subprocess.Popen]]:
    """The coordinator and every institution of the config at ``path``, each its own process
    (logging to ``logs/`` beside it, stopped by the ``processes`` fixture)."""
    config = load_config(path)
    logs = path.parent / "logs"
    logs.mkdir(exist_ok=True)
    coordinator = _start(["coordinator", "--config", str(path)], logs / "coordinator.log")
    clients = {
        name: _start(["client", "--config", str(path), "--institution", name], logs / f"{name}.log")
        for name in config.institution_names
    }
    processes.extend([coordinator, *clients.values()])
    return config, logs, coordinator, clients


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("expert_updates", ["mask", "ckks"])
def test_coordinator_killed_mid_round_resumes_and_finishes(tmp_path, processes, expert_updates):
    path = write_config(tmp_path, rounds=3, stage_timeout_s=45.0, expert_updates=expert_updates)
    config, logs, coordinator, clients = _started(path, processes)
    _wait_for(
        lambda: any(e["event"] == "started" and e["round"] == 2 for e in journal(config.run_dir)),
        timeout=180,
        what="round 2 to start",
    )
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait(timeout=10)
    restarted = _start(["coordinator", "--config", str(path)], logs / "coordinator.log")
    processes.append(restarted)
    assert restarted.wait(timeout=240) == 0, (logs / "coordinator.log").read_text()[-3000:]
    for proc in clients.values():
        assert proc.wait(timeout=60) == 0

    entries = journal(config.run_dir)
    done = {e["round"]: e for e in entries if e["event"] in ("completed", "aborted")}
    assert sorted(done) == [1, 2, 3]
    assert done[1]["event"] == "completed" and done[3]["event"] == "completed"
    round2 = [e for e in entries if e["round"] == 2 and e["event"] == "started"]
    assert [e["attempt"] for e in round2] == [0, 1]  # the retry runs under a new round id
    assert len({e["round_id"] for e in round2}) == 2
    resume = RunStore(config.run_dir).resume()  # every checkpoint matches its journal hash
    assert resume.last_round == 3 and resume.adapters is not None
    if expert_updates == "ckks":  # resumed from ciphertexts: the state still decrypts
        assert isinstance(resume.adapters, EncryptedBatch)
        key = load_ckks_key_holder(config.keys_dir, NAMES[0])
        assert all(np.all(np.isfinite(a)) for a in key.decrypt(resume.adapters))
    # No institution was charged twice for one release.
    for name in NAMES:
        entries = open_ledger(config, name).entries  # opening verifies the chain and signatures
        charged = [(e.round_id, e.what) for e in entries if e.kind == "release"]
        assert len(charged) == len(set(charged))
        # the restarted coordinator kept the head of each full ledger, and every head it
        # accepted before and after its restart is on file: the ledger matches each of them
        assert read_head(head_path(config.run_dir, name)).entries == len(entries)
        heads = read_heads(head_path(config.run_dir, name))
        assert [h.entries for h in heads] == sorted({h.entries for h in heads})
        identity = load_institution_keys(config.keys_dir, name).identity.public_key()
        verified = verify_ledger(ledger_path(config.run_dir, name), identity, heads=heads)
        assert verified.heads_checked == len(heads) >= 3
    assert "refused a ledger head" not in (logs / "coordinator.log").read_text()


def test_an_institution_killed_mid_round_is_left_out(tmp_path, processes):
    # long enough for four institutions to start on a loaded 2-core machine
    path = write_config(tmp_path, rounds=1, stage_timeout_s=30.0, romances=True)
    config, logs, coordinator, clients = _started(path, processes)
    _wait_for(
        lambda: any(e["event"] == "started" for e in journal(config.run_dir)),
        timeout=180,
        what="round 1 to start",
    )
    clients["histories"].send_signal(signal.SIGKILL)
    assert coordinator.wait(timeout=120) == 0, (logs / "coordinator.log").read_text()[-3000:]
    done = [e for e in journal(config.run_dir) if e["event"] == "completed"]
    assert len(done) == 1
    assert sorted(done[0]["included"]) == ["comedies", "romances", "tragedies"]
    assert os.path.exists(config.run_dir / "checkpoints" / "round-0001.safetensors")
    torch.testing.assert_close(
        load_file(config.run_dir / "checkpoints" / "round-0001.safetensors"),
        RunStore(config.run_dir).resume().adapters,
    )
