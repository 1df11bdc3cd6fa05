"""What CSPRNG noise costs per DP-SGD step: privacy.noise vs torch's seedable generator.

One DP-SGD step noises every trainable parameter once. This times drawing that many N(0, s^2)
float32 values with :func:`privacy.noise.gaussian_like` (AES-256-CTR keystream, Box-Muller)
and with ``torch.normal`` on a Mersenne-Twister generator (what Opacus does without its secure
mode), for the trainable sizes of benchmarks/dp_step.py's two models; median of 5 after one
warm-up, one torch thread.

    .venv/bin/python benchmarks/noise.py
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privacy.noise import gaussian_like  # noqa: E402

SIZES = {"tiny + MoE-LoRA": 41_472, "SmolLM2-135M + MoE-LoRA": 6_289_920}
"""Trainable parameters of the two models (benchmarks/results/dp_step.json)."""


def _median_seconds(draw, repeats: int = 5) -> float:
    draw()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        draw()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for model, size in SIZES.items():
        reference = torch.zeros(size, dtype=torch.float32)
        secure = _median_seconds(lambda r=reference: gaussian_like(r, 1.0))
        seeded = _median_seconds(lambda s=size: torch.normal(0.0, 1.0, (s,), generator=generator))
        rows.append({"model": model, "values": size, "csprng_s": secure, "torch_mt_s": seeded})
        print(f"{model}: {size:,} values, CSPRNG {secure * 1e3:.1f} ms, "
              f"torch MT {seeded * 1e3:.1f} ms")  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "noise.json"
    machine = {"platform": platform.platform(), "processor": platform.machine(), "threads": 1}
    report = {"benchmark": "noise", "machine": machine, "results": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
