"""The privacy report of a run as data: every number the HTML and Markdown show.

:func:`build_report` reads the run's audit context, each institution's ledger (verified when
identity keys are given, against every head the coordinator kept; a missing ledger with heads on
file is a failed verification, not "released nothing") and any empirical
audit results, and returns one JSON-able dict. Its fields follow NIST SP 800-226 and the OpenDP
registry's tier-3 items: unit of privacy and neighbouring relation, what is released to whom,
the trust model, the accountant and its settings, the DP-SGD parameters, per-round and
cumulative (epsilon, delta) per institution, remaining budget, and software versions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.context import ContextError
from audit.context import FederationFacts
from audit.context import StrategyFacts
from audit.entry import Entry
from audit.events import event_from_json
from audit.heads import HeadFileError
from audit.heads import head_path
from audit.heads import read_heads
from audit.ledger import ledger_path
from audit.verify import LedgerTampered
from audit.verify import parse_entry
from audit.verify import verify_ledger
from privacy.accountant import PLD_DISCRETIZATION
from privacy.budget import Composition
from privacy.config import ACCOUNTANTS

EMPIRICAL_DIR = "empirical"
REQUIRED_FIELDS = (
    "unit_of_privacy",
    "neighbouring_relation",
    "releases",
    "trust_model",
    "accountant",
    "dp_sgd",
    "routing_statistics",
    "example_weights",
    "institutions",
    "software",
    "summary",
    "provenance",
)


def _entries(path: Path) -> list[Entry]:
    """Every entry that parses (for display even when the ledger does not verify)."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(parse_entry(line))
        except ValueError:
            continue
    return out


def _verification(
    path: Path, name: str, run_dir: Path, keys: Mapping[str, Ed25519PublicKey] | None
) -> dict[str, Any]:
    if keys is None or name not in keys:
        return {"status": "not verified", "detail": "no identity key given (pass the roster)"}
    try:
        heads = read_heads(head_path(run_dir, name))
        verify_ledger(path, keys[name], institution=name, heads=heads)
    except LedgerTampered as exc:  # the file is named by the report: no (absolute) path here
        where = f"line {exc.line}: " if exc.line else ""
        return {"status": "FAILED", "detail": f"failed verification: {where}{exc.problem}"}
    except HeadFileError as exc:
        return {"status": "FAILED", "detail": f"failed verification: {exc}"}
    detail = "chain, signatures and every epsilon recomputed"
    detail += (
        f"; matches all {len(heads)} of the coordinator's signed heads"
        if heads
        else "; no coordinator head"
    )
    return {"status": "verified", "detail": detail}


def _missing(path: Path, name: str, run_dir: Path) -> dict[str, str]:
    """The verification of a ledger that is not there: failed if the coordinator holds a head
    stating entries (it was deleted), else "no ledger" (the institution released nothing)."""
    try:
        heads = read_heads(head_path(run_dir, name))
    except HeadFileError as exc:
        return {"status": "FAILED", "detail": f"failed verification: no ledger, and {exc}"}
    if any(h.entries for h in heads):
        return {
            "status": "FAILED",
            "detail": (
                f"failed verification: the ledger {path} is missing, but the coordinator holds "
                f"{len(heads)} signed heads of it, the last at {heads[-1].entries} entries: it "
                "was deleted, and what it released is unknown"
            ),
        }
    return {"status": "no ledger", "detail": "the institution released nothing"}


def _rounds(entries: list[Entry], delta: float) -> list[dict[str, Any]]:
    """Per attempt at a round: the epsilon of its releases alone and cumulative after it."""
    groups: dict[tuple[int, int], list[Entry]] = {}
    for e in entries:
        if e.kind == "release":
            groups.setdefault((e.federation_round, e.round_id), []).append(e)
    rows = []
    for (federation_round, round_id), group in groups.items():
        alone = Composition(delta)
        for e in group:
            alone.add(event_from_json(e.event))
        rows.append({
            "round": federation_round,
            "round_id": round_id,
            "attempt": round_id & 0xFFFF,
            "released": [e.what for e in group],
            "epsilon_round": msgspec.to_builtins(alone.current),
            "epsilon_cumulative": msgspec.to_builtins(group[-1].epsilon),
        })  # fmt: skip
    return rows


def _parameters(entries: list[Entry], what: str) -> dict[str, Any]:
    first = next((e for e in entries if e.kind == "release" and e.what == what), None)
    return dict(first.parameters) if first is not None else {}


def _empirical(run_dir: Path) -> list[dict[str, Any]]:
    folder = run_dir / EMPIRICAL_DIR
    if not folder.is_dir():
        return []
    audits = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
    for a in audits:
        a["audits"] = audit_scope(a)
    return audits


