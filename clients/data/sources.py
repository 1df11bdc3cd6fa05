"""An institution's token blocks per split, from the configured data source."""

from __future__ import annotations

from typing import Any

import torch

from clients.contract.config import FederationConfig
from clients.data.shakespeare import institution_datasets, load_corpus, partition


def institution_data(
    config: FederationConfig, name: str, tokenizer: Any
) -> dict[str, torch.Tensor]:
    """Institution ``name``'s token blocks per split ("train", "validation", "test").

    Part i of the Shakespeare partition for the i-th institution of ``[[institutions]]``.
    """
    names = config.institution_names
    if name not in names:
        raise KeyError(f"no institution {name!r} in the config; known: {names}")
    if config.data.source != "shakespeare":
        raise ValueError(f"data.source {config.data.source!r} is not supported")
    data = config.data
    parts = partition(
        load_corpus(),
        n_institutions=len(names),
        seed=data.seed,
        split=data.split,
        max_chars_per_institution=data.max_chars_per_institution,
    )
    part = parts[names.index(name)]
    caps = data.max_blocks.as_dict() or None
    return institution_datasets([part], tokenizer, data.block_len, caps)[part.name]
