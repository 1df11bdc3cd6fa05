"""Precision and speed of the coordinator's keyless CKKS scaling (CKKS expert updates).

With ``aggregation.expert_updates = "ckks"`` the coordinator keeps the global adapters
encrypted and folds in each round's encrypted sum as ``factor * sum + state``
(``secagg.ckks.CkksEvaluator.scale_and_add``, one plaintext multiplication). For the default
parameters and n batches of uniform values in [-1, 1], this measures the max absolute error of
the decrypted result against float64, per unit of ``|factor| * n``, and the seconds per 1e5
values. Prints a table and writes JSON.

    .venv/bin/python benchmarks/ckks_scaling.py [--values 20000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from results_file import Column
from results_file import print_header
from results_file import print_row
from results_file import write_rows

from secagg.ckks import CkksAggregator
from secagg.ckks import CkksEvaluator
from secagg.ckks import CkksKeyHolder

RESULTS = Path(__file__).parent / "results" / "ckks_scaling.json"


SCALING_COLUMNS = [
    Column("n", "n", 4),
    Column("factor", "factor", 7, "g"),
    Column("max_abs_error", "max err", 9, ".2e"),
    Column("error_per_factor_and_summand", "err/(f*n)", 10, ".2e"),
    Column("scale_and_add_s_per_1e5", "s/1e5", 6, ".3f"),
]


def measure(n: int, factor: float, n_values: int, rng: np.random.Generator) -> dict:
    """Error of Enc(factor * sum of n batches + base), base a plaintext in [-1, 1]."""
    holder = CkksKeyHolder.generate()
    aggregator = CkksAggregator(holder.public_context())
    evaluator = CkksEvaluator(holder.public_context())
    arrays = [rng.uniform(-1.0, 1.0, n_values) for _ in range(n)]
    for a in arrays:
        aggregator.add(holder.encrypt([a]))
    base = rng.uniform(-1.0, 1.0, n_values)
    t0 = time.perf_counter()
    state = evaluator.scale_and_add(aggregator.sum(), np.full(n_values, factor), [base])
    seconds = time.perf_counter() - t0
    # A second round on top of the first: the state stays at one level down.
    again = evaluator.scale_and_add(aggregator.sum(), np.full(n_values, factor), state)
    exact = factor * np.sum(arrays, axis=0)
    err = max(
        np.max(np.abs(holder.decrypt(state)[0] - (exact + base))),
        np.max(np.abs(holder.decrypt(again)[0] - (2 * exact + base))) / 2,
    )
    return {
        "n": n,
        "factor": factor,
        "values": n_values,
        "max_abs_error": float(err),
        "error_per_factor_and_summand": float(err) / (abs(factor) * n),
        "scale_and_add_s_per_1e5": seconds * 1e5 / n_values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=20_000, help="values per batch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rng = np.random.default_rng(20261201)
    rows = []
    print_header(SCALING_COLUMNS)
    for n in (1, 10, 30):
        for factor in (0.01, 0.1, 1.0, 10.0):
            r = measure(n, factor, args.values, rng)
            rows.append(r)
            print_row(SCALING_COLUMNS, r)
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
