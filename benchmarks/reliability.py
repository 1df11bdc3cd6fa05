"""Reliability under load: a coordinator and >= 32 institution processes on loopback, with kills.

Every institution is its own process that never imports torch: a synthetic institution that
runs the real protocol pieces (CurveZMQ :class:`~clients.runtime.transport.InstitutionEndpoint`,
the contract messages, :class:`~secagg.client.SecAggClient`, the signed write-ahead
:class:`audit.Ledger`, charged before the masked input leaves and its signed head sent first).
Its update is a synthetic vector of the size of SmolLM2-135M MoE-LoRA adapters on every layer
(see :func:`shakespeare_adapter_values`; larger than ``examples/shakespeare.toml``'s, which adapt
only the top four layers), on the fixed-point grid,
so the coordinator can check the secure sum EXACTLY against the plaintext sum of the included
institutions' inputs (regenerated from public seeds; only the benchmark knows them).

The coordinator process runs the real round driver (:func:`coordinator.transport.run_secagg_round`
over :class:`~coordinator.transport.CoordinatorEndpoint`, :class:`~secagg.server.SecAggServer`),
checks and keeps ledger heads, and journals rounds in the real :class:`coordinator.store.RunStore`;
after a SIGKILL it resumes from that store (next round attempt under a fresh round id).

Kills: for every round and every stage (start/training, advertise, share, after the ledger charge,
masked input, consistency, unmask) one institution chosen at random SIGKILLs itself just before it
would answer that stage; the driver restarts it a moment later (same ledger file). The driver
SIGKILLs the coordinator once, mid-round (while it collects masked inputs), and restarts it.

Reported: rounds completed and aborted, sums checked exact, ledger entries lost (a round's sum
includes an institution whose ledger has no entry for that round id) and double-charged (two
entries for one round id), every ledger verified against every head the coordinator kept, and the
coordinator's peak RSS. Run: ``python benchmarks/reliability.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

STAGES = ["start", "advertise", "share", "charge", "masked_input", "consistency", "unmask"]
BITS, MODULUS_BITS, SCALE_BITS = 16, 32, 12
CLIP = (2 ** (BITS - 1) - 1) / 2**SCALE_BITS  # scale = 2^12 exactly: grid values encode exactly
DELTA = 1e-5
NEIGHBOURS = 8  # SecAgg+ degree k for 32 institutions: O(log n), as the README recommends

log = logging.getLogger("reliability")


SMOLLM2_LINEAR = {"q_proj": (576, 576), "v_proj": (576, 192), "up_proj": (576, 1536),
                  "down_proj": (1536, 576)}  # fmt: skip
"""(in, out) of SmolLM2-135M's adaptable linear layers (hidden 576, 3 KV heads of 64, MLP 1536)."""


def shakespeare_adapter_values(
    modules: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj"),
    layers: int = 30,
    experts: int = 4,
    rank: int = 8,
) -> int:
    """Values in MoE-LoRA adapters on every layer of SmolLM2-135M (30 layers, 4 experts of
    rank 8; the earlier examples/shakespeare.toml): per adapted linear layer, E LoRA experts
    (A: r x in, B: out x r) and a router (E x in). All four modules: 6,289,920 values; q_proj
    and v_proj: 1,981,440."""
    shapes = [SMOLLM2_LINEAR[m] for m in modules]
    return layers * sum(experts * rank * (i + o) + experts * i for i, o in shapes)


SIZES = {
    shakespeare_adapter_values(): "SmolLM2-135M MoE-LoRA adapters (4 experts, rank 8) on "
    "q_proj, v_proj, up_proj and down_proj of every layer",
    shakespeare_adapter_values(("q_proj", "v_proj")): "SmolLM2-135M MoE-LoRA adapters "
    "(4 experts, rank 8) on q_proj and v_proj of every layer (all four modules: 6.3 M values)",
}


def synthetic_input(round_id: int, client_id: int, length: int) -> np.ndarray:
    """The institution's update for a round: grid values (k / 2^SCALE_BITS) from a public seed."""
    rng = np.random.default_rng([round_id, client_id])
    limit = 2 ** (BITS - 1) - 1
    return rng.integers(-limit, limit + 1, length, dtype=np.int64).astype(np.float64) / (
        2**SCALE_BITS
    )


# ----------------------------------------------------------------------------- key material


