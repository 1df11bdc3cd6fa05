"""The wire and file form of :attr:`clients.contract.layout.GlobalState.extras`: safetensors bytes.

Extras are a strategy's public aggregates (named float64 arrays, e.g. FedAlign-MoE's score
statistics). The coordinator encodes them into :class:`~clients.contract.messages.RoundStart` and
its round checkpoints; an institution (and a resuming coordinator) decodes them with
:func:`decode_extras`, which refuses anything but finite float64 arrays of the expected names and
shapes with :class:`ExtrasError`. safetensors holds only named arrays: no code, no pickle.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load
from safetensors.numpy import save

from clients.contract.layout import StrategyError

MAX_EXTRAS = 64
"""More named arrays than this in one payload are refused (no strategy needs more)."""


class ExtrasError(StrategyError):
    """An extras payload is malformed or not what the strategy expects (the message says how)."""


def encode_extras(extras: Mapping[str, np.ndarray]) -> bytes:
    """``extras`` as safetensors bytes (float64, C order); empty bytes for no extras."""
    if not extras:
        return b""
    return save({k: np.ascontiguousarray(v, dtype="<f8") for k, v in extras.items()})


def decode_extras(
    data: bytes, expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """The arrays in ``data`` (empty bytes: none), checked.

    Every array must be finite float64; at most :data:`MAX_EXTRAS` of them. With ``expected``,
    a non-empty payload must hold exactly those names with those shapes (a strategy reads them
    all together). Raises :class:`ExtrasError` otherwise.
    """
    if not data:
        return {}
    try:
        arrays = load(bytes(data))
    except (SafetensorError, ValueError, OSError) as exc:
        raise ExtrasError(f"extras are not valid safetensors bytes: {exc}") from None
    if len(arrays) > MAX_EXTRAS:
        raise ExtrasError(f"extras hold {len(arrays)} arrays, at most {MAX_EXTRAS} are accepted")
    for name, array in arrays.items():
        if array.dtype != np.float64:
            raise ExtrasError(f"extra {name!r} has dtype {array.dtype}, expected float64")
        if not np.all(np.isfinite(array)):
            raise ExtrasError(f"extra {name!r} holds NaN or infinite values")
    if expected is not None and arrays:
        if set(arrays) != set(expected):
            raise ExtrasError(
                f"extras are {sorted(arrays)}, this strategy expects {sorted(expected)}"
            )
        for name, shape in expected.items():
            if tuple(arrays[name].shape) != tuple(shape):
                raise ExtrasError(
                    f"extra {name!r} has shape {arrays[name].shape}, expected {tuple(shape)}"
                )
    return {k: arrays[k] for k in sorted(arrays)}
