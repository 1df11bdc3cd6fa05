"""Counts behind docs/data.md: the parsed Shakespeare corpus and example partitions.

Run: .venv/bin/python benchmarks/data_stats.py [--institutions 4 8] [--seed 0]
"""

from __future__ import annotations

import argparse
from collections import Counter

from clients.data.shakespeare import GENRES
from clients.data.shakespeare import SPLITS
from clients.data.shakespeare import load_corpus
from clients.data.shakespeare import partition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    corpus = load_corpus()
    plays, roles, lines, chars = Counter(), Counter(), Counter(), Counter()
    for play in corpus:
        plays[play.genre] += 1
        roles[play.genre] += len(play.roles)
        for spoken in play.roles.values():
            lines[play.genre] += len(spoken)
            chars[play.genre] += sum(len(line) + 1 for line in spoken)
    print("| genre | plays | roles | lines | characters |")
    print("|---|---:|---:|---:|---:|")
    for genre in (*GENRES, None):
        pick = (lambda c, g=genre: c[g]) if genre else (lambda c: sum(c.values()))
        name = genre or "**total**"
        print(f"| {name} | {pick(plays)} | {pick(roles)} | {pick(lines):,} | {pick(chars):,} |")

    for n in args.institutions:
        insts = partition(corpus, n, seed=args.seed)
        print(f"\npartition(corpus, {n}, seed={args.seed}), split (0.8, 0.1, 0.1):\n")
        print("| institution | roles | train lines | validation lines | test lines | chars |")
        print("|---|---:|---:|---:|---:|---:|")
        for inst in insts:
            sizes = [len(inst.lines(s)) for s in SPLITS]
            n_chars = sum(len(line) + 1 for s in SPLITS for line in inst.lines(s))
            print(
                f"| {inst.name} | {len(inst.roles)} | {sizes[0]:,} | {sizes[1]:,} | "
                f"{sizes[2]:,} | {n_chars:,} |"
            )


if __name__ == "__main__":
    main()
