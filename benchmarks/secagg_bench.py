"""Secure-aggregation benchmark: plaintext sum, sealmoe masking, sealmoe CKKS, Flower's SecAgg+.

One run, side by side, over a grid of clients n, vector length d and dropout rate. Every method
sums the same float32 vectors (uniform in [-1, 1)); a client that drops is chosen once per
configuration and vanishes at the same point everywhere: for the masking protocols after it
shared its keys and before it sent its masked input (the costly case for the server, which must
then rebuild that client's pairwise masks), for plaintext and CKKS it simply never sends.

Columns (docs/benchmark-secagg.md has the full definitions): mean wall time per surviving client
spent in its own protocol code (encoding included), server wall time, client + server (the
round's compute on its critical path when clients run in parallel), bytes each surviving client
sends (encoded messages), and ratios to the plaintext sum and to Flower.

    python benchmarks/secagg_bench.py            # full grid (several minutes)
    python benchmarks/secagg_bench.py --quick    # n=10, d=1e5, both dropout rates (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from rich.console import Console
from rich.table import Table

import secagg
from secagg.ckks import CkksAggregator
from secagg.ckks import CkksKeyHolder
from secagg.ckks import CkksParams
from secagg.ckks import EncryptedBatch
from secagg.graph import default_neighbours

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flower_secaggplus import run_flower_secaggplus

CLIP = 1.0
BITS = 16
MODULUS_BITS = 32
DROP_STAGE = "masked_input"
FULL_GRID = {"n": [10, 50, 100], "d": [100_000, 1_000_000], "dropout": [0.0, 0.1]}
QUICK_GRID = {"n": [10], "d": [100_000], "dropout": [0.0, 0.1]}
# CKKS costs ~1 s of encryption per client per 1e6 values on this class of CPU and its
# ciphertexts are ~10x the plaintext; beyond these sizes it would dominate the run's time.
CKKS_MAX_N = 50
CKKS_MAX_D = 100_000
METHODS = ("plaintext", "sealmoe-mask", "sealmoe-ckks", "flower-secagg+")
# cpu: seconds of CPU each party's code used (robust to other jobs on a shared machine; equal to
# wall time on an idle one for this single-threaded code). wall: elapsed seconds.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
Clock = Callable[[], float]


@dataclass
class Row:
    """One method on one configuration (median over repeats)."""

    method: str
    n: int
    d: int
    dropout: float
    neighbours: int
    threshold: int
    survivors: int
    client_s: float
    server_s: float
    bytes_per_client: float
    max_abs_error: float
    total_compute_s: float
    cpu_s: float
    extra: dict[str, float] = field(default_factory=dict)
    client_over_plain: float = math.nan
    server_over_plain: float = math.nan
    bytes_over_plain: float = math.nan
    speedup_vs_flower: float = math.nan
    bytes_over_flower: float = math.nan

    @property
    def client_plus_server_s(self) -> float:
        return self.client_s + self.server_s


@dataclass
class Measure:
    """What one run of one method cost, reduced to the reported quantities."""

    client_s: float
    server_s: float
    bytes_per_client: float
    total_compute_s: float
    result: np.ndarray
    included: list[int]
    extra: dict[str, float] = field(default_factory=dict)
    cpu_s: float = math.nan


def rule_k_t(n: int) -> tuple[int, int]:
    """The neighbour count and threshold used for both protocols at ``n`` clients.

    k = secagg.graph.default_neighbours(n) = min(2 ceil(log2 n), n - 1); each client's secrets
    have k + 1 share holders (its k neighbours and itself) in both engines, and any
    t = ceil(0.6 (k + 1)) of them reconstruct. Flower's num_shares is that k + 1.
    """
    k = default_neighbours(n)
    return k, math.ceil(0.6 * (k + 1))


def _survivor_mean(per_client: dict[int, float], included: list[int]) -> float:
    return float(np.mean([per_client[i] for i in included]))


def run_plaintext(inputs: list[np.ndarray], dropped: set[int], clock: Clock) -> Measure:
    """Each surviving client serialises its float32 vector; the server sums the received bytes."""
    client, blobs = {}, []
    for i, x in enumerate(inputs):
        if i in dropped:
            continue
        start = clock()
        blob = np.ascontiguousarray(x, dtype=np.float32).tobytes()
        client[i] = clock() - start
        blobs.append(blob)
    start = clock()
    total = np.zeros(inputs[0].size, dtype=np.float32)
    for blob in blobs:
        total += np.frombuffer(blob, dtype=np.float32)
    server = clock() - start
    return _measured(client, server, [len(b) for b in blobs], total.astype(np.float64))


def _measured(
    client: dict[int, float],
    server: float,
    sent: list[int],
    result: np.ndarray,
    extra: dict[str, float] | None = None,
) -> Measure:
    """A baseline's measure: ``client`` seconds per surviving client, the server's seconds,
    the bytes each client sent and the sum it computed."""
    included = sorted(client)
    return Measure(
        client_s=_survivor_mean(client, included),
        server_s=server,
        bytes_per_client=float(np.mean(sent)),
        total_compute_s=sum(client.values()) + server,
        result=result,
        included=included,
        extra=extra or {},
    )


def _from_protocol(res: Any) -> Measure:
    included = list(res.included)
    return Measure(
        client_s=_survivor_mean(res.client_seconds, included),
        server_s=float(res.server_seconds),
        bytes_per_client=float(np.mean([res.bytes_sent[i] for i in included])),
        total_compute_s=float(sum(res.client_seconds.values()) + res.server_seconds),
        result=np.asarray(res.sum, dtype=np.float64),
        included=included,
    )


def _quantised_round(dropped: set[int], seed: int, clock: Clock) -> dict[str, Any]:
    """The settings both masked protocols run under: dropouts, quantisation, seed, clock."""
    return {
        "dropouts": dict.fromkeys(dropped, DROP_STAGE),
        "clip": CLIP,
        "bits": BITS,
        "modulus_bits": MODULUS_BITS,
        "seed": seed,
        "clock": clock,
    }


def run_sealmoe_mask(
    inputs: list[np.ndarray], dropped: set[int], k: int, t: int, seed: int, clock: Clock
) -> Measure:
    res = secagg.run_local(
        inputs, threshold=t, neighbours=k, **_quantised_round(dropped, seed, clock)
    )
    return _from_protocol(res)


def run_flower(
    inputs: list[np.ndarray], dropped: set[int], k: int, t: int, seed: int, clock: Clock
) -> Measure:
    res = run_flower_secaggplus(
        inputs, num_shares=k + 1, threshold=t, **_quantised_round(dropped, seed, clock)
    )
    return _from_protocol(res)


def run_ckks(
    inputs: list[np.ndarray], dropped: set[int], holder: CkksKeyHolder, clock: Clock
) -> Measure:
    """Shared-key CKKS: clients encrypt and msgpack-encode; the coordinator decodes and adds.

    A client's time is its encryption plus decrypting the aggregate (every institution holds
    the key and decrypts the new sum itself); the server's is decoding, adding and encoding the
    encrypted sum.
    """
    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.Decoder(EncryptedBatch).decode
    client, wires = {}, []
    for i, x in enumerate(inputs):
        if i in dropped:
            continue
        start = clock()
        wire = encode(holder.encrypt([x]))
        client[i] = clock() - start
        wires.append(wire)
    start = clock()
    agg = CkksAggregator(holder.public_context())
    for wire in wires:
        agg.add(decode(wire))
    summed = encode(agg.sum())
    server = clock() - start
    start = clock()
    (total,) = holder.decrypt(decode(summed))
    decrypt = clock() - start
    for i in client:
        client[i] += decrypt
    extra = {"decrypt_s": decrypt, "aggregate_bytes": float(len(summed))}
    return _measured(client, server, [len(w) for w in wires], total, extra)


def _check(method: str, m: Measure, inputs: list[np.ndarray], dropped: set[int]) -> float:
    """Sanity: the right clients are in, and the sum is right within its method's error."""
    expect = [i for i in range(len(inputs)) if i not in dropped]
    assert m.included == expect, f"{method}: included {m.included}, expected {expect}"
    exact = np.sum([inputs[i].astype(np.float64) for i in expect], axis=0)
    err = float(np.max(np.abs(m.result - exact)))
    if method == "sealmoe-ckks":
        bound = len(expect) * 1e-8 + 1e-9
    elif method == "plaintext":
        bound = len(expect) * 1e-6  # float32 accumulation of values in [-1, 1)
    else:  # stochastic rounding: under two quantization steps per client, whatever the codec
        bound = len(expect) * 2 * (2 * CLIP) / ((1 << BITS) - 1)
    assert err <= bound, f"{method}: max abs error {err:.3g} above {bound:.3g}: wrong sum"
    return err