def audit_scope(result: Mapping[str, Any]) -> str:
    """Exactly what an empirical (canary) audit measured, and what it did not."""
    return (
        f"{result['label']}: the DP-SGD mechanism alone (the adapter-update release), re-run "
        f"at this run's settings (noise multiplier {result['noise_multiplier']:.3g}, sampling "
        f"rate {result['sample_rate']:.3g}, {result['steps']} steps) on "
        f"{result['canaries']} synthetic canaries in a small white-box model. It does not "
        "audit this run's model or data, the routing statistics or other releases, the secure "
        "aggregation, or the composition over all releases; its lower bound refutes a weaker "
        "guarantee than claimed (a check of the implementation), it is no guarantee itself"
    )


def _relative(path: Path, run_dir: Path) -> str:
    """``path`` as the report shows it: relative to the run directory (no host's layout)."""
    try:
        return path.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return path.name


def _dataset(facts: FederationFacts, dp_sgd: Mapping[str, Any]) -> dict[str, Any]:
    """What the public record already says about an institution's number of records.

    DP-SGD samples each record with rate q = B / N (B: the logical batch size), and the ledger
    records q: N = B / q is public to anyone who can read the ledger. Nothing new is released.
    """
    rate = dp_sgd.get("sample_rate")
    implied = None
    how = "no adapter update was released, so the ledger implies no size"
    if isinstance(rate, (int, float)) and 0 < rate < 1:
        implied = round(facts.batch_size / rate)
        how = (
            f"implied by the ledger: logical batch B = {facts.batch_size} / sampling rate "
            f"q = {rate:.4g} (already public to the accountant; not a new release)"
        )
    elif rate == 1:
        how = (
            f"at most the batch size B = {facts.batch_size} (sampling rate 1: every record in "
            "every step)"
        )
    cap = facts.train_records_cap
    return {
        "training_records": implied,
        "how": how,
        "declared_cap": cap,
        "cap_note": (
            f"the config caps each institution at {cap} training records ([data.max_blocks])"
            if cap is not None
            else "the config sets no cap on training records"
        ),
    }


def _institution(
    run_dir: Path, facts: FederationFacts, index: int, keys: Mapping[str, Ed25519PublicKey] | None
) -> dict[str, Any]:
    inst = facts.institutions[index]
    path = ledger_path(run_dir, inst.name)
    budget = {"epsilon": inst.budget_epsilon, "delta": inst.budget_delta}
    if not path.exists():
        verification = _missing(path, inst.name, run_dir)
        released_nothing = verification["status"] == "no ledger"
        return {
            "name": inst.name, "budget": budget, "ledger": _relative(path, run_dir),
            "entries": [], "dataset": _dataset(facts, {}), "rounds": [],
            "spent": {"rdp": 0.0, "pld": 0.0} if released_nothing else {},
            "remaining_epsilon": inst.budget_epsilon if released_nothing else None,
            "refusals": 0, "verification": verification,
            "dp_sgd": {}, "routing": {}, "scores": {}, "keys": {}, "choice": {},
            "validation": {},
        }  # fmt: skip
    entries = _entries(path)
    releases = [e for e in entries if e.kind == "release"]
    spent = msgspec.to_builtins(releases[-1].epsilon) if releases else {"rdp": 0.0, "pld": 0.0}
    enforced = spent.get(facts.accountant)
    remaining = None if enforced is None else max(0.0, inst.budget_epsilon - enforced)
    dp_sgd = _parameters(entries, "adapter-update")
    return {
        "name": inst.name,
        "budget": budget,
        "ledger": _relative(path, run_dir),
        "dataset": _dataset(facts, dp_sgd),
        "verification": _verification(path, inst.name, run_dir, keys),
        "spent": spent,
        "remaining_epsilon": remaining,
        "refusals": sum(1 for e in entries if e.kind == "refusal"),
        "rounds": _rounds(entries, inst.budget_delta),
        "dp_sgd": dp_sgd,
        "routing": _parameters(entries, "routing-statistics"),
        "scores": _parameters(entries, "affinity-scores"),
        "keys": _parameters(entries, "expert-keys"),
        "choice": _parameters(entries, "expert-choice"),
        "validation": _parameters(entries, "validation-signal"),
        "entries": [
            {
                "seq": e.seq, "kind": e.kind, "round": e.federation_round,
                "round_id": e.round_id, "what": e.what,
                "epsilon": msgspec.to_builtins(e.epsilon), "reason": e.reason, "time": e.time,
            }
            for e in entries
        ],
    }  # fmt: skip


