"""FedAvg-LoRA, local-only training and the MoE strategies on one non-IID Shakespeare federation.

Four institutions, one per genre (comedies, tragedies, histories, romances), the same DP budget
each (and once without DP), several seeds (model initialisation; DP noise and sampling always
come from the OS). Every run is :func:`coordinator.simulation.simulate`: real Opacus DP-SGD,
real SecAgg+ for the updates and CKKS for the routing statistics, in one process; every release
(DP-SGD, noised routing statistics, FedAMoLE's noised embedding and keys, DDOME's noised expert
choice) is charged and the reported epsilon is their composition. Reports each institution's
test next-token accuracy and perplexity after the last round (mean and standard deviation over
seeds), as a table, a plot and JSON under ``benchmarks/results/``; with DDOME also its
zero-shot selection for the last genre, trained by the other three only.

    python benchmarks/strategies.py                       # quick: tiny model, 15-20 minutes
    python benchmarks/strategies.py --setting smollm2     # SmolLM2-135M (hours on a CPU)
    python benchmarks/strategies.py --strategies fedavg,fedmoe --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from statistics import mean
from statistics import pstdev
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.contract.config import FederationConfig  # noqa: E402
from clients.contract.config import parse_config  # noqa: E402
from clients.data.shakespeare import GENRES  # noqa: E402
from clients.data.sources import institution_data  # noqa: E402
from clients.models.ddome_lora import common_embedding  # noqa: E402
from clients.strategies.ddome import DDOME_ADAPTERS  # noqa: E402
from clients.strategies.ddome import zero_shot  # noqa: E402
from clients.strategies.ddome import zero_shot_loss  # noqa: E402
from coordinator.simulation import SimulationResult  # noqa: E402
from coordinator.simulation import simulate  # noqa: E402
from coordinator.simulation import strategy_names  # noqa: E402

DEFAULT_STRATEGIES = ("local", "fedavg", "fedalign", "fedmoe", "fedamole", "ddome")

SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {
        "federation": {"name": "strategies-quick", "rounds": 8},
        "model": {
            "name": "tiny-dense",
            "moe": {"num_experts": 4, "top_k": 2, "rank": 4, "alpha": 8.0},
        },
        "data": {
            "block_len": 32,
            "max_chars_per_institution": 60_000,
            "max_blocks": {"train": 512, "validation": 32, "test": 32},
        },
        "training": {"local_steps": 8, "batch_size": 64, "lr": 1e-2, "device": "cpu"},
        "fedamole": {"affinity_blocks": 24},  # the smallest validation split has 27 records
    },
    "smollm2": {
        "federation": {"name": "strategies-smollm2", "rounds": 5},
        "model": {"name": "smollm2", "moe": {"num_experts": 4, "top_k": 2, "rank": 8}},
        "data": {"block_len": 64, "max_blocks": {"train": 256, "validation": 16, "test": 32}},
        "training": {"local_steps": 8, "batch_size": 16, "lr": 2e-3, "device": "auto"},
        "fedamole": {"affinity_blocks": 16},
    },
}
PRIVACY = {
    "target_epsilon": 8.0,
    "target_delta": 1e-5,
    "max_grad_norm": 1.0,
    "accountant": "rdp",
    "routing_noise_multiplier": 10.0,
    "spare_rounds": 0,  # nothing is retried in one process: every strategy spends its budget
}
FEDAMOLE_MOE = {"num_experts": 8, "top_k": 2}
"""FedAMoLE's experts: 8, so that with 4 held per institution its top-2 router chooses (the
paper's code uses 30; with 4 experts and 2 held the router had nothing to choose)."""
FEDAMOLE = {"clients_per_expert": 2, "min_experts": 4, "max_experts": 4}
"""Each expert goes to 2 of the 4 institutions (the paper's 2), so each holds 4 of the 8."""
DDOME = {"anchors": 2}
"""Two of the four institutions are anchors (institution i -> expert i): the paper's 30-50 %."""


