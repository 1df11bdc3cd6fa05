"""DP-SGD step cost vs a non-private step: time and peak memory, same batch, same model.

Models: the tiny dense Llama and SmolLM2-135M-Instruct, each with MoE-LoRA adapters
(clients.models.moe_lora defaults: 4 experts, top-2, rank 8 on q/v/up/down). Modes: "nondp" (plain
Adam step), "hooks" (Opacus per-sample gradients, flat clipping, noise) and "ghost" (Opacus
ghost clipping). One step = forward + backward (+ clip + noise) + Adam update of the trainer's
per-block loss (clients.training.trainer.per_sample_loss: next-token CE + 0.01 x load-balance loss),
through privacy.make_private with q = 1 so every step sees the same batch.

Each (model, mode) runs in a fresh subprocess. Memory is what the steps need beyond the loaded
model: on CUDA torch.cuda.max_memory_allocated minus the allocation after setup; on CPU the
growth of the process' peak RSS (resource.getrusage ru_maxrss) from after setup to after the
warm-up and measured steps.

    .venv/bin/python benchmarks/dp_step.py [--models tiny smollm2] [--batch 4] [--seq 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("nondp", "hooks", "ghost")


def _child(model_name: str, mode: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data import TensorDataset

    from clients.models.loaders import load_smollm2
    from clients.models.loaders import tiny_dense_model
    from clients.models.moe_lora import MoELoRAConfig
    from clients.models.moe_lora import attach
    from clients.training.trainer import per_sample_loss
    from clients.training.trainer import select_device
    from privacy import DPConfig
    from privacy import make_private

    torch.set_num_threads(threads)
    device = select_device()
    if model_name == "smollm2":
        model = load_smollm2()[0]
        vocab = model.config.vocab_size
    else:
        vocab = 256
        model = tiny_dense_model(vocab_size=vocab)
    model = attach(model, MoELoRAConfig()).to(device)
    model.train()
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    dp = None
    if mode != "nondp":
        dp = DPConfig(8.0, 1e-5, 1.0, noise_multiplier=1.0, grad_sample_mode=mode)
    loader = DataLoader(TensorDataset(ids.cpu()), batch_size=batch)
    training = make_private(model, torch.optim.Adam(params, lr=1e-4), loader, dp, seed=0)

    def step() -> None:
        training.step(per_sample_loss(model, ids))

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup_bytes = torch.cuda.memory_allocated() if cuda else 0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up (allocations, lazy init): timed out, but counted in the memory peak
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    training.close()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - setup_bytes
    else:
        peak = (rss_after - rss_before) * 1024
    return {
        "model": model_name,
        "mode": mode,
        "batch": [batch, seq],
        "trainable_parameters": sum(p.numel() for p in params),
        "device": str(device),
        "step_seconds_median": statistics.median(times),
        "step_seconds": times,
        "peak_memory_bytes": peak,
        "rss_after_setup_bytes": rss_before * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/dp_step.json")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = _child(*args.child, args.batch, args.seq, args.steps, args.threads)
        print(json.dumps(result))
        return

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = []
    for model in args.models:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", model, mode]
            cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(
                f"{model:8s} {mode:6s} step {r['step_seconds_median'] * 1e3:9.1f} ms  "
                f"peak {r['peak_memory_bytes'] / 2**20:8.1f} MiB",
                flush=True,
            )
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for model in args.models:
        base = next((r for r in results if r["model"] == model and r["mode"] == "nondp"), None)
        if base is None:
            continue
        for r in results:
            if r["model"] == model and r["mode"] != "nondp":
                ratios.setdefault(model, {})[r["mode"]] = {
                    "time": r["step_seconds_median"] / base["step_seconds_median"],
                    "memory": r["peak_memory_bytes"] / max(base["peak_memory_bytes"], 1),
                }
    report = {
        "benchmark": "dp_step",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "threads": args.threads,
        "memory_metric": (
            "bytes needed by the steps beyond the loaded model: CUDA max_memory_allocated - "
            "allocated after setup; CPU growth of ru_maxrss from setup through all steps"
        ),
        "steps_measured": args.steps,
        "results": results,
        "ratio_vs_nondp": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
