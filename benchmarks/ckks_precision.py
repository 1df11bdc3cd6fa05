"""Precision, speed and size of CKKS aggregation (secagg.ckks) for a few parameter sets.

For each parameter set and each number n of summands, n batches of uniform values in [-1, 1]
are encrypted, added by a coordinator-side aggregator one at a time, and the sum decrypted.
Reports the max and RMS absolute error against the float64 sum, encrypt/add/decrypt seconds
per 1e5 values (per batch), and ciphertext bytes per value. Prints a table and writes JSON.

    .venv/bin/python benchmarks/ckks_precision.py [--values 100000] [--ns 2 10 100]
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
from secagg.ckks import CkksKeyHolder
from secagg.ckks import CkksParams

PARAM_SETS = [
    ("default", CkksParams()),
    ("lean", CkksParams(8192, (60, 60), 40)),
    ("16384/40", CkksParams(16384, (60, 40, 40, 60), 40)),
    ("16384/50", CkksParams(16384, (60, 50, 50, 60), 50)),
    ("4096/30", CkksParams(4096, (40, 30, 30), 30)),
]
RESULTS = Path(__file__).parent / "results" / "ckks_precision.json"


PRECISION_COLUMNS = [
    Column("set", "set", 9, align="<"),
    Column("poly_modulus_degree", "N", 5),
    Column("coeff_mod_bit_sizes", "coeff bits", 16, align="<"),
    Column("global_scale_bits", "scale", 5),
    Column("n", "n", 4),
    Column("max_abs_error", "max err", 9, ".2e"),
    Column("rms_abs_error", "rms err", 9, ".2e"),
    Column("encrypt_s_per_1e5", "enc s", 7, ".3f"),
    Column("add_s_per_1e5", "add s", 7, ".3f"),
    Column("decrypt_s_per_1e5", "dec s", 7, ".3f"),
    Column("ciphertext_bytes_per_value", "B/value", 7, ".1f"),
]


def measure(params: CkksParams, n: int, n_values: int, rng: np.random.Generator) -> dict:
    """Encrypt n batches, aggregate them, decrypt the sum and compare with float64."""
    holder = CkksKeyHolder.generate(params)
    agg = CkksAggregator(holder.public_context())
    # Split the values over three tensors of different shapes, as a model update would be.
    shapes = [(n_values // 2,), (n_values // 4, 2), (n_values - n_values // 2 - n_values // 4 * 2,)]
    exact = [np.zeros(s) for s in shapes]
    t_enc = t_add = 0.0
    ct_bytes = 0
    for _ in range(n):
        arrays = [rng.uniform(-1.0, 1.0, s) for s in shapes]
        for acc, a in zip(exact, arrays, strict=True):
            acc += a
        t0 = time.perf_counter()
        batch = holder.encrypt(arrays)
        t1 = time.perf_counter()
        agg.add(batch)
        t2 = time.perf_counter()
        t_enc += t1 - t0
        t_add += t2 - t1
        ct_bytes = sum(len(c) for c in batch.ciphertexts)
    total = agg.sum()
    t0 = time.perf_counter()
    got = holder.decrypt(total)
    t_dec = time.perf_counter() - t0
    err = np.concatenate([(g - e).ravel() for g, e in zip(got, exact, strict=True)])
    per_1e5 = 1e5 / n_values
    return {
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
        "global_scale_bits": params.global_scale_bits,
        "n": n,
        "values_per_batch": n_values,
        "max_abs_error": float(np.max(np.abs(err))),
        "rms_abs_error": float(np.sqrt(np.mean(err**2))),
        "encrypt_s_per_1e5": t_enc / n * per_1e5,
        "add_s_per_1e5": t_add / n * per_1e5,
        "decrypt_s_per_1e5": t_dec * per_1e5,
        "ciphertext_bytes_per_value": ct_bytes / n_values,
        "ciphertexts_per_batch": len(total.ciphertexts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=100_000, help="values per batch")
    parser.add_argument("--ns", type=int, nargs="+", default=[2, 10, 100], help="summands")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rng = np.random.default_rng(20240601)
    rows = []
    print_header(PRECISION_COLUMNS)
    for name, params in PARAM_SETS:
        for n in args.ns:
            r = measure(params, n, args.values, rng)
            r["set"] = name
            rows.append(r)
            print_row(PRECISION_COLUMNS, r)
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