def federation(
    setting: str, seed: int, strategy: str | None = None, genres: tuple[str, ...] = GENRES
) -> FederationConfig:
    """The setting's federation of ``genres`` with model seed ``seed`` (the data partition
    stays fixed); for ``strategy`` "fedamole" with :data:`FEDAMOLE_MOE`'s experts."""
    doc = json.loads(json.dumps(SETTINGS[setting]))
    if strategy == "fedamole":
        doc["model"]["moe"].update(FEDAMOLE_MOE)
    doc["federation"]["seed"] = seed
    doc["institutions"] = [{"name": genre} for genre in genres]
    doc["privacy"] = dict(PRIVACY)
    doc["aggregation"] = {
        "expert_updates": "mask",
        "routing_statistics": "ckks",
        "fedamole": {**FEDAMOLE, **doc.pop("fedamole")},
        "ddome": dict(DDOME),
    }
    return parse_config(doc, ROOT / "benchmarks" / "strategies.toml")


def record(result: SimulationResult, seed: int, seconds: float) -> dict[str, Any]:
    return {
        "strategy": result.strategy,
        "private": result.private,
        "seed": seed,
        "seconds": round(seconds, 1),
        "institutions": {
            name: {
                "accuracy": m.accuracy,
                "perplexity": m.perplexity,
                "loss": m.loss,
                "initial_accuracy": result.initial[name].accuracy,
                "initial_perplexity": result.initial[name].perplexity,
                "epsilon": result.epsilon[name],
                "releases": [what for what, _ in result.charged[name]],
            }
            for name, m in result.final.items()
        },
        "diagnostics": [r.diagnostics for r in result.rounds],
    }


def zero_shot_ddome(
    trained_by: FederationConfig, unseen: FederationConfig, held_out: str, private: bool
) -> dict[str, Any]:
    """DDOME trained by ``trained_by``'s institutions; ``held_out`` (an institution of
    ``unseen`` only, which never trained) picks its experts zero-shot from its unlabelled test
    blocks (the paper's headline). Its next-token loss with the initial and with the trained
    gate and experts: zero-shot selection helps when the trained loss is lower."""
    result = simulate(trained_by, "ddome", private=private)
    model, tokenizer = DDOME_ADAPTERS.build(trained_by)
    initial = DDOME_ADAPTERS.state(model)
    blocks = institution_data(unseen, held_out, tokenizer)["test"]
    embeddings = common_embedding(model, blocks)
    row: dict[str, Any] = {"held_out": held_out, "private": private}
    for label, adapters in (("initial", initial), ("trained", result.state.adapters)):
        DDOME_ADAPTERS.load(model, adapters)
        choice = zero_shot(model, embeddings, trained_by.model.moe.top_k)
        loss = zero_shot_loss(model, blocks, choice)
        row[label] = {"experts": list(choice.experts), "loss": loss, "perplexity": math.exp(loss)}
    return row


