"""An institution's examples per split, from the configured data source: one row per record."""

from __future__ import annotations

from typing import Any

import torch

from clients.contract.config import SPLIT_NAMES
from clients.contract.config import FederationConfig
from clients.contract.config import InstitutionData
from clients.data.files import DataFileError
from clients.data.files import read_records
from clients.data.records import encode_records
from clients.data.records import seeded_split
from clients.data.shakespeare import institution_datasets
from clients.data.shakespeare import load_corpus
from clients.data.shakespeare import partition


def institution_data(
    config: FederationConfig, name: str, tokenizer: Any
) -> dict[str, torch.Tensor]:
    """Institution ``name``'s examples per split ("train", "validation", "test"): LongTensors
    [records, block_len], one row per record (truncated, padded; see ``clients.data.records``).

    ``[data] source = "shakespeare"``: part i of the Shakespeare partition for the i-th
    institution of ``[[institutions]]``, one speech per record. ``"files"``: the institution's
    own files (``[institutions.data]``).
    """
    names = config.institution_names
    if name not in names:
        raise KeyError(f"no institution {name!r} in the config; known: {names}")
    data = config.data
    caps = data.max_blocks.as_dict()
    if data.source == "files":
        own = config.institution(name).data
        if own is None:
            raise ValueError(f"institution {name!r} names no data files")
        return {
            split: _encoded(records, tokenizer, data.block_len, caps.get(split), where)
            for split, (records, where) in _split_records(own, data.split, data.seed).items()
        }
    parts = partition(
        load_corpus(),
        n_institutions=len(names),
        seed=data.seed,
        split=data.split,
        max_chars_per_institution=data.max_chars_per_institution,
    )
    part = parts[names.index(name)]
    return institution_datasets([part], tokenizer, data.block_len, caps or None)[part.name]


def _split_records(
    own: InstitutionData, fractions: tuple[float, float, float], seed: int
) -> dict[str, tuple[list[str], str]]:
    """Split -> (its records, the file they come from)."""
    files = own.files()
    if "all" in files:
        path = files["all"]
        records = read_records(path, own.format_of(path) or "", own.text_field)
        parts = seeded_split(records, fractions, seed)
        return {split: (part, path) for split, part in zip(SPLIT_NAMES, parts, strict=True)}
    return {
        split: (read_records(path, own.format_of(path) or "", own.text_field), path)
        for split, path in files.items()
    }


def _encoded(
    records: list[str], tokenizer: Any, block_len: int, cap: int | None, path: str
) -> torch.Tensor:
    try:
        return encode_records(records, tokenizer, block_len, cap)
    except ValueError as exc:
        raise DataFileError(path, f"{exc} (the split has {len(records)} records)") from None
