"""Records to examples: the record-level unit of privacy.

A record (one speech of the Shakespeare partition, one row of an institution's file) yields at
most one example: its first ``block_len`` token ids, right-padded with
:data:`~clients.contract.records.PAD_ID` (the training code masks the padding out of loss,
accuracy and token counts). Longer records are truncated, never split, so a record's influence
on training is that of one row, and Poisson sampling over rows is sampling over records.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import TypeVar

import torch

from clients.contract.records import PAD_ID

T = TypeVar("T")


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """``text``'s token ids without special tokens, from any HF-style tokenizer."""
    encoded = tokenizer(text, add_special_tokens=False)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return list(ids)


def encode_records(
    records: Iterable[str], tokenizer: Any, block_len: int, max_records: int | None = None
) -> torch.Tensor:
    """One row per record, in order: a LongTensor [N, block_len] (see the module docstring).

    Records with fewer than two tokens give no next-token target and are skipped; at most
    ``max_records`` rows. Raises ValueError when no record gives an example.
    """
    if block_len < 2:
        raise ValueError(f"block_len must be >= 2, got {block_len}")
    if max_records is not None and max_records < 1:
        raise ValueError(f"max_records must be >= 1 or None, got {max_records}")
    rows: list[list[int]] = []
    for text in records:
        ids = token_ids(tokenizer, text)[:block_len]
        if len(ids) < 2:
            continue
        rows.append(ids + [PAD_ID] * (block_len - len(ids)))
        if max_records is not None and len(rows) >= max_records:
            break
    if not rows:
        raise ValueError("no record has two or more tokens: nothing to train or score on")
    return torch.tensor(rows, dtype=torch.long)


def seeded_split(items: Sequence[T], fractions: Sequence[float], seed: int) -> list[list[T]]:
    """``items`` shuffled with ``seed`` and cut by ``fractions`` (each part in file order)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)  # noqa: S311 - reproducible data split, not a secret
    cuts = [round(sum(fractions[: i + 1]) * len(items)) for i in range(len(fractions))]
    cuts[-1] = len(items)
    parts, lo = [], 0
    for hi in cuts:
        parts.append([items[i] for i in sorted(order[lo:hi])])
        lo = hi
    return parts
