"""What the federated MoE strategies do, against FedAvg-LoRA and trivial baselines, under DP.

Six institutions whose text differs measurably (English drama, Python source, C headers,
English, German and French man pages; see ``benchmarks/corpora.py``) and a seventh, Spanish
man pages, that never trains (DDOME's zero-shot). The base is a byte-level Llama pretrained
once on public text that none of them holds (``benchmarks/pretrain_base.py``). Every federated
run is :func:`coordinator.simulation.simulate`: real Opacus DP-SGD, real SecAgg+ and CKKS, every
release charged; each seed changes the data partition and the adapter initialisation.

Reported per institution: test loss (nats per byte) after every round, its mean and worst over
institutions, beside the majority-byte, unigram and bigram baselines; each strategy's
difference from FedAvg-LoRA with paired bootstrap 95 % intervals (test records resampled per
seed and institution); a privacy-utility curve over ε ∈ {1, 2, 4, 8, ∞} for FedAvg-LoRA and
the best strategy at ε = 8.

    python benchmarks/strategies.py                  # the CPU grid (54 min measured, 2 cores)
    python benchmarks/strategies.py --redraw         # tables and plot again from saved results
    python benchmarks/strategies.py --setting gpu    # larger: see benchmarks/strategies_gpu.sh
    python benchmarks/strategies.py --seeds 0 --strategies fedavg,fedmoe --epsilons 8
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import math
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # siblings: opacus installs a package "benchmarks"

from corpora import TRAINING_INSTITUTIONS  # noqa: E402
from corpora import UNSEEN_INSTITUTION as UNSEEN  # noqa: E402
from corpora import js_divergence_matrix  # noqa: E402
from corpora import ngram_record_losses  # noqa: E402
from corpora import own_vs_pooled_gain  # noqa: E402
from corpora import write_institutions  # noqa: E402
from pretrain_base import ensure_base  # noqa: E402

from clients.contract.config import FederationConfig  # noqa: E402
from clients.contract.config import parse_config  # noqa: E402
from clients.data.files import read_records  # noqa: E402
from clients.data.records import seeded_split  # noqa: E402
from clients.data.sources import institution_data  # noqa: E402
from clients.models.build import build_tokenizer  # noqa: E402
from clients.models.ddome_lora import common_embedding  # noqa: E402
from clients.strategies.ddome import DDOME_ADAPTERS  # noqa: E402
from clients.strategies.ddome import zero_shot  # noqa: E402
from clients.strategies.ddome import zero_shot_loss  # noqa: E402
from clients.strategies.registry import CLIENT_HALVES  # noqa: E402
from clients.training.trainer import Metrics  # noqa: E402
from coordinator.simulation import SimulationResult  # noqa: E402
from coordinator.simulation import simulate  # noqa: E402
from coordinator.simulation import strategy_names  # noqa: E402
from privacy.errors import CalibrationError  # noqa: E402

CACHE = ROOT / "benchmarks" / "cache"
STRATEGIES = ("local", "fedavg", "fedalign", "fedmoe", "fedamole", "ddome")
BASELINE = "fedavg"
NGRAMS = ("majority", "unigram", "bigram")
SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": {
        "federation": {"rounds": 4},
        "moe": {"num_experts": 4, "top_k": 2, "rank": 4, "alpha": 8.0},
        "data": {"block_len": 64, "max_blocks": {"train": 2048, "validation": 64, "test": 256}},
        "training": {"local_steps": 10, "batch_size": 64, "lr": 1e-2, "device": "auto"},
        "seeds": [0, 1, 2],
    },
    "gpu": {
        "federation": {"rounds": 10},
        "moe": {"num_experts": 4, "top_k": 2, "rank": 8, "alpha": 16.0},
        "data": {"block_len": 128, "max_blocks": {"train": 4096, "validation": 128, "test": 512}},
        "training": {"local_steps": 10, "batch_size": 256, "lr": 1e-2, "device": "auto"},
        "seeds": [0, 1, 2, 3, 4],
    },
}
PRIVACY = {
    "target_delta": 1e-5,
    "max_grad_norm": 1.0,
    "accountant": "pld",
    "routing_noise_multiplier": 10.0,
    "routing_sample_rate": 0.05,  # routing statistics from a Poisson sample of ~100 records
    "spare_rounds": 0,  # nothing is retried in one process: every strategy spends its budget
}
EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)
"""The privacy-utility curve (∞: no DP); every strategy runs at 8 and at ∞."""
HEADLINE_EPSILON = 8.0
FEDAMOLE = {"moe": {"num_experts": 12}, "clients_per_expert": 2, "min_experts": 4, "max_experts": 4}
"""FedAMoLE: 12 experts, each held by 2 of the 6 institutions, so each holds 4 (as many as
every other strategy's institutions use) and its top-2 router has a choice."""
DDOME = {"anchors": 2}
"""DDOME: two of the six institutions anchor an expert each (the paper's 30-50 %)."""
BOOTSTRAP_RESAMPLES = 2000


def federation(
    setting: str,
    seed: int,
    epsilon: float,
    files: dict[str, Path],
    base: Path,
    strategy: str | None = None,
    institutions: tuple[str, ...] = TRAINING_INSTITUTIONS,
) -> FederationConfig:
    """The setting's federation of ``institutions`` at ``epsilon`` (any value when the run has
    no DP); ``seed`` picks the data partition and the adapter initialisation."""
    spec = SETTINGS[setting]
    moe = dict(spec["moe"])
    aggregation: dict[str, Any] = {
        "expert_updates": "mask",
        "routing_statistics": "ckks",
        "fedamole": {k: v for k, v in FEDAMOLE.items() if k != "moe"},
        "ddome": dict(DDOME),
    }
    if strategy == "fedamole":
        moe.update(FEDAMOLE["moe"])
    doc = {
        "federation": {"name": f"strategies-{setting}", "seed": seed, **spec["federation"]},
        "model": {"name": str(base), "moe": moe},
        "data": {"source": "files", "seed": seed, **spec["data"]},
        "training": dict(spec["training"]),
        "privacy": {"target_epsilon": epsilon if math.isfinite(epsilon) else 8.0, **PRIVACY},
        "aggregation": aggregation,
        "institutions": [{"name": n, "data": {"path": str(files[n])}} for n in institutions],
    }
    return parse_config(doc, ROOT / "benchmarks" / "strategies.toml")


def record_losses(metrics: Metrics) -> dict[str, list]:
    """A model's per-record test losses and correct predictions (the bootstrap's inputs)."""
    return {
        "loss": [round(x, 5) for x in metrics.record_loss],
        "correct": list(metrics.record_correct),
        "tokens": list(metrics.record_tokens),
    }


def run_record(
    result: SimulationResult, seed: int, epsilon: float, seconds: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's summary, its per-record test losses): per institution test loss, accuracy
    and ε spent after the last round; the test-loss curve over rounds."""
    summary = {
        "strategy": result.strategy,
        "epsilon": epsilon,
        "seed": seed,
        "seconds": round(seconds, 1),
        "institutions": {
            name: {
                "loss": m.loss,
                "accuracy": m.accuracy,
                "initial_loss": result.initial[name].loss,
                "initial_accuracy": result.initial[name].accuracy,
                "curve": [r.test[name].loss for r in result.rounds if r.test],
                "epsilon_spent": result.epsilon[name],
            }
            for name, m in result.final.items()
        },
        "diagnostics": [r.diagnostics for r in result.rounds],
    }
    records = {name: record_losses(m) for name, m in result.final.items()}
    return summary, records


def ngram_baselines(config: FederationConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Majority byte, unigram and bigram models of each institution's own training split,
    scored on the positions the language model is scored on."""
    tokenizer = build_tokenizer(config)
    summary: dict[str, Any] = {order: {} for order in NGRAMS}
    records: dict[str, Any] = {order: {} for order in NGRAMS}
    for name in config.institution_names:
        data = institution_data(config, name, tokenizer)
        for order in NGRAMS:
            scores = ngram_record_losses(data["train"], data["test"], order)
            loss, correct, tokens = scores.loss_sum, scores.n_correct, scores.n_scored
            summary[order][name] = {
                "loss": float(loss.sum() / tokens.sum()),
                "accuracy": float(correct.sum() / tokens.sum()),
            }
            records[order][name] = {
                "loss": [round(float(x), 5) for x in loss],
                "correct": [int(x) for x in correct],
                "tokens": [int(x) for x in tokens],
            }
    return summary, records


def heterogeneity(config: FederationConfig, files: dict[str, Path]) -> dict[str, Any]:
    """Before training: byte-unigram Jensen-Shannon divergence between institutions and the
    gain (bits per byte) of each institution's own bigram over a pooled one, on its split."""
    splits = {}
    for name in config.institution_names:
        records = read_records(files[name], "jsonl")
        train, _, test = seeded_split(records, config.data.split, config.data.seed)
        splits[name] = (train, test)
    divergence = js_divergence_matrix({n: s[0] for n, s in splits.items()})
    gain = own_vs_pooled_gain(
        {n: s[0] for n, s in splits.items()}, {n: s[1] for n, s in splits.items()}
    )
    return {
        "js_divergence_bits": {f"{a}|{b}": round(v, 4) for (a, b), v in divergence.items()},
        "own_vs_pooled_bigram_gain_bits": {n: round(v, 4) for n, v in gain.items()},
    }


def zero_shot_ddome(ddome: SimulationResult, config: FederationConfig, held_out: str) -> dict:
    """Test loss of ``held_out`` (in ``config``, never trained) with DDOME's experts picked
    zero-shot from its unlabelled test blocks, by the initial and by the trained gate."""
    model, tokenizer = DDOME_ADAPTERS.build(config)
    blocks = institution_data(config, held_out, tokenizer)["test"]
    embeddings = common_embedding(model, blocks)
    row: dict[str, Any] = {}
    for label, adapters in (
        ("ddome_initial", DDOME_ADAPTERS.state(model)),
        ("ddome_trained", ddome.state.adapters),
    ):
        DDOME_ADAPTERS.load(model, adapters)
        choice = zero_shot(model, embeddings, config.model.moe.top_k)
        row[label] = {
            "experts": list(choice.experts),
            "loss": zero_shot_loss(model, blocks, choice),
        }
    return row


def global_on_unseen(fedavg: SimulationResult, config: FederationConfig, held_out: str) -> dict:
    """Test loss of ``held_out`` (in ``config``, never trained) with the pretrained base alone
    and with FedAvg-LoRA's global adapters: what DDOME's zero-shot choice has to beat."""
    learner = CLIENT_HALVES["fedavg"].learner(config, held_out)
    base = learner.evaluate(learner.local_state(), "test")
    learner.load_adapters(fedavg.state.adapters)
    return {
        "base": {"loss": base.loss},
        "fedavg": {"loss": learner.evaluate(fedavg.state, "test").loss},
    }


@dataclasses.dataclass(frozen=True)
class Job:
    """One federated run of the grid, with what it needs to build its config."""

    setting: str
    strategy: str
    epsilon: float
    seed: int
    files: dict[str, Path]
    base: Path
    threads: int


def run_job(job: Job) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(summary, per-record test losses, what it adds to the unseen institution's row) of one
    run, called in a worker process; a plan that cannot fit ``job.epsilon`` gives a summary
    that says why and nothing else."""
    torch.set_num_threads(job.threads)
    logging.disable(logging.WARNING)  # dp-accounting's convergence warnings
    config = federation(job.setting, job.seed, job.epsilon, job.files, job.base, job.strategy)
    begin = time.perf_counter()
    curve = job.epsilon == HEADLINE_EPSILON  # the plot's curves; elsewhere the last round only
    try:
        result = simulate(
            config, job.strategy, private=math.isfinite(job.epsilon), test_every_round=curve
        )
    except CalibrationError as error:  # e.g. FedAMoLE's fixed releases alone exceed ε = 1
        infeasible = {"strategy": job.strategy, "epsilon": job.epsilon, "seed": job.seed}
        return {**infeasible, "infeasible": str(error)}, {}, {}
    summary, per_record = run_record(result, job.seed, job.epsilon, time.perf_counter() - begin)
    unseen: dict[str, Any] = {}
    if job.strategy in ("ddome", BASELINE):
        with_unseen = federation(
            job.setting,
            job.seed,
            job.epsilon,
            job.files,
            job.base,
            job.strategy,
            (*TRAINING_INSTITUTIONS, UNSEEN),
        )
        measure = zero_shot_ddome if job.strategy == "ddome" else global_on_unseen
        unseen = measure(result, with_unseen, UNSEEN)
    return summary, per_record, unseen


def paired_difference(
    records: dict[str, Any],
    runs: list[dict[str, Any]],
    strategy: str,
    epsilon: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """``strategy`` minus FedAvg-LoRA at ``epsilon``: the mean over seeds and institutions of
    the per-institution test-loss difference, with a paired bootstrap 95 % interval (each
    seed's and institution's test records resampled with replacement, the same records for
    both models), and the same for the worst institution."""
    seeds = sorted(_seeds(runs, strategy, epsilon) & _seeds(runs, BASELINE, epsilon))
    if not seeds:
        return {}
    names = list(TRAINING_INSTITUTIONS)
    mean_diffs = np.zeros(BOOTSTRAP_RESAMPLES)
    worst_diffs = np.zeros(BOOTSTRAP_RESAMPLES)
    point_mean, point_worst, per_seed = [], [], []
    for seed in seeds:
        ours, theirs = (records[_key(s, epsilon, seed)] for s in (strategy, BASELINE))
        per_name_ours, per_name_theirs = [], []
        for name in names:
            a = np.asarray(ours[name]["loss"])
            b = np.asarray(theirs[name]["loss"])
            tokens = np.asarray(ours[name]["tokens"], dtype=np.float64)
            picks = rng.integers(0, len(a), size=(BOOTSTRAP_RESAMPLES, len(a)))
            per_name_ours.append(a[picks].sum(1) / tokens[picks].sum(1))
            per_name_theirs.append(b[picks].sum(1) / tokens[picks].sum(1))
            point_mean.append(a.sum() / tokens.sum() - b.sum() / tokens.sum())
        o, t = np.stack(per_name_ours), np.stack(per_name_theirs)
        mean_diffs += (o - t).mean(0) / len(seeds)
        worst_diffs += (o.max(0) - t.max(0)) / len(seeds)
        full_o = [np.sum(ours[n]["loss"]) / np.sum(ours[n]["tokens"]) for n in names]
        full_t = [np.sum(theirs[n]["loss"]) / np.sum(theirs[n]["tokens"]) for n in names]
        point_worst.append(max(full_o) - max(full_t))
        per_seed.append(float(np.mean(full_o) - np.mean(full_t)))
    return {
        "strategy": strategy,
        "epsilon": epsilon,
        "seeds": seeds,
        "mean_difference": float(np.mean(point_mean)),
        "mean_interval": [float(x) for x in np.percentile(mean_diffs, [2.5, 97.5])],
        "worst_difference": float(np.mean(point_worst)),
        "worst_interval": [float(x) for x in np.percentile(worst_diffs, [2.5, 97.5])],
        "per_seed_mean_difference": per_seed,
    }


def _seeds(runs: list[dict[str, Any]], strategy: str, epsilon: float) -> set[int]:
    return {r["seed"] for r in runs if r["strategy"] == strategy and r["epsilon"] == epsilon}


def _key(strategy: str, epsilon: float, seed: int) -> str:
    return f"{strategy}|{epsilon:g}|{seed}"


def table_rows(runs: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, ε): test loss per institution, mean and worst over institutions, each the
    mean over seeds."""
    groups: dict[tuple[str, float], list[dict[str, dict[str, float]]]] = {}
    for b in baselines:
        for order in NGRAMS:
            groups.setdefault((order, math.nan), []).append(b["summary"][order])
    for r in runs:
        groups.setdefault((r["strategy"], r["epsilon"]), []).append(r["institutions"])
        if r["strategy"] == BASELINE and r["epsilon"] == HEADLINE_EPSILON:  # before any round
            before = {
                n: {"loss": i["initial_loss"], "accuracy": i["initial_accuracy"]}
                for n, i in r["institutions"].items()
            }
            groups.setdefault(("pretrained base", math.nan), []).append(before)
    rows = []
    for (model, epsilon), per_seed in groups.items():
        names = list(per_seed[0])
        loss = {n: mean(seed[n]["loss"] for seed in per_seed) for n in names}
        accuracy = {n: mean(seed[n]["accuracy"] for seed in per_seed) for n in names}
        rows.append(
            {
                "model": model,
                "epsilon": epsilon,
                "seeds": len(per_seed),
                "loss": loss,
                "accuracy": accuracy,
                "mean": mean(mean(seed[n]["loss"] for n in names) for seed in per_seed),
                "worst": mean(max(seed[n]["loss"] for n in names) for seed in per_seed),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], differences: list[dict[str, Any]]) -> str:
    """The loss table, then the paired differences from FedAvg-LoRA."""
    names = list(TRAINING_INSTITUTIONS)
    lines = [
        "| model | ε | " + " | ".join(names) + " | mean | worst |",
        "|---|---:|" + "---:|" * (len(names) + 2),
    ]
    order = {m: i for i, m in enumerate([*NGRAMS, "pretrained base", *STRATEGIES])}
    for row in sorted(rows, key=lambda r: (_block(r["epsilon"]), order.get(r["model"], 99))):
        if row["model"] == "majority":  # a prediction, not a distribution: accuracy only
            cells = [f"acc. {100 * row['accuracy'][n]:.1f} %" for n in names]
            lines.append("| majority byte | — | " + " | ".join(cells) + " | — | — |")
            continue
        cells = [f"{row['loss'][n]:.3f}" for n in names]
        lines.append(
            f"| {row['model']} | {_eps(row['epsilon'])} | "
            + " | ".join(cells)
            + f" | {row['mean']:.3f} | {row['worst']:.3f} |"
        )
    lines += [
        "",
        "| strategy minus FedAvg-LoRA | ε | mean Δ loss [95 % CI] | worst Δ loss [95 % CI] "
        "| mean Δ per seed |",
        "|---|---:|---:|---:|---:|",
    ]
    for d in differences:
        lo, hi = d["mean_interval"]
        wlo, whi = d["worst_interval"]
        lines.append(
            f"| {d['strategy']} | {_eps(d['epsilon'])} | {d['mean_difference']:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] | {d['worst_difference']:+.4f} "
            f"[{wlo:+.4f}, {whi:+.4f}] | "
            + ", ".join(f"{x:+.4f}" for x in d["per_seed_mean_difference"])
            + " |"
        )
    return "\n".join(lines)


def _eps(epsilon: float) -> str:
    return "—" if math.isnan(epsilon) else "∞" if math.isinf(epsilon) else f"{epsilon:g}"


def _block(epsilon: float) -> tuple[int, float]:
    """Table order: the n-gram baselines, ε = 8, no DP, then the curve's ε from high to low."""
    if math.isnan(epsilon):
        return (0, 0.0)
    if epsilon == HEADLINE_EPSILON:
        return (1, 0.0)
    return (2, 0.0) if math.isinf(epsilon) else (3, -epsilon)


def _eps_sort(epsilon: float) -> float:
    return 1e9 if math.isnan(epsilon) else epsilon


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], best: str | None, path: Path
) -> None:
    """Left: mean test loss over rounds at ε = 8 per strategy. Right: mean test loss against ε
    for FedAvg-LoRA and the best strategy (∞ drawn at the right edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, tradeoff) = plt.subplots(1, 2, figsize=(12, 4.5))
    for strategy in STRATEGIES:
        group = [r for r in runs if r["strategy"] == strategy and r["epsilon"] == HEADLINE_EPSILON]
        if not group:
            continue
        per_seed = [
            np.mean([inst["curve"] for inst in r["institutions"].values()], axis=0) for r in group
        ]
        start = mean(mean(i["initial_loss"] for i in r["institutions"].values()) for r in group)
        ys = [start, *np.mean(per_seed, axis=0)]
        curves.plot(range(len(ys)), ys, marker="o", label=strategy)
    for order in ("unigram", "bigram"):
        (row,) = [r for r in rows if r["model"] == order]
        curves.axhline(row["mean"], linestyle=":", color="grey")
        curves.annotate(order, (0, row["mean"]), fontsize=8, color="grey")
    curves.set(
        xlabel="round",
        ylabel="mean test loss (nats/byte)",
        title=f"DP-SGD, ε = {HEADLINE_EPSILON:g} per institution",
    )
    curves.legend(fontsize=8)
    ran = sorted({r["epsilon"] for r in rows if not math.isnan(r["epsilon"])})
    finite = [e for e in ran if math.isfinite(e)] or [HEADLINE_EPSILON]
    xs = {e: (e if math.isfinite(e) else 2 * max(finite)) for e in ran}
    for strategy in dict.fromkeys([BASELINE, best]):
        if strategy is None:
            continue
        points = sorted(
            (xs[r["epsilon"]], r["mean"])
            for r in rows
            if r["model"] == strategy and not math.isnan(r["epsilon"])
        )
        tradeoff.plot(*zip(*points, strict=True), marker="o", label=strategy)
    tradeoff.set_xscale("log", base=2)
    tradeoff.set_xticks([xs[e] for e in ran], [_eps(e) for e in ran])
    tradeoff.set(
        xlabel="ε per institution (δ = 1e-5)",
        ylabel="mean test loss (nats/byte)",
        title="privacy-utility",
    )
    tradeoff.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        default=list(EPSILONS),
        help="the curve's ε values (inf: no DP); all strategies run at 8 and inf",
    )
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="rewrite the tables, intervals and plot from the saved results; no training",
    )
    args = parser.parse_args()
    if args.redraw:
        redraw(args)
        return
    strategies = args.strategies.split(",")
    unknown = sorted(set(strategies) - set(strategy_names()))
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {strategy_names()}")
    logging.disable(logging.WARNING)  # dp-accounting's convergence warnings
    seeds = args.seeds or SETTINGS[args.setting]["seeds"]
    started = time.perf_counter()
    base = ensure_base()
    files = write_institutions(CACHE / "institutions")
    print(f"base and data ready ({time.perf_counter() - started:.0f} s)", flush=True)

    baselines, records, runs = [], {}, []
    for seed in seeds:
        config = federation(args.setting, seed, HEADLINE_EPSILON, files, base)
        hetero = heterogeneity(config, files)
        summary, per_record = ngram_baselines(config)
        baselines.append({"seed": seed, "heterogeneity": hetero, "summary": summary})
        for order in NGRAMS:
            records[f"{order}|nan|{seed}"] = per_record[order]
        print_heterogeneity(seed, hetero, summary)

    unseen: dict[tuple[int, float], dict[str, Any]] = {}
    infeasible: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"strategies_{args.setting}.partial.jsonl"
    partial.unlink(missing_ok=True)

    def run(jobs: list[Job]) -> None:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            for job, (summary, per_record, extra) in zip(
                jobs, pool.map(run_job, jobs), strict=True
            ):
                with partial.open("a") as out:  # nothing is lost if a later run fails
                    out.write(json.dumps(_strict([summary, per_record, extra])) + "\n")
                if "infeasible" in summary:
                    infeasible.append(summary)
                    print(
                        f"seed {job.seed} ε {_eps(job.epsilon)} {job.strategy}: "
                        f"{summary['infeasible']}",
                        flush=True,
                    )
                    continue
                runs.append(summary)
                records[_key(job.strategy, job.epsilon, job.seed)] = per_record
                if extra:
                    unseen.setdefault((job.seed, job.epsilon), {"held_out": UNSEEN}).update(extra)
                losses = [i["loss"] for i in summary["institutions"].values()]
                spent = [i["epsilon_spent"] or 0.0 for i in summary["institutions"].values()]
                print(
                    f"seed {job.seed} ε {_eps(job.epsilon):>3} {job.strategy:9s} "
                    f"mean loss {mean(losses):.4f} worst {max(losses):.4f} "
                    f"ε spent ≤ {max(spent):.2f} ({summary['seconds']} s)",
                    flush=True,
                )

    def jobs(names: list[str], epsilons: list[float]) -> list[Job]:
        return [
            Job(args.setting, name, epsilon, seed, files, base, args.threads)
            for epsilon in epsilons
            for seed in seeds
            for name in names
        ]

    run(jobs(strategies, [HEADLINE_EPSILON, math.inf]))
    rows = table_rows(runs, baselines)
    candidates = [
        r
        for r in rows
        if r["epsilon"] == HEADLINE_EPSILON and r["model"] not in (BASELINE, "local")
    ]
    best = min(candidates, key=lambda r: r["mean"])["model"] if candidates else None
    curve = sorted(set(args.epsilons) - {HEADLINE_EPSILON, math.inf})
    run(jobs([s for s in dict.fromkeys((BASELINE, best)) if s in strategies], curve))
    zero_shots = [
        {**row, "seed": seed, "epsilon": eps} for (seed, eps), row in sorted(unseen.items())
    ]
    seconds = time.perf_counter() - started
    summarise(args, seeds, strategies, best, seconds, baselines, runs, records, zero_shots,
              infeasible)  # fmt: skip


def redraw(args: argparse.Namespace) -> None:
    """Rewrite the tables, intervals and plot of ``args.out``'s saved grid without training."""
    stem = args.out / f"strategies_{args.setting}"
    saved = _loose(json.loads(Path(f"{stem}.json").read_text()))
    with gzip.open(f"{stem}.records.json.gz", "rt") as source:
        records = json.load(source)
    settings = saved["settings"]
    summarise(args, settings["seeds"], settings["strategies"],
              settings["best_at_headline_epsilon"], settings["seconds"], saved["baselines"],
              saved["runs"], records, saved["zero_shot"], saved["infeasible"])  # fmt: skip


def print_heterogeneity(seed: int, hetero: dict[str, Any], ngrams: dict[str, Any]) -> None:
    """The heterogeneity of seed ``seed``'s partition and the n-gram baselines, before training."""
    names = list(TRAINING_INSTITUTIONS)
    print(f"seed {seed}: Jensen-Shannon divergence of byte unigrams (bits)")
    print("          " + "".join(f"{n[:8]:>9}" for n in names))
    for a in names:
        cells = [
            hetero["js_divergence_bits"].get(
                f"{a}|{b}", hetero["js_divergence_bits"].get(f"{b}|{a}", 0.0)
            )
            for b in names
        ]
        print(f"{a[:9]:<10}" + "".join(f"{c:9.3f}" for c in cells))
    gain = hetero["own_vs_pooled_bigram_gain_bits"]
    print(
        "own bigram vs pooled (bits/byte saved): " + ", ".join(f"{n} {gain[n]:+.3f}" for n in names)
    )
    majority = ngrams["majority"]  # a prediction, not a distribution: accuracy only
    print("majority accuracy: " + ", ".join(f"{n} {majority[n]['accuracy']:.1%}" for n in names))
    for order in NGRAMS[1:]:
        print(
            f"{order:8s} test loss: "
            + ", ".join(f"{n} {ngrams[order][n]['loss']:.3f}" for n in names)
        )


def summarise(
    args: argparse.Namespace,
    seeds: list[int],
    strategies: list[str],
    best: str | None,
    seconds: float,
    baselines: list,
    runs: list,
    records: dict,
    zero_shots: list,
    infeasible: list,
) -> None:
    """A finished grid's tables and paired differences, written to ``args.out``: JSON
    (settings, summary, runs), per-record losses (gzip JSON), Markdown and the plot."""
    rows = table_rows(runs, baselines)
    rng = np.random.default_rng(0)  # resampling for the intervals; nothing secret
    differences = [
        d
        for epsilon in sorted({r["epsilon"] for r in runs}, key=_eps_sort)
        for s in strategies
        if s != BASELINE
        for d in [paired_difference(records, runs, s, epsilon, rng)]
        if d
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"strategies_{args.setting}"
    settings = {
        "setting": SETTINGS[args.setting],
        "privacy": PRIVACY,
        "fedamole": FEDAMOLE,
        "ddome": DDOME,
        "institutions": list(TRAINING_INSTITUTIONS),
        "unseen": UNSEEN,
        "seeds": seeds,
        "strategies": strategies,
        "best_at_headline_epsilon": best,
        "seconds": round(seconds),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
    }
    document = {
        "settings": settings,
        "rows": rows,
        "differences": differences,
        "zero_shot": zero_shots,
        "baselines": baselines,
        "runs": runs,
        "infeasible": infeasible,
    }
    Path(f"{stem}.json").write_text(json.dumps(_strict(document), indent=1) + "\n")
    with gzip.open(f"{stem}.records.json.gz", "wt") as out:
        json.dump(records, out)
    table = markdown(rows, differences)
    Path(f"{stem}.md").write_text(
        f"Test loss (nats per byte) after the last round, mean over seeds {seeds}; "
        f"{settings['machine']}, {seconds / 60:.0f} min in all.\n\n{table}\n\n"
        f"{zero_shot_markdown(zero_shots)}\n"
        + "".join(
            f"\nNot run: {r['strategy']} at ε = {_eps(r['epsilon'])}, seed {r['seed']}: "
            f"{r['infeasible']}\n"
            for r in infeasible
        )
    )
    plot(runs, rows, best, Path(f"{stem}.png"))
    print(table)
    print(f"grid done in {seconds / 60:.1f} min")


def zero_shot_markdown(rows: list[dict[str, Any]]) -> str:
    """The unseen institution's test loss: base, FedAvg-LoRA global, DDOME zero-shot."""
    lines = [
        f"Unseen institution {rows[0]['held_out'] if rows else UNSEEN} (never trains), test loss:",
        "",
        "| ε | seed | base | FedAvg-LoRA | DDOME zero-shot, initial gate | trained gate "
        "| experts |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cells = [_loss(r, k) for k in ("base", "fedavg", "ddome_initial", "ddome_trained")]
        experts = r.get("ddome_trained", {}).get("experts", "")
        lines.append(
            f"| {_eps(r['epsilon'])} | {r['seed']} | " + " | ".join(cells) + f" | {experts} |"
        )
    return "\n".join(lines)


def _loss(row: dict[str, Any], key: str) -> str:
    return f"{row[key]['loss']:.3f}" if key in row else "—"


def _loose(value: Any) -> Any:
    """The inverse of :func:`_strict` for every ``epsilon`` field of a saved document."""
    if isinstance(value, dict):
        return {
            k: (math.inf if v == "inf" else math.nan if v is None else v)
            if k == "epsilon"
            else _loose(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_loose(v) for v in value]
    return value


def _strict(value: Any) -> Any:
    """``value`` with ε = ∞ written "inf" and a missing ε (the n-gram rows) null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if math.isinf(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


if __name__ == "__main__":
    main()