def _releases(strategy: StrategyFacts, update_to: str, routing_to: str) -> list[dict[str, str]]:
    """What every institution releases under ``strategy``, by whom it is seen."""
    releases = [
        {
            "what": strategy.update,
            "mechanism": "DP-SGD: Poisson sampling, per-block clipping, Gaussian noise",
            "to_whom": update_to,
        }
    ]
    releases += [msgspec.structs.asdict(extra) for extra in strategy.extra_releases]
    if strategy.releases_routing:
        releases.append(
            {
                "what": "routing statistics (per-layer expert counts, router probabilities, "
                "tokens)",
                "mechanism": "Gaussian mechanism on block-normalised sums",
                "to_whom": routing_to,
            }
        )
    releases.append(
        {
            "what": "ledger head (entry count and last hash, signed; as proof the hash "
            "digests of the last ledger entries)",
            "mechanism": "none needed: hashes of signed entries, no private data",
            "to_whom": "the coordinator",
        }
    )
    return releases


COMPOSITION_NOTE = (
    "The per-round ε values are not added up. The accountant composes every release of an "
    "institution over all rounds into one (ε, δ) guarantee (privacy loss distributions or "
    "Rényi DP), which is smaller than the sum of the per-round values; the cumulative column "
    "is that composed total, and it is what the budget is checked against before each release."
)


def _eps(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.3g}"


def plain_summary(
    facts: FederationFacts, institutions: list[dict[str, Any]], model: str
) -> list[str]:
    """The guarantee in plain language, one paragraph per item, for the top of the report."""
    names = ", ".join(i["name"] for i in institutions)
    paragraphs = [
        f"{len(institutions)} institutions ({names}) fine-tuned the base model {model} "
        f"together over {facts.rounds} planned rounds. No institution's data left it: each "
        "trained on its own records and released only noised updates, which the coordinator "
        "received masked or encrypted and could only add up.",
        "What is guaranteed: for each institution, everything it released over the whole run "
        "is (ε, δ)-differentially private with respect to any single record of its training "
        "data. Whatever anyone learns from those releases (the coordinator, the other "
        "institutions, whoever uses the trained model) they would have learned almost as well "
        'had that one record been left out. ε measures "almost" (smaller is stronger; '
        "ε ≤ 1 is strong, ε around 8 is common in practice); δ is the small probability that "
        "the bound does not hold.",
        "The unit of privacy is one record, not one person: a person with k records in one "
        "institution is protected with roughly k·ε. Each institution's guarantee covers its "
        "own records only and is independent of the others'.",
    ]
    acc = facts.accountant.upper()
    for inst in institutions:
        spent = inst["spent"].get(facts.accountant)
        verified = inst["verification"]["status"]
        paragraphs.append(
            f"{inst['name']}: ε = {_eps(spent)} spent of a budget of "
            f"{inst['budget']['epsilon']:g}, at δ = {inst['budget']['delta']:g} ({acc} "
            f"accountant); {inst['refusals']} release(s) refused for exceeding the budget; "
            f"ledger {verified}."
        )
    paragraphs.append(
        "The per-round ε values in the tables below compose into the total; they are not "
        "added (see Accountant). The empirical audit, where present, is a check of the "
        "implementation, not part of the guarantee."
    )
    paragraphs.append(
        "Authenticity: the coordinator signs this report (report.html.sig beside it, Ed25519 "
        "by its identity key). `sealmoe audit verify RUN_DIR` checks that signature against "
        "the coordinator's key in the federation's roster, and every institution's signed "
        "ledger behind the numbers."
    )
    return paragraphs


PUBLIC_WEIGHTS = (
    "public, declared in the federation config: the same every round and independent of any "
    "institution's data, so the weight inside the secure sum needs no noise and no charge"
)


def _example_weights(facts: FederationFacts) -> dict[str, Any]:
    """How each institution's update is weighted in the averages, and why that leaks nothing."""
    declared = {i.name: i.weight for i in facts.institutions}
    if any(w is None for w in declared.values()):
        return {
            "kind": "not stated: this run's context was written before example weights were "
            "declared in the federation config (earlier versions derived them from dataset "
            "sizes, un-noised)",
            "values": {},
        }
    return {"kind": PUBLIC_WEIGHTS, "values": declared}


