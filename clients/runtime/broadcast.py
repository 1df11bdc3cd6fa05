"""Reading what the coordinator broadcast: decrypted adapters and the routing sum.

Pure helpers for :mod:`clients.runtime.rounds` (no I/O): a CKKS relay decrypts to plain arrays,
and these turn the arrays back into the named adapter tensors and the routing-statistics sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np
import torch

from clients.contract.layout import CHANNEL_BOUND
from clients.contract.layout import ROUTING
from clients.contract.layout import SubmissionLayout


def adapters_from_arrays(
    template: Mapping[str, torch.Tensor], arrays: Sequence[np.ndarray]
) -> dict[str, torch.Tensor]:
    """Decrypted global state (one array per adapter tensor, state order) as named tensors."""
    if len(arrays) != len(template):
        raise ValueError(
            f"the encrypted global state holds {len(arrays)} arrays, the model has "
            f"{len(template)} adapter tensors"
        )
    out: dict[str, torch.Tensor] = {}
    for (name, current), array in zip(template.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(
                f"encrypted global state: {name} has shape {tuple(array.shape)}, the model's "
                f"is {tuple(current.shape)}"
            )
        out[name] = torch.from_numpy(np.ascontiguousarray(array)).to(current.dtype)
    return out


def routing_from_channel(layout: SubmissionLayout, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The routing sum from a decrypted CKKS relay (``layout.pack`` scaling).

    The relay is a window of the channel's sum, ``((k,), (routing,))`` (see
    :meth:`secagg.ckks.EncryptedBatch.window`), or the whole channel as one array.
    """
    routing = layout[ROUTING]
    if len(arrays) == 2 and arrays[1].size == routing.length:
        return np.ravel(arrays[1]) / CHANNEL_BOUND * routing.bound
    values = np.concatenate([np.ravel(a) for a in arrays])
    channel = routing.channel
    if values.size != layout.length(channel):
        raise ValueError(
            f"decrypted routing has {values.size} values; expected a window of the "
            f"{routing.length} routing values or the {layout.length(channel)} of the "
            f"{channel!r} channel"
        )
    offset = 0
    for seg in layout.segments:
        if seg is routing:
            break
        if seg.channel == channel:
            offset += seg.length
    return values[offset : offset + routing.length] / CHANNEL_BOUND * routing.bound
