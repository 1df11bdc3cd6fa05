"""A federation across four network namespaces, keys made by enrollment on each "host".

The coordinator and three institutions each run in their own Linux network namespace, joined by
veth pairs to a bridge in the coordinator's namespace (10.77.0.0/24), so every byte between
parties crosses a real interface. Each party has its own folder (its "host"): the institutions
enroll there, the coordinator builds the roster from their cards, one institution creates the
CKKS key and seals it to the others. Needs root and iproute2; skips, saying why, otherwise.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.contract.keys import CKKS_SECRET_FILE
from clients.contract.keys import CURVE_SECRET_FILE
from clients.contract.keys import IDENTITY_FILE

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["comedies", "tragedies", "histories"]
COORDINATOR_IP = "10.77.0.1"
PORT = 5561
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _skip_reason() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    return None


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """Party -> namespace; a bridge in the coordinator's, one veth pair per institution."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(2)
    spaces = {"coordinator": f"sealmoe-{tag}-c"}
    spaces.update({name: f"sealmoe-{tag}-{i}" for i, name in enumerate(NAMES)})
    made: list[str] = []
    try:
        try:
            _ip("netns", "add", spaces["coordinator"])
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"`ip netns add` failed here: {exc.stderr.strip()}")
        made.append(spaces["coordinator"])
        hub = spaces["coordinator"]
        _ip("-n", hub, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{COORDINATOR_IP}/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, name in enumerate(NAMES):
            ns = spaces[name]
            _ip("netns", "add", ns)
            made.append(ns)
            inner, outer = f"vi{tag}{i}", f"vo{tag}{i}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "netns", hub)
            _ip("-n", hub, "link", "set", outer, "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"10.77.0.{i + 2}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield spaces
    finally:
        for ns in reversed(made):  # deleting a namespace deletes its veth ends and the bridge
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _config_text() -> str:
    """examples/tiny.toml, bound to the coordinator's namespace address, paths relative."""
    text = (ROOT / "examples" / "tiny.toml").read_text()
    address = f"tcp://{COORDINATOR_IP}:{PORT}"
    text = text.replace("tcp://127.0.0.1:5561", address)
    text = text.replace('run_dir = "runs/tiny"', 'run_dir = "run"')
    text = text.replace('keys_dir = "keys/tiny"', 'keys_dir = "keys"')
    text = text.replace("stage_timeout_s = 30.0", "stage_timeout_s = 60.0")
    for name in NAMES:
        text = text.replace(f'name = "{name}"', f'name = "{name}"\nconnect = "{address}"')
    return text


def _sealmoe(*args: str, ns: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "coordinator.app.cli", *args]
    return ["ip", "netns", "exec", ns, *command] if ns else command


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _check(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        _sealmoe(*args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"sealmoe {' '.join(args)}: {done.stdout}{done.stderr}"


def _rx_bytes(ns: str, device: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{device}/statistics/rx_bytes"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return int(out.stdout)


def test_federation_across_namespaces_with_enrolled_keys(tmp_path, namespaces):
    hosts = {party: tmp_path / party for party in namespaces}
    for folder in hosts.values():
        folder.mkdir()
        (folder / "federation.toml").write_text(_config_text())
    config = "federation.toml"

    # Each institution enrolls on its own host; only its card leaves it.
    for name in NAMES:
        _check("enroll", config, "--institution", name, cwd=hosts[name])
    cards = []
    for name in NAMES:
        card = hosts["coordinator"] / f"{name}.card.json"
        shutil.copy(hosts[name] / "keys" / f"{name}.card.json", card)
        cards.append(str(card))
    _check("roster", config, *cards, cwd=hosts["coordinator"])
    for name in NAMES:
        shutil.copy(hosts["coordinator"] / "keys" / "roster.toml", hosts[name] / "keys")
    # One institution creates the CKKS key; the sealed shares and the public context travel.
    creator = NAMES[0]
    _check("ckks-share", config, "--institution", creator, cwd=hosts[creator])
    for name in NAMES[1:]:
        share = hosts[creator] / "keys" / f"ckks-share-{name}.json"
        _check("ckks-accept", config, "--institution", name, "--share", str(share), cwd=hosts[name])
    shutil.copy(hosts[creator] / "keys" / "ckks.public", hosts["coordinator"] / "keys")

    logs = {party: (tmp_path / f"{party}.log").open("w") for party in namespaces}
    procs = {}
    try:
        procs["coordinator"] = subprocess.Popen(
            _sealmoe("coordinator", config, ns=namespaces["coordinator"]),
            cwd=hosts["coordinator"], env=_env(), stdout=logs["coordinator"],
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for name in NAMES:
            procs[name] = subprocess.Popen(
                _sealmoe("client", config, "--institution", name, ns=namespaces[name]),
                cwd=hosts[name], env=_env(), stdout=logs[name], stderr=subprocess.STDOUT,
            )  # fmt: skip
        codes = {party: proc.wait(timeout=TIMEOUT_S) for party, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs.values():
            log.close()
    texts = {party: (tmp_path / f"{party}.log").read_text()[-3000:] for party in namespaces}
    assert codes == dict.fromkeys(namespaces, 0), texts

    coordinator_run = hosts["coordinator"] / "run"
    assert (coordinator_run / "checkpoints" / "round-0002.safetensors").exists(), texts
    # the traffic went through each institution's veth interface
    for name in NAMES:
        assert _rx_bytes(namespaces[name], "eth0") > 10_000

    roster = hosts["coordinator"] / "keys" / "roster.toml"
    for name in NAMES:
        ledger = hosts[name] / "run" / "institutions" / name / "ledger.jsonl"
        done = subprocess.run(
            _sealmoe(
                "audit", "verify", str(ledger), "--roster", str(roster),
                "--institution", name, "--run-dir", str(coordinator_run),
            ),
            cwd=hosts[name], env=_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    # No institution secret was ever written on the coordinator's host.
    secrets_of_institutions = {
        (hosts[n] / "keys" / "institutions" / n / f).read_bytes()
        for n in NAMES
        for f in (CURVE_SECRET_FILE, IDENTITY_FILE, CKKS_SECRET_FILE)
    }
    on_coordinator = [p for p in hosts["coordinator"].rglob("*") if p.is_file()]
    assert not (hosts["coordinator"] / "keys" / "institutions").exists()
    assert not [p for p in on_coordinator if p.read_bytes() in secrets_of_institutions]
    assert not [p for p in on_coordinator if p.name == CKKS_SECRET_FILE]
