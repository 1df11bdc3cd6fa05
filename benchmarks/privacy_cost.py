"""What privacy costs in `make run`: the same plan without DP, and a trivial baseline.

`sealmoe run` has no switch to turn privacy off (nothing leaves an institution un-noised), so
this runs the example's federation in one process (:func:`coordinator.simulation.simulate`,
the same learners, data, model, steps and learning rate) with ``private=False``: no DP-SGD
clipping or noise, no noise on the routing statistics. Beside it, per institution, the test
perplexity of a unigram model of its own training tokens (add-one smoothed over the
vocabulary), scored on the same targets. Compare with ``results/make_run.md`` (the private
run): the "before" columns must agree, since the data and the starting model are the same.

    .venv/bin/python benchmarks/privacy_cost.py [--config examples/shakespeare.toml]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.contract.config import load_config  # noqa: E402
from clients.contract.records import PAD_ID  # noqa: E402
from clients.data.sources import institution_data  # noqa: E402
from clients.models.build import build_tokenizer  # noqa: E402
from coordinator.simulation import simulate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    """Perplexity on ``test``'s next-token targets of add-one smoothed unigram frequencies of
    ``train``'s tokens (padding left out of both)."""
    seen = train[train != PAD_ID]
    counts = torch.bincount(seen, minlength=vocab).double() + 1.0
    log_p = torch.log(counts / counts.sum())
    targets = test[:, 1:]
    targets = targets[targets != PAD_ID]
    return math.exp(-float(log_p[targets].mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "shakespeare.toml")
    parser.add_argument("--out", type=Path, default=RESULTS / "privacy_cost")
    args = parser.parse_args()
    config = load_config(args.config)
    tokenizer = build_tokenizer(config)
    vocab = len(tokenizer)
    unigram = {}
    for name in config.institution_names:
        data = institution_data(config, name, tokenizer)
        unigram[name] = unigram_perplexity(data["train"], data["test"], vocab)
    start = time.monotonic()
    result = simulate(config, config.aggregation.strategy, private=False)
    wall = time.monotonic() - start
    rows = [
        {
            "institution": name,
            "unigram_test_perplexity": unigram[name],
            "test_perplexity_before": result.initial[name].perplexity,
            "test_perplexity_after_without_dp": result.final[name].perplexity,
            "drop_percent": 100
            * (1 - result.final[name].perplexity / result.initial[name].perplexity),
        }
        for name in config.institution_names
    ]
    document = {
        "benchmark": "privacy_cost",
        "config": str(args.config.resolve().relative_to(ROOT)),
        "strategy": config.aggregation.strategy,
        "wall_seconds": wall,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "institutions": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [
        f"`{document['config']}` in one process without DP ({config.aggregation.strategy}, "
        f"same data, model, steps and learning rate): {wall / 60:.1f} min on "
        f"{os.cpu_count()} CPUs ({platform.platform()}).",
        "",
        "| institution | unigram test ppl | test ppl before | after, no DP | drop |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['institution']} | {r['unigram_test_perplexity']:.1f} | "
            f"{r['test_perplexity_before']:.1f} | {r['test_perplexity_after_without_dp']:.1f} | "
            f"{r['drop_percent']:.1f} % |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
