"""What routing releases and spare rounds cost: DP-SGD noise calibrated for each plan.

For examples/tiny.toml's institutions (q = batch / training blocks, local steps, rounds), and a
sweep of ``spare_rounds`` and ``routing_noise_multiplier``, print and save the calibrated DP-SGD
noise multiplier, the epsilon the planned routing releases spend alone, and the composed epsilon
of the whole plan (RDP, the enforcing accountant of the example). Usage:

    python benchmarks/privacy_plan.py     # writes benchmarks/results/privacy_plan.{json,md}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import dp_accounting

from clients.contract.config import load_config
from clients.models.build import build_model
from clients.models.moe_lora import routing_statistics
from clients.training.routing_release import routing_sensitivity
from privacy import calibrate_noise
from privacy import dp_sgd_event
from privacy import epsilon

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"


def main() -> None:
    logging.getLogger("absl").setLevel(logging.ERROR)
    config = load_config(ROOT / "examples" / "tiny.toml")
    stats = routing_statistics(build_model(config)[0])
    layers, top_k = stats.num_layers, stats.top_k
    q = config.training.batch_size / config.data.max_blocks.train
    steps, rounds = config.training.local_steps, config.federation.rounds
    rows = []
    for name in ("comedies", "histories"):
        budget = config.budget(name)
        for spare in (0, 1, 2):
            for routing_sigma in (None, 5.0, 10.0, 20.0):
                planned = rounds + spare
                also = (
                    []
                    if routing_sigma is None
                    else [dp_accounting.SelfComposedDpEvent(
                        dp_accounting.GaussianDpEvent(routing_sigma), planned)]
                )  # fmt: skip
                delta = budget.target_delta
                sigma = calibrate_noise(budget.target_epsilon, delta, q, planned * steps, also=also)
                routing_eps = epsilon(also, delta) if also else 0.0
                total = epsilon([dp_sgd_event(sigma, q, planned * steps), *also], delta)
                rows.append({
                    "institution": name, "budget_epsilon": budget.target_epsilon,
                    "rounds": rounds, "spare_rounds": spare,
                    "routing_noise_multiplier": routing_sigma,
                    "routing_noise_std": None if routing_sigma is None
                    else routing_sigma * routing_sensitivity(layers, top_k),
                    "dp_sgd_noise_multiplier": sigma, "epsilon_routing_alone": routing_eps,
                    "epsilon_plan": total,
                })  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"config": "examples/tiny.toml", "sample_rate": q, "local_steps": steps,
            "adapted_layers": layers, "top_k": top_k, "accountant": "rdp"}  # fmt: skip
    (OUT / "privacy_plan.json").write_text(json.dumps({"setup": meta, "rows": rows}, indent=1))
    lines = [
        f"examples/tiny.toml: q = {q:g}, {steps} local steps, {rounds} rounds, "
        f"{layers} adapted layers, top-{top_k} (routing sensitivity "
        f"{routing_sensitivity(layers, top_k):.3g}); RDP accountant",
        "",
        "| institution (budget ε) | spare rounds | routing noise multiplier | routing noise "
        "std | DP-SGD noise multiplier | ε of routing alone | ε of the plan |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        routing = r["routing_noise_multiplier"]
        lines.append(
            f"| {r['institution']} ({r['budget_epsilon']:g}) | {r['spare_rounds']} | "
            f"{'none' if routing is None else format(routing, 'g')} | "
            f"{'—' if r['routing_noise_std'] is None else format(r['routing_noise_std'], '.3g')} | "
            f"{r['dp_sgd_noise_multiplier']:.3f} | {r['epsilon_routing_alone']:.3f} | "
            f"{r['epsilon_plan']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    (OUT / "privacy_plan.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