def make_keys(work: Path, n: int) -> None:
    """CurveZMQ and Ed25519 keys for the coordinator and n institutions (benchmark-only file)."""
    import zmq
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.hazmat.primitives.serialization import NoEncryption
    from cryptography.hazmat.primitives.serialization import PrivateFormat

    def curve() -> list[str]:
        public, secret = zmq.curve_keypair()
        return [public.decode(), secret.decode()]

    raw = Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    keys = {
        "coordinator": curve(),
        "institutions": [
            {"name": f"inst{i:02d}", "curve": curve(),
             "identity": Ed25519PrivateKey.generate().private_bytes(*raw).hex()}
            for i in range(n)
        ],
    }  # fmt: skip
    (work / "keys.json").write_text(json.dumps(keys))


def load_keys(work: Path) -> dict:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = json.loads((work / "keys.json").read_text())
    for entry in keys["institutions"]:
        entry["private"] = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(entry["identity"]))
        entry["public"] = entry["private"].public_key()
    return keys


def message_limit(length: int) -> int:
    """The largest frame either side accepts: one masked vector of ``length`` ring elements,
    plus room for the message's envelope (derived from the payload, not a magic constant)."""
    return length * MODULUS_BITS // 8 + (1 << 16)


# ----------------------------------------------------------------------------- institution


def run_institution(work: Path, index: int, address: str, length: int) -> int:
    """A torch-free institution: real transport, SecAgg+ client and signed ledger."""
    import dp_accounting

    from audit import Ledger
    from clients.contract.messages import ATTEMPT_BITS
    from clients.contract.messages import Hello
    from clients.contract.messages import RoundEnd
    from clients.contract.messages import RoundStart
    from clients.contract.messages import Shutdown
    from clients.runtime.transport import InstitutionEndpoint
    from privacy import Release
    from secagg.client import SecAggClient
    from secagg.errors import SecAggError
    from secagg.messages import AdvertiseKeys
    from secagg.messages import MaskedInput
    from secagg.messages import ShareKeys
    from secagg.messages import SurvivorSignature

    keys = load_keys(work)
    me = keys["institutions"][index]
    identities = {i: e["public"] for i, e in enumerate(keys["institutions"])}
    plan = {tuple(p) for p in json.loads((work / "plan.json").read_text())[me["name"]]}
    ledger = Ledger(work / "ledgers" / f"{me['name']}.jsonl", institution=me["name"],
                    identity=me["private"], budget_epsilon=1e9, delta=DELTA,
                    accountant="rdp")  # fmt: skip
    stage_of = {AdvertiseKeys: "advertise", ShareKeys: "share", MaskedInput: "masked_input",
                SurvivorSignature: "consistency"}  # fmt: skip

    def die_at(federation_round: int, stage: str) -> None:
        """SIGKILL this process if the plan says so (once per planned kill)."""
        mark = work / "killed" / f"{me['name']}-{federation_round}-{stage}"
        if (federation_round, stage) in plan and not mark.exists():
            mark.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    coordinator_key = keys["coordinator"][0].encode()
    with InstitutionEndpoint(address, me["curve"][1].encode(), me["curve"][0].encode(),
                             coordinator_key, message_limit(length)) as endpoint:  # fmt: skip
        endpoint.send(Hello())
        endpoint.send(ledger.head())
        client, start, last_heard = None, None, time.monotonic()
        while True:
            message = endpoint.recv(0.25)
            if message is None:
                if time.monotonic() - last_heard > 2.0:
                    endpoint.send(Hello())
                    last_heard = time.monotonic()
                continue
            last_heard = time.monotonic()
            if isinstance(message, Shutdown):
                return 0
            if isinstance(message, RoundEnd):
                client = None
                continue
            if isinstance(message, RoundStart):
                start = message
                fed_round = start.params.round_id >> ATTEMPT_BITS
                die_at(fed_round, "start")
                rid = start.params.round_id
                values = synthetic_input(rid, start.client_id, start.params.vector_length)
                client = SecAggClient(start.params, start.client_id, values, me["private"],
                                      identities)  # fmt: skip
                die_at(fed_round, "advertise")
                endpoint.send(client.advertise())
                continue
            if client is None or message.round_id != start.params.round_id:
                continue
            try:
                reply = client.handle(message)
            except SecAggError as exc:
                log.warning("%s: round %d abandoned: %s", me["name"], start.params.round_id, exc)
                client = None
                continue
            if isinstance(reply, MaskedInput):
                release = Release(fed_round, start.params.round_id, "adapter-update",
                                  dp_accounting.GaussianDpEvent(1.0))  # fmt: skip
                ledger.charge([release])  # write-ahead: on disk before the release leaves
                die_at(fed_round, "charge")
                endpoint.send(ledger.head())
            die_at(fed_round, stage_of.get(type(reply), "unmask"))
            endpoint.send(reply)