def _median_measure(runs: list[Measure]) -> Measure:
    if len(runs) == 1:
        return runs[0]
    med = statistics.median
    return Measure(
        client_s=med(r.client_s for r in runs),
        server_s=med(r.server_s for r in runs),
        bytes_per_client=med(r.bytes_per_client for r in runs),
        total_compute_s=med(r.total_compute_s for r in runs),
        cpu_s=med(r.cpu_s for r in runs),
        result=runs[0].result,
        included=runs[0].included,
        extra={k: med(r.extra[k] for r in runs) for k in runs[0].extra},
    )


def _warm_up(holder: CkksKeyHolder, clock: Clock) -> None:
    """One tiny round of each method so imports and first-call set-up stay out of the timings."""
    xs = [np.full(16, 0.25, dtype=np.float32) for _ in range(5)]
    run_plaintext(xs, set(), clock)
    run_sealmoe_mask(xs, set(), 4, 3, 0, clock)
    run_flower(xs, set(), 4, 3, 0, clock)
    run_ckks(xs, set(), holder, clock)


def run_grid(
    grid: dict[str, list], repeats: int, seed: int, clock: Clock, log: Callable[[str], None]
) -> tuple[list[Row], list[str], float]:
    """Measure every method on every configuration; return rows, skip notes, CKKS keygen time."""
    start = time.perf_counter()
    holder = CkksKeyHolder.generate(CkksParams())
    keygen = time.perf_counter() - start
    _warm_up(holder, clock)
    rows: list[Row] = []
    skipped: list[str] = []
    rng = np.random.default_rng(seed)
    for n in grid["n"]:
        k, t = rule_k_t(n)
        for d in grid["d"]:
            inputs = [rng.uniform(-1.0, 1.0, d).astype(np.float32) for _ in range(n)]
            for rate in grid["dropout"]:
                dropped = {int(i) for i in rng.choice(n, round(rate * n), replace=False)}
                for method in METHODS:
                    if method == "sealmoe-ckks" and (n > CKKS_MAX_N or d > CKKS_MAX_D):
                        skipped.append(
                            f"sealmoe-ckks at n={n}, d={d:.0e}: only run for n <= {CKKS_MAX_N} "
                            f"and d <= {CKKS_MAX_D:.0e} (encryption time and ~10x ciphertext "
                            "expansion make larger sizes dominate the run)"
                        )
                        continue
                    runs = []
                    # The plaintext sum takes about a millisecond: a median of several damps noise.
                    for rep in range(max(repeats, 5) if method == "plaintext" else repeats):
                        round_seed = seed * 1000 + rep
                        cpu = time.process_time()
                        if method == "plaintext":
                            m = run_plaintext(inputs, dropped, clock)
                        elif method == "sealmoe-mask":
                            m = run_sealmoe_mask(inputs, dropped, k, t, round_seed, clock)
                        elif method == "flower-secagg+":
                            m = run_flower(inputs, dropped, k, t, round_seed, clock)
                        else:
                            m = run_ckks(inputs, dropped, holder, clock)
                        m.cpu_s = time.process_time() - cpu
                        runs.append(m)
                    m = _median_measure(runs)
                    err = _check(method, m, inputs, dropped)
                    row = Row(
                        method=method, n=n, d=d, dropout=rate, neighbours=k, threshold=t,
                        survivors=len(m.included), client_s=m.client_s, server_s=m.server_s,
                        bytes_per_client=m.bytes_per_client, max_abs_error=err,
                        total_compute_s=m.total_compute_s, cpu_s=m.cpu_s, extra=m.extra,
                    )  # fmt: skip
                    rows.append(row)
                    log(
                        f"n={n:<4} d={d:<8} drop={rate:<4} {method:<15} "
                        f"client {row.client_s * 1e3:9.1f} ms  server {row.server_s * 1e3:9.1f} ms"
                        f"  bytes/client {row.bytes_per_client:12.0f}"
                    )
            del inputs
    _add_ratios(rows)
    return rows, skipped, keygen


