"""Does FedAMoLE's lead under DP come from its expert selection or from its structure?

The strategy experiment (``benchmarks/strategies.py``) finds FedAMoLE ahead of FedAvg-LoRA at
ε = 8, while ``benchmarks/fedamole_noise.py`` finds the noise on its selection scores about five
times their largest value. This reruns FedAMoLE at ε = 8 for the grid's seeds with the score
release drowned (noise multiplier 1e4: the assignment solved from the scores is then a random
one, and the release costs almost no ε), everything else as in the grid, and compares with the
grid's own FedAMoLE and FedAvg-LoRA runs of the same seeds (paired bootstrap over test records,
as the grid does; ``benchmarks/results/strategies_cpu.*`` must exist).

    python benchmarks/fedamole_selection.py          # 3 runs, about 7 min on 2 cores
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import strategies as grid  # noqa: E402
from corpora import write_institutions  # noqa: E402
from pretrain_base import ensure_base  # noqa: E402

from clients.runtime.plan import privacy_plan  # noqa: E402
from coordinator.simulation import simulate  # noqa: E402

UNINFORMED = "fedamole, random selection"
SCORE_NOISE = 1e4


def fedamole_config(seed: int, files: dict[str, Path], base: Path, score_noise: float | None):
    """The grid's FedAMoLE federation at ε = 8 (``score_noise``: the score release's noise
    multiplier instead of the grid's)."""
    config = grid.federation("cpu", seed, grid.HEADLINE_EPSILON, files, base, "fedamole")
    fedamole = config.aggregation.fedamole
    if score_noise is not None:
        fedamole = msgspec.structs.replace(fedamole, score_noise_multiplier=score_noise)
    aggregation = msgspec.structs.replace(
        config.aggregation, strategy="fedamole", fedamole=fedamole
    )  # the strategy named in the config too, so that the privacy plan is FedAMoLE's
    return msgspec.structs.replace(config, aggregation=aggregation)


def run_uninformed(seed: int, files: dict[str, Path], base: Path) -> tuple[dict, dict]:
    """(summary, per-record losses) of FedAMoLE at ε = 8, seed ``seed``, with its selection
    scores drowned in noise."""
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    config = fedamole_config(seed, files, base, SCORE_NOISE)
    begin = time.perf_counter()
    result = simulate(config, "fedamole", private=True)
    summary, records = grid.run_record(
        result, seed, grid.HEADLINE_EPSILON, time.perf_counter() - begin
    )
    return {**summary, "strategy": UNINFORMED}, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=grid.ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    stem = args.results / "strategies_cpu"
    saved = grid._loose(json.loads(stem.with_suffix(".json").read_text()))
    with gzip.open(f"{stem}.records.json.gz", "rt") as source:
        records: dict[str, Any] = json.load(source)
    seeds = saved["settings"]["seeds"]
    files = write_institutions(grid.CACHE / "institutions")
    base = ensure_base()
    started = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        outcomes = list(pool.map(run_uninformed, seeds, [files] * len(seeds), [base] * len(seeds)))
    runs = [r for r in saved["runs"] if r["epsilon"] == grid.HEADLINE_EPSILON]
    for seed, (summary, per_record) in zip(seeds, outcomes, strict=True):
        runs.append(summary)
        records[grid._key(UNINFORMED, grid.HEADLINE_EPSILON, seed)] = per_record
    sigmas = {
        name: privacy_plan(fedamole_config(seeds[0], files, base, noise))[0].noise_multiplier
        for name, noise in (("as in the grid", None), ("random selection", SCORE_NOISE))
    }
    rng = np.random.default_rng(0)
    rows = [
        grid.paired_difference(records, runs, strategy, grid.HEADLINE_EPSILON, rng)
        for strategy in ("fedamole", UNINFORMED)
    ]
    lines = [
        f"FedAMoLE at ε = 8 minus FedAvg-LoRA (the grid's runs), seeds {seeds}; the random-"
        f"selection runs drown the score release in noise (multiplier {SCORE_NOISE:g}); "
        f"{(time.perf_counter() - started) / 60:.1f} min, 2 CPU workers.",
        "",
        "| FedAMoLE | mean Δ loss [95 % CI] | worst Δ loss [95 % CI] | mean Δ per seed |",
        "|---|---:|---:|---:|",
    ]
    for name, d in zip(("as in the grid", "random selection"), rows, strict=True):
        lo, hi = d["mean_interval"]
        wlo, whi = d["worst_interval"]
        per_seed = ", ".join(f"{x:+.4f}" for x in d["per_seed_mean_difference"])
        lines.append(
            f"| {name} | {d['mean_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
            f"{d['worst_difference']:+.4f} [{wlo:+.4f}, {whi:+.4f}] | {per_seed} |"
        )
    lines += [
        "",
        "DP-SGD noise multiplier of the plan: "
        + ", ".join(f"{name} {sigma:.4f}" for name, sigma in sigmas.items()),
    ]
    out = args.results / "fedamole_selection"
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    document = {"differences": rows, "runs": runs[-len(seeds) :], "dp_sgd_noise_multiplier": sigmas}
    out.with_suffix(".json").write_text(json.dumps(grid._strict(document), indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