# ----------------------------------------------------------------------------- coordinator


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_coordinator(work: Path, address: str, length: int, rounds: int, timeout_s: float) -> int:
    """The real round driver and store over the real endpoint; resumes after a SIGKILL."""
    import torch

    from audit.entry import head_signature_ok
    from audit.heads import HeadRefused
    from clients.contract.config import SecAggSection
    from clients.contract.messages import Hello
    from clients.contract.messages import Shutdown
    from clients.contract.messages import round_id
    from coordinator.store import RoutingRelay
    from coordinator.store import RunStore
    from coordinator.transport import CoordinatorEndpoint
    from coordinator.transport import run_secagg_round
    from privacy.head import LedgerHead
    from secagg.errors import SecAggError
    from secagg.server import SecAggServer

    keys = load_keys(work)
    institutions = keys["institutions"]
    names = [e["name"] for e in institutions]
    ids = {name: i for i, name in enumerate(names)}
    identities = {i: e["public"] for i, e in enumerate(institutions)}
    store = RunStore(work / "run")
    resume = store.resume()
    results = work / "coordinator.jsonl"
    status = work / "status.json"
    secagg = SecAggSection(
        neighbours=min(NEIGHBOURS, len(names) - 1), clip=CLIP, bits=BITS, modulus_bits=MODULUS_BITS
    )

    def accept_head(name: str, head: LedgerHead) -> None:
        public = identities[ids[name]]
        if head.institution == name and head_signature_ok(head, public):
            try:
                store.save_head(head)
            except HeadRefused as exc:
                log.warning("refused a ledger head from %s: %s", name, exc)

    def messages_beside_secagg(federation_round: int, server: SecAggServer) -> Callable:
        """``on_message`` for a round: keep ledger heads, and tell the driver the stage."""
        seen = [None]

        def on_message(name: str, cid: int, message: object) -> bool:
            if server.stage is not seen[0]:
                seen[0] = server.stage
                stage = server.stage.value if server.stage is not None else "done"
                status.write_text(json.dumps({"round": federation_round, "stage": stage}))
            if isinstance(message, LedgerHead):
                accept_head(name, message)
                return True
            return isinstance(message, Hello)

        return on_message

    roster = {e["name"]: e["curve"][0] for e in institutions}
    public, secret = keys["coordinator"]
    with CoordinatorEndpoint(address, secret.encode(), public.encode(), roster,
                             message_limit(length)) as endpoint:  # fmt: skip
        for federation_round in range(resume.last_round + 1, rounds + 1):
            attempt = resume.next_attempt if federation_round == resume.last_round + 1 else 0
            deadline = time.monotonic() + timeout_s
            while set(names) - endpoint.connected and time.monotonic() < deadline:
                received = endpoint.recv(0.2)
                if received is not None and isinstance(received[1], LedgerHead):
                    accept_head(*received)
            present = sorted(endpoint.connected, key=ids.get)
            rid = round_id(federation_round, attempt)
            store.started(federation_round, attempt, rid, present)
            params = secagg.round_params(rid, [ids[n] for n in present], os.urandom(32), length)
            server = SecAggServer(params, identities)
            on_message = messages_beside_secagg(federation_round, server)
            started = time.monotonic()
            line = {"round": federation_round, "attempt": attempt, "round_id": rid,
                    "institutions": len(present)}  # fmt: skip
            try:
                run_secagg_round(endpoint, server, dict(enumerate(names)), timeout_s,
                                 on_message=on_message)  # fmt: skip
            except SecAggError as exc:
                status.write_text(json.dumps({"round": federation_round, "stage": "done"}))
                store.aborted(federation_round, attempt, str(exc))
                line.update(outcome="aborted", error=str(exc))
            else:
                line["peak_rss_mib"] = peak_rss_mib()  # before the benchmark's own check
                included = server.included
                ring = np.zeros(length, dtype=params.codec.dtype)
                for c in included:  # grid values encode exactly; uint32 sums wrap mod 2^32
                    ring += params.codec.encode(synthetic_input(rid, c, length))
                exact = bool(np.array_equal(server.result, ring))
                mean = torch.from_numpy(params.codec.decode(server.result) / len(included))
                status.write_text(json.dumps({"round": federation_round, "stage": "done"}))
                store.completed(federation_round, attempt, {"mean": mean.float()},
                                RoutingRelay(), [names[c] for c in included],
                                {"round": time.monotonic() - started})  # fmt: skip
                line.update(outcome="completed", included=[names[c] for c in included],
                            exact=exact)  # fmt: skip
            line["seconds"] = time.monotonic() - started
            line.setdefault("peak_rss_mib", peak_rss_mib())
            with results.open("a") as f:
                f.write(json.dumps(line) + "\n")
        for name in endpoint.connected:
            endpoint.send(name, Shutdown(reason="benchmark over"))
        endpoint.close(linger_s=5.0)
    return 0


