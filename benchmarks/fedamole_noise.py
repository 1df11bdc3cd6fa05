"""FedAMoLE's selection release: noised scores versus a noised data embedding, at the same ε.

For a setting of benchmarks/strategies.py, states both L2 sensitivities
(:meth:`~clients.strategies.fedamole.FedAMoLEConfig.score_sensitivity`, ``embedding_sensitivity``)
and measures, over many CSPRNG draws (:mod:`privacy.noise`), the noise std on each score when the
institution releases the scores themselves and when it releases its embedding and the
coordinator scores it against keys at the clip (the worst case). Both use the same noise
multiplier, hence the same ε. The signal is bounded by key_clip * embedding_clip / sqrt(rank).

    python benchmarks/fedamole_noise.py                 # the CPU setting (byte-level base)
    python benchmarks/fedamole_noise.py --draws 20000
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from corpora import write_institutions  # noqa: E402
from pretrain_base import ensure_base  # noqa: E402
from strategies import CACHE  # noqa: E402
from strategies import HEADLINE_EPSILON  # noqa: E402
from strategies import SETTINGS  # noqa: E402
from strategies import federation  # noqa: E402

from clients.strategies.fedamole import FEDAMOLE_ADAPTERS  # noqa: E402
from clients.strategies.fedamole import amole_modules  # noqa: E402
from clients.strategies.fedamole import fedamole_config  # noqa: E402
from privacy.noise import gaussian_array  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--draws", type=int, default=5000)
    args = parser.parse_args()
    files = write_institutions(CACHE / "institutions")
    config = federation(args.setting, 0, HEADLINE_EPSILON, files, ensure_base(), "fedamole")
    fed = fedamole_config(config)
    model, _ = FEDAMOLE_ADAPTERS.build(config)
    modules = len(amole_modules(FEDAMOLE_ADAPTERS.state(model)))
    experts, rank, p = fed.adapter.num_experts, fed.adapter.rank, fed.params
    sigma = p.score_noise_multiplier
    as_scores = sigma * fed.score_sensitivity(modules)
    embedding_std = sigma * fed.embedding_sensitivity(modules)
    keys = np.full((experts, rank), p.key_clip / math.sqrt(rank))  # every key at the clip
    noise = gaussian_array((args.draws, modules, rank), embedding_std)
    scored = np.einsum("er,dmr->dme", keys, noise) / math.sqrt(rank)
    measured = float(scored.std(axis=0, ddof=1).mean())
    signal = p.key_clip * p.embedding_clip / math.sqrt(rank)
    print(f"setting {args.setting}: M={modules} modules, E={experts} experts, r={rank}, "
          f"n={p.affinity_blocks} blocks, noise multiplier {sigma:g}")  # fmt: skip
    print(f"score release:     L2 sensitivity {fed.score_sensitivity(modules):.4f}, "
          f"noise std per score {as_scores:.4f} "
          f"({as_scores / signal:.2f} x the largest score)")  # fmt: skip
    print(f"embedding release: L2 sensitivity {fed.embedding_sensitivity(modules):.4f}, "
          f"noise std per score {measured:.4f} measured over {args.draws} draws "
          f"({measured / signal:.2f} x the largest score)")  # fmt: skip
    print(f"ratio {as_scores / measured:.3f}, sqrt(E) = {math.sqrt(experts):.3f}")


if __name__ == "__main__":
    main()
