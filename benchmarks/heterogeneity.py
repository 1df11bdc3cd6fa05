"""How different the genre institutions of benchmarks/strategies.py are, at the byte level.

For each institution of a strategies setting: the Jensen-Shannon divergence (bits) of its
training bytes' unigram and bigram distributions from the pooled ones, and the test
cross-entropy (nats per byte) of add-one-smoothed bigram models fitted on its own training
blocks and on everybody's. When the pooled model is as good on an institution's test split as
its own, the non-IID-ness that personalised MoE strategies exploit is weak at this level.

    python benchmarks/heterogeneity.py [--setting quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from strategies import SETTINGS  # noqa: E402
from strategies import federation  # noqa: E402

from clients.data.sources import institution_data  # noqa: E402
from clients.models.build import build_model  # noqa: E402

VOCAB = 256


def bigram_counts(blocks: torch.Tensor) -> np.ndarray:
    """Counts [256, 256] of (byte, next byte) pairs inside the blocks."""
    ids = blocks.numpy()
    counts = np.zeros((VOCAB, VOCAB))
    np.add.at(counts, (ids[:, :-1].ravel(), ids[:, 1:].ravel()), 1.0)
    return counts


def js_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits of two distributions (any shape, each summing to 1)."""
    p, q = p.ravel(), q.ravel()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        keep = a > 0
        return float(np.sum(a[keep] * np.log2(a[keep] / m[keep])))

    return (kl(p) + kl(q)) / 2


def bigram_cross_entropy(counts: np.ndarray, blocks: torch.Tensor) -> float:
    """Mean next-byte cross-entropy (nats) on ``blocks`` of the add-one bigram model ``counts``."""
    probs = (counts + 1.0) / (counts + 1.0).sum(1, keepdims=True)
    ids = blocks.numpy()
    return float(-np.log(probs[ids[:, :-1], ids[:, 1:]]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="quick")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    config = federation(args.setting, 0)
    _, tokenizer = build_model(config)
    names = config.institution_names
    data = {n: institution_data(config, n, tokenizer) for n in names}
    own = {n: bigram_counts(data[n]["train"]) for n in names}
    pooled = sum(own.values())
    rows = []
    for n in names:
        rows.append(
            {
                "institution": n,
                "js_unigram_bits": js_bits(
                    own[n].sum(1) / own[n].sum(), pooled.sum(1) / pooled.sum()
                ),
                "js_bigram_bits": js_bits(own[n] / own[n].sum(), pooled / pooled.sum()),
                "own_bigram_test_ce": bigram_cross_entropy(own[n], data[n]["test"]),
                "pooled_bigram_test_ce": bigram_cross_entropy(pooled, data[n]["test"]),
            }
        )
    lines = [
        "| institution | JS unigram (bits) | JS bigram (bits) | own bigram test CE | pooled "
        "bigram test CE |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['institution']} | {r['js_unigram_bits']:.4f} | {r['js_bigram_bits']:.4f} | "
            f"{r['own_bigram_test_ce']:.3f} | {r['pooled_bigram_test_ce']:.3f} |"
            for r in rows
        ),
    ]
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"heterogeneity_{args.setting}"
    (args.out / f"{stem}.json").write_text(
        json.dumps({"setting": args.setting, "rows": rows}, indent=1)
    )
    (args.out / f"{stem}.md").write_text(
        "Byte-level heterogeneity of the genre institutions (training blocks; CE in nats per "
        f"byte on each institution's test blocks).\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