# ----------------------------------------------------------------------------- driver


def spawn(log_file: Path, *args: str) -> subprocess.Popen:
    """Start this script in another role; its log lines go to ``log_file`` (appended: a pipe
    nobody reads would block a chatty process once full)."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    with log_file.open("ab") as log_out:
        return subprocess.Popen([sys.executable, __file__, *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=log_out)  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(args: argparse.Namespace) -> dict:
    """Run the federation with kills; return the measured facts."""
    work = Path(tempfile.mkdtemp(prefix="sealmoe-reliability-"))
    (work / "ledgers").mkdir()
    (work / "killed").mkdir()
    make_keys(work, args.institutions)
    rng = random.Random(args.seed)
    names = [f"inst{i:02d}" for i in range(args.institutions)]
    plan: dict[str, list] = {name: [] for name in names}
    for federation_round in range(1, args.rounds + 1):
        for stage in STAGES:
            plan[rng.choice(names)].append((federation_round, stage))
    (work / "plan.json").write_text(json.dumps(plan))
    address = f"tcp://127.0.0.1:{free_port()}"
    common = [str(work), address, str(args.length)]
    coordinator_args = ["coordinator", *common, str(args.rounds), str(args.timeout)]
    logs = work / "logs"
    logs.mkdir()
    coordinator = spawn(logs / "coordinator.log", *coordinator_args)
    procs = {i: spawn(logs / f"{i}.log", "institution", *common, str(i))
             for i in range(args.institutions)}  # fmt: skip
    restarts, coordinator_killed, t0 = 0, False, time.monotonic()
    status = work / "status.json"
    while coordinator.poll() is None:
        time.sleep(0.2)
        for i, proc in procs.items():
            if proc.poll() == -signal.SIGKILL:
                procs[i] = spawn(logs / f"{i}.log", "institution", *common, str(i))
                restarts += 1
        if not coordinator_killed and status.exists():
            try:
                where = json.loads(status.read_text())
            except json.JSONDecodeError:
                continue
            mid_round = where["stage"] in ("masked_input", "consistency", "unmask")
            if where["round"] == args.kill_coordinator_round and mid_round:
                coordinator.send_signal(signal.SIGKILL)
                coordinator.wait()
                coordinator_killed = True
                coordinator = spawn(logs / "coordinator.log", *coordinator_args)
    wall = time.monotonic() - t0
    if coordinator.returncode != 0:
        raise SystemExit(f"coordinator failed: {(logs / 'coordinator.log').read_text()[-3000:]}")
    deadline = time.monotonic() + 30
    for proc in procs.values():  # they leave on Shutdown; one restarted after it never hears it
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return analyse(work, args, wall, restarts, coordinator_killed)


def analyse(work: Path, args: argparse.Namespace, wall: float, restarts: int,
            coordinator_killed: bool) -> dict:  # fmt: skip
    """Rounds, exactness, ledger losses and double charges, verified against the kept heads."""
    from audit import verify_ledger
    from audit.heads import head_path
    from audit.heads import read_heads

    keys = load_keys(work)
    lines = [json.loads(x) for x in (work / "coordinator.jsonl").read_text().splitlines()]
    completed = [x for x in lines if x["outcome"] == "completed"]
    charged: dict[str, list[int]] = {}
    verified = 0
    for entry in keys["institutions"]:
        name, path = entry["name"], work / "ledgers" / f"{entry['name']}.jsonl"
        if not path.exists():
            charged[name] = []
            continue
        heads = read_heads(head_path(work / "run", name))
        verify_ledger(path, entry["public"], institution=name, heads=heads)
        verified += 1
        charged[name] = [json.loads(x)["round_id"] for x in path.read_text().splitlines()
                         if json.loads(x).get("kind") == "release"]  # fmt: skip
    lost = sum(r["round_id"] not in charged[n] for r in completed for n in r["included"])
    double = sum(len(ids) - len(set(ids)) for ids in charged.values())
    summed = {r["round_id"] for r in completed}
    unused = sum(rid not in summed for ids in charged.values() for rid in ids)
    killed = sorted(p.name for p in (work / "killed").iterdir())
    journal = [json.loads(x) for x in (work / "run" / "journal.jsonl").read_text().splitlines()]
    ended = {(e["round"], e["attempt"]) for e in journal if e["event"] != "started"}
    cut = [
        e for e in journal if e["event"] == "started" and (e["round"], e["attempt"]) not in ended
    ]
    result = {
        "machine": "2 CPU cores, 24 GiB RAM, no GPU (shared)",
        "institutions": args.institutions,
        "vector_values": args.length,
        "masked_input_mib": args.length * MODULUS_BITS / 8 / 2**20,
        "rounds_planned": args.rounds,
        "round_attempts": len(lines),
        "rounds_completed": len(completed),
        "rounds_aborted": sum(x["outcome"] == "aborted" for x in lines),
        "attempts_cut_by_coordinator_kill": len(cut),
        "abort_reasons": sorted({x["error"][:120] for x in lines if x["outcome"] == "aborted"}),
        "sums_checked_exact": sum(x["exact"] for x in completed),
        "sums_inexact": sum(not x["exact"] for x in completed),
        "institution_sigkills": len(killed),
        "institution_restarts": restarts,
        "coordinator_sigkills": int(coordinator_killed),
        "ledgers_verified_against_kept_head": verified,
        "ledger_entries_lost": lost,
        "ledger_entries_double_charged": double,
        "charges_for_attempts_without_a_sum": unused,
        "coordinator_peak_rss_mib": max(x["peak_rss_mib"] for x in lines),
        "included_per_round": [len(x["included"]) for x in completed],
        "seconds_per_round": [round(x["seconds"], 1) for x in lines],
        "wall_seconds": round(wall, 1),
        "settings": {
            "neighbours": NEIGHBOURS,
            "bits": BITS,
            "modulus_bits": MODULUS_BITS,
            "stage_timeout_s": args.timeout,
            "seed": args.seed,
        },
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def write_results(result: dict) -> None:
    out = HERE / "results"
    size = SIZES.get(result["vector_values"], "a size chosen on the command line")
    (out / "reliability.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Reliability under load", "",
        f"{result['institutions']} institution processes (torch-free, real SecAgg+ client, "
        f"signed ledger, CurveZMQ) and one coordinator on loopback; {result['machine']}.",
        f"Each update: {result['vector_values']:,} values "
        f"({result['masked_input_mib']:.1f} MiB masked), {size}; SecAgg+ with k = "
        f"{NEIGHBOURS} neighbours.",
        "Every round, one institution SIGKILLs itself at each of the stages "
        f"{', '.join(STAGES)} and is restarted; the coordinator is SIGKILLed once mid-round "
        "and resumes from its store under a new attempt.", "",
        "| measure | value |", "|---|---|",
    ]  # fmt: skip
    for key in ["rounds_planned", "round_attempts", "rounds_completed", "rounds_aborted",
                "attempts_cut_by_coordinator_kill",
                "sums_checked_exact", "sums_inexact", "institution_sigkills",
                "coordinator_sigkills", "ledgers_verified_against_kept_head",
                "ledger_entries_lost", "ledger_entries_double_charged",
                "charges_for_attempts_without_a_sum",
                "coordinator_peak_rss_mib", "wall_seconds"]:  # fmt: skip
        value = result[key]
        md.append(f"| {key.replace('_', ' ')} | {value:.0f} |" if isinstance(value, float)
                  else f"| {key.replace('_', ' ')} | {value} |")  # fmt: skip
    (out / "reliability.md").write_text("\n".join(md) + "\n")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(process)d %(name)s: %(message)s")
    if len(sys.argv) > 1 and sys.argv[1] == "institution":
        _, _, work, address, length, index = sys.argv
        raise SystemExit(run_institution(Path(work), int(index), address, int(length)))
    if len(sys.argv) > 1 and sys.argv[1] == "coordinator":
        _, _, work, address, length, rounds, timeout = sys.argv
        raise SystemExit(run_coordinator(Path(work), address, int(length), int(rounds),
                                         float(timeout)))  # fmt: skip
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--institutions", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--length", type=int, default=shakespeare_adapter_values(("q_proj", "v_proj")),
        help="values per update (default: rank-8 adapters on q_proj and v_proj of every layer; "
        "all four target modules are 6,289,920 and need a longer --timeout on 2 cores)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=10.0, help="stage timeout (s)")
    parser.add_argument("--kill-coordinator-round", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")
    args = parser.parse_args()
    result = drive(args)
    write_results(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