def zero_shot_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per zero-shot run: the held-out institution's perplexity before and after."""
    lines = [
        "| DP | seed | held out | zero-shot perplexity, initial | trained | experts (trained) |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        dp = f"ε = {PRIVACY['target_epsilon']:g}" if r["private"] else "none"
        lines.append(
            f"| {dp} | {r['seed']} | {r['held_out']} | {r['initial']['perplexity']:.2f} | "
            f"{r['trained']['perplexity']:.2f} | {r['trained']['experts']} |"
        )
    return "\n".join(lines)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (strategy, DP or not, institution): mean and std over seeds; 'all' is the mean over
    institutions per seed, then over seeds."""
    rows = []
    keys = sorted({(r["strategy"], r["private"]) for r in runs}, key=lambda k: (not k[1], k[0]))
    for strategy, private in keys:
        group = [r for r in runs if r["strategy"] == strategy and r["private"] == private]
        names = list(group[0]["institutions"])
        for name in [*names, "all"]:
            acc, ppl = (_over_seeds(group, names, name, m) for m in ("accuracy", "perplexity"))
            rows.append(
                {
                    "strategy": strategy,
                    "private": private,
                    "institution": name,
                    "accuracy_mean": mean(acc),
                    "accuracy_std": pstdev(acc),
                    "perplexity_mean": mean(ppl),
                    "perplexity_std": pstdev(ppl),
                    "seeds": len(group),
                }
            )
    return rows


def _over_seeds(
    group: list[dict[str, Any]], names: list[str], name: str, metric: str
) -> list[float]:
    """One value per seed: institution ``name``'s metric, or the mean over ``names`` ("all")."""
    if name == "all":
        return [mean(r["institutions"][n][metric] for n in names) for r in group]
    return [r["institutions"][name][metric] for r in group]


def markdown(rows: list[dict[str, Any]], institutions: list[str]) -> str:
    """One line per (DP, strategy): accuracy and perplexity per institution and overall."""
    head = "| DP | strategy | " + " | ".join([*institutions, "all"]) + " |"
    lines = [head, "|---|---|" + "---:|" * (len(institutions) + 1)]
    for private in (True, False):
        for strategy in dict.fromkeys(r["strategy"] for r in rows if r["private"] == private):
            cells = []
            for name in [*institutions, "all"]:
                (row,) = [
                    r
                    for r in rows
                    if r["strategy"] == strategy
                    and r["private"] == private
                    and r["institution"] == name
                ]
                cells.append(
                    f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f} % / "
                    f"{row['perplexity_mean']:.2f} ± {row['perplexity_std']:.2f}"
                )
            dp = f"ε = {PRIVACY['target_epsilon']:g}" if private else "none"
            lines.append(f"| {dp} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], institutions: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*institutions, "all"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, private in zip(axes, (True, False), strict=True):
        if not any(r["private"] == private for r in rows):
            ax.set_visible(False)
            continue
        strategies = list(dict.fromkeys(r["strategy"] for r in rows if r["private"] == private))
        width = 0.8 / max(len(strategies), 1)
        for i, strategy in enumerate(strategies):
            picked = {
                r["institution"]: r
                for r in rows
                if r["strategy"] == strategy and r["private"] == private
            }
            xs = [j + i * width for j in range(len(names))]
            ax.bar(
                xs,
                [100 * picked[n]["accuracy_mean"] for n in names],
                width,
                yerr=[100 * picked[n]["accuracy_std"] for n in names],
                label=strategy,
                capsize=2,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        title = f"DP-SGD, ε = {PRIVACY['target_epsilon']:g} per institution" if private else "no DP"
        ax.set_title(title)
        ax.set_ylabel("test next-token accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="quick")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-dp-too", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    unknown = sorted(set(strategies) - set(strategy_names()))
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {strategy_names()}")
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # dp-accounting's RDP convergence warnings
    runs, zero_shots = [], []
    for private in (True, False) if args.no_dp_too else (True,):
        for seed in args.seeds:
            for strategy in strategies:
                config = federation(args.setting, seed, strategy)
                start = time.perf_counter()
                result = simulate(config, strategy, private=private)
                runs.append(record(result, seed, time.perf_counter() - start))
                acc = mean(m.accuracy for m in result.final.values())
                eps = max((e for e in result.epsilon.values() if e is not None), default=None)
                print(
                    f"{'DP' if private else 'no DP'} seed {seed} {strategy:9s} "
                    f"mean accuracy {100 * acc:.2f} %, max epsilon {eps} "
                    f"({runs[-1]['seconds']} s)",
                    flush=True,
                )
            if "ddome" in strategies:  # the last genre never trains: zero-shot selection
                row = zero_shot_ddome(
                    federation(args.setting, seed, "ddome", GENRES[:-1]),
                    federation(args.setting, seed),
                    GENRES[-1],
                    private,
                )
                zero_shots.append({**row, "seed": seed})
                print(f"zero-shot {row['held_out']}: {row}", flush=True)
    institutions = list(GENRES)
    rows = summarise(runs)
    table = markdown(rows, institutions)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"strategies_{args.setting}"
    settings = {
        "setting": SETTINGS[args.setting],
        "privacy": PRIVACY,
        "fedamole": {"moe": FEDAMOLE_MOE, **FEDAMOLE},
        "ddome": DDOME,
        "institutions": institutions,
        "seeds": args.seeds,
        "strategies": strategies,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}",
    }
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {"settings": settings, "summary": rows, "runs": runs, "zero_shot": zero_shots},
            indent=1,
        )
    )
    (args.out / f"{stem}.md").write_text(
        "Test next-token accuracy / perplexity after the last round, mean ± std over seeds "
        f"{args.seeds}.\n\n{table}\n"
        + (
            "\nDDOME zero-shot: the last genre never trains; it picks its experts from the "
            "gate on its unlabelled test blocks, per block the best of them.\n\n"
            f"{zero_shot_markdown(zero_shots)}\n"
            if zero_shots
            else ""
        )
    )
    plot(rows, institutions, args.out / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    main()