def _add_ratios(rows: list[Row]) -> None:
    by_config: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by_config.setdefault((r.n, r.d, r.dropout), {})[r.method] = r
    for group in by_config.values():
        plain, flower = group["plaintext"], group["flower-secagg+"]
        for r in group.values():
            r.client_over_plain = r.client_s / plain.client_s
            r.server_over_plain = r.server_s / plain.server_s
            r.bytes_over_plain = r.bytes_per_client / plain.bytes_per_client
            r.speedup_vs_flower = flower.client_plus_server_s / r.client_plus_server_s
            r.bytes_over_flower = r.bytes_per_client / flower.bytes_per_client


def evaluate_targets(rows: list[Row]) -> dict[str, Any]:
    """The issue's three targets for sealmoe masking, checked on every configuration present."""
    mask = [r for r in rows if r.method == "sealmoe-mask"]
    headline = [r for r in mask if (r.n, r.d, r.dropout) == (100, 1_000_000, 0.1)]
    speed: dict[str, Any] = {"target": ">= 5x lower client+server time than Flower's SecAgg+"}
    if headline:
        speed.update(
            config="n=100, d=1e6, 10% dropout",
            speedup=headline[0].speedup_vs_flower,
            met=headline[0].speedup_vs_flower >= 5.0,
        )
    else:
        speed.update(config="n=100, d=1e6, 10% dropout (not in this grid)", met=None)
    speed["all_configs"] = {_label(r): r.speedup_vs_flower for r in mask}
    server_rows = [r for r in mask if r.dropout == 0.0]
    server = {
        "target": "server time at 0% dropout <= 3x the plaintext sum",
        "ratios": {_label(r): r.server_over_plain for r in server_rows},
        "met": all(r.server_over_plain <= 3.0 for r in server_rows),
    }
    size = {
        "target": "bytes per client <= 1.05x float32 plaintext",
        "ratios": {_label(r): r.bytes_over_plain for r in mask},
        "met": all(r.bytes_over_plain <= 1.05 for r in mask),
    }
    return {"speed_vs_flower": speed, "server_vs_plaintext": server, "bytes_vs_plaintext": size}