def build_report(
    run_dir: str | Path,
    facts: FederationFacts,
    keys: Mapping[str, Ed25519PublicKey] | None = None,
) -> dict[str, Any]:
    """The report of ``run_dir`` as one JSON-able dict (see module docstring)."""
    run_dir = Path(run_dir)
    strategy = facts.strategy_facts
    if strategy is None:
        raise ContextError(
            f"the audit context of {run_dir} does not state what strategy "
            f"{facts.strategy!r} releases; build the report with `sealmoe audit report`"
        )
    n = len(facts.institutions)
    holders = facts.secagg_neighbours + 1
    ckks_routing = facts.routing_statistics == "ckks"
    routing_to = (
        "encrypted (CKKS) to the coordinator, which adds ciphertexts and cannot read them; the "
        "sum goes to every institution, which decrypts it"
        if ckks_routing
        else "masked (SecAgg+) to the coordinator, which learns only the sum and relays it to "
        "every institution"
    )
    ckks_updates = facts.expert_updates == "ckks"
    update_to = (
        "encrypted (CKKS) to the coordinator, which learns only the summed weight in the clear "
        "and keeps the global adapters encrypted; every institution decrypts the new state"
        if ckks_updates
        else "masked (SecAgg+) to the coordinator, which learns only the sum over the included "
        "institutions; the averaged update goes to every institution"
    )
    sees_updates = (
        "the summed public weight of the institutions that reach unmasking (the adapter "
        "updates and the global adapters only as ciphertexts)"
        if ckks_updates
        else "the sum of the masked adapter updates of the institutions that reach unmasking"
    )
    institutions = [_institution(run_dir, facts, i, keys) for i in range(n)]
    model = facts.base_model
    model_name = repr(model.name) if model is not None else "(not recorded)"
    return {
        "title": f"Privacy report: federation {facts.federation!r}",
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "run_dir": run_dir.resolve().name,
        "summary": plain_summary(facts, institutions, model_name),
        "federation": {
            "name": facts.federation,
            "rounds": facts.rounds,
            "spare_rounds": facts.spare_rounds,
            "institutions": n,
        },
        "unit_of_privacy": (
            "one record of the institution's dataset (a row of its file, or one speech of the "
            f"built-in Shakespeare data), used as one example of at most {facts.block_len} tokens "
            "(record-level DP, per institution)"
        ),
        "neighbouring_relation": (
            "add or remove one record from one institution's training data "
            "(add-or-remove-one; both accountants use it)"
        ),
        "strategy": facts.strategy,
        "releases": _releases(strategy, update_to, routing_to),
        "trust_model": {
            "coordinator_sees": (
                sees_updates
                + ", who took part in each round, message sizes and timing; never a single "
                "institution's update"
                + strategy.coordinator_sees
                + (
                    "; routing statistics only as ciphertexts"
                    if ckks_routing and strategy.releases_routing
                    else ""
                )
            ),
            "ckks_key_custody": (
                "shared-key model: every institution holds the CKKS secret key, the "
                "coordinator only the evaluation context. A coordinator colluding with one "
                "institution can decrypt what it relays; the DP noise still protects each "
                "institution's records"
            ),
            "secagg_threshold": facts.secagg_threshold,
            "secagg_share_holders": holders,
            "secagg_neighbours": facts.secagg_neighbours,
            "secagg_survivor_check": facts.secagg_check_survivors,
            "collusion": (
                f"a client's masks are rebuilt only from {facts.secagg_threshold} of its "
                f"{holders} share holders; a coordinator colluding with fewer than "
                f"{facts.secagg_threshold} institutions learns nothing beyond the sum (and "
                "each update is DP by itself)"
            ),
            "ledger_integrity": (
                "each institution signs its ledger entries (Ed25519) in a hash chain; the "
                "coordinator keeps every signed head it accepted, each only if its proof shows "
                "it extends the one before, and each ledger is verified against all of them"
            ),
        },
        "accountant": {
            "enforcing": facts.accountant,
            "reported": list(ACCOUNTANTS),
            "library": "dp-accounting " + facts.software.get("dp-accounting", "?"),
            "pld_value_discretization": PLD_DISCRETIZATION,
            "rdp_orders": "dp-accounting defaults",
            "composition": COMPOSITION_NOTE,
        },
        "dp_sgd": {
            "max_grad_norm": facts.max_grad_norm,
            "local_steps": facts.local_steps,
            "batch_size": facts.batch_size,
            "calibrated_for_rounds": facts.rounds + facts.spare_rounds,
            "per_institution": "noise multiplier and sampling rate: see each institution",
        },
        "routing_statistics": {
            "noise_multiplier": facts.routing_noise_multiplier,
            "records_sampling_rate": facts.routing_sample_rate,
            "protection": facts.routing_statistics,
        },
        "example_weights": _example_weights(facts),
        "institutions": institutions,
        "empirical_audit": _empirical(run_dir),
        "provenance": {
            "base_model": model_name,
            "base_model_revision": (model.revision if model else None) or "default",
            "base_model_dtype": model.dtype if model else "(not recorded)",
            "base_model_sha256": (model.sha256 if model else None) or "none",
            "base_model_note": model.note if model else "not recorded by this run's coordinator",
            "sealmoe_git_commit": facts.git_commit or "(not recorded)",
        },
        "software": dict(facts.software),
    }