def _label(r: Row) -> str:
    return f"n={r.n} d={r.d:.0e} drop={r.dropout:.0%}"


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **{pkg: version(pkg) for pkg in ("flwr", "tenseal", "cryptography", "msgspec")},
    }


def _cells(r: Row) -> tuple[str, ...]:
    """One row's cells, formatted alike for the console and the Markdown table."""
    return (
        str(r.n), f"{r.d:.0e}", f"{r.dropout:.0%}", r.method,
        f"{r.client_s * 1e3:.1f}", f"{r.server_s * 1e3:.1f}",
        f"{r.client_plus_server_s * 1e3:.1f}", f"{r.bytes_per_client:,.0f}",
        f"{r.client_over_plain:.1f}", f"{r.server_over_plain:.1f}",
        f"{r.bytes_over_plain:.3f}", f"{r.speedup_vs_flower:.2f}", f"{r.cpu_s:.2f}",
    )  # fmt: skip


def print_table(rows: list[Row], console: Console) -> None:
    table = Table(title="Secure aggregation: per round, mean over surviving clients")
    for col in (
        "n", "d", "drop", "method", "client ms", "server ms", "client+server ms",
        "bytes/client", "client x plain", "server x plain", "bytes x plain", "speed-up vs Flower",
        "round CPU s",
    ):  # fmt: skip
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(*_cells(r))
    console.print(table)


def markdown_table(rows: list[Row]) -> str:
    """The table as GitHub Markdown, for docs/benchmark-secagg.md and the README."""
    head = (
        "| n | d | drop | method | client ms | server ms | client+server ms | bytes/client "
        "| client x plain | server x plain | bytes x plain | speed-up vs Flower | round CPU s |"
    )
    lines = [head, "|" + "---:|" * 3 + ":---|" + "---:|" * 9]
    for r in rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib  # the bench extra; imported late to pick the headless backend first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r.n, r.d, r.dropout) for r in rows})
    labels = [f"n={n}\nd={d:.0e}\n{p:.0%}" for n, d, p in configs]
    panels = (
        ("client + server time (s)", lambda r: r.client_plus_server_s, True),
        ("server time (s)", lambda r: r.server_s, True),
        ("bytes sent per client / float32 plaintext", lambda r: r.bytes_over_plain, True),
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.3 * len(configs)), 11))
    width = 0.8 / len(METHODS)
    x = np.arange(len(configs))
    for ax, (title, value, log_scale) in zip(axes, panels, strict=True):
        for j, method in enumerate(METHODS):
            got = {(r.n, r.d, r.dropout): value(r) for r in rows if r.method == method}
            ys = [got.get(c, np.nan) for c in configs]
            ax.bar(x + (j - (len(METHODS) - 1) / 2) * width, ys, width, label=method)
        ax.set_title(title)
        ax.set_xticks(x, labels, fontsize=8)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].axhline(1.05, color="k", linestyle="--", linewidth=0.8, label="1.05x target")
    axes[0].legend(fontsize=8, ncol=len(METHODS) + 1)
    axes[-1].legend(fontsize=8, ncol=len(METHODS) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid: n=10, d=1e5")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: results/, or results/quick/ with --quick)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; medians reported")
    parser.add_argument("--seed", type=int, default=0, help="inputs, dropouts and graph seeds")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu", help="what a party's time means"
    )
    args = parser.parse_args(argv)
    if args.out is None:  # a quick run must not overwrite the full grid's published results
        results = Path(__file__).resolve().parent / "results"
        args.out = results / "quick" if args.quick else results
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    console = Console() if sys.stdout.isatty() else Console(width=200)
    grid = QUICK_GRID if args.quick else FULL_GRID
    started = time.perf_counter()
    rows, skipped, keygen = run_grid(
        grid, args.repeats, args.seed, CLOCKS[args.clock], console.print
    )
    targets = evaluate_targets(rows)
    print_table(rows, console)
    for note in dict.fromkeys(skipped):
        console.print(f"[yellow]skipped:[/] {note}")
    for name, target in targets.items():
        console.print(f"target {name}: {target['target']}: met={target['met']}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(["python", "benchmarks/secagg_bench.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "grid": grid,
        "settings": {
            "clip": CLIP,
            "bits": BITS,
            "modulus_bits": MODULUS_BITS,
            "dropout_stage": DROP_STAGE,
            "k_t_rule": (
                "k = min(2*ceil(log2 n), n-1); t = ceil(0.6*(k+1)); Flower num_shares = k+1"
            ),
            "clock": args.clock,
            "repeats": args.repeats,
            "seed": args.seed,
            "ckks_params": asdict(CkksParams()),
            "ckks_keygen_s": keygen,
            "ckks_key_custody": "shared-key model: every institution holds the secret key",
        },
        "rows": [{**asdict(r), "client_plus_server_s": r.client_plus_server_s} for r in rows],
        "skipped": list(dict.fromkeys(skipped)),
        "targets": targets,
        "wall_s": time.perf_counter() - started,
    }
    (args.out / "secagg_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "secagg_bench.md").write_text(markdown_table(rows))
    plot(rows, args.out / "secagg_bench.png")
    console.print(f"wrote secagg_bench.json, .md and .png under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
