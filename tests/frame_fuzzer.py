"""A seeded mutator of wire frames: what a hostile peer can put on the socket.

:func:`mutated_frames` turns a corpus of valid encoded messages into frames of the kinds that
have broken decoders before: nesting bombs (alone and inside a valid-looking message), huge
declared lengths with a short body, valid messages with a field of the wrong type or out of
range, unknown tags and extra fields, truncations, bit flips and random bytes. Seeded, so a
failure names a reproducible frame.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import msgspec

# msgpack headers that declare a length of 2^32 - 1 (array, map, bin, str, ext) or 2^16 - 1
_HUGE_HEADERS = [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                 b"\xdb\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01", b"\xdc\xff\xff",
                 b"\xde\xff\xff", b"\xc5\xff\xff", b"\xda\xff\xff"]  # fmt: skip


def nesting_bomb(rng: random.Random) -> bytes:
    """Hundreds to thousands of nested maps or arrays (the 3 KB frame of issue 12)."""
    depth = rng.choice([500, 1000, 3000, 20_000])
    opener = rng.choice([b"\x81\xa1a", b"\x91", b"\x81\x00"])
    return opener * depth + b"\xc0"


def _wrong_value(rng: random.Random) -> object:
    """A value of a random msgpack type, often at the edge of its range."""
    return rng.choice([
        None, True, -1, -(1 << 63), (1 << 64) - 1, 1 << 31, 0.5, float("nan"), float("inf"),
        "", "x" * rng.randrange(1, 5000), b"", bytes(rng.randrange(1, 5000)), [], [None] * 3,
        {}, {"type": "Hello"}, [[[[]]]], {b"k": 1}, msgspec.msgpack.Ext(1, b"\x00"),
    ])  # fmt: skip


def _mutate_object(value: object, rng: random.Random) -> object:
    """``value`` (decoded msgpack) with one field, item or tag replaced, added or removed."""
    if isinstance(value, dict) and value:
        out = dict(value)
        key = rng.choice(list(out))
        action = rng.randrange(5)
        if action == 0:
            out[key] = _wrong_value(rng)
        elif action == 1:
            del out[key]
        elif action == 2:
            out[rng.choice(["extra", "type", key])] = _wrong_value(rng)
        elif action == 3:
            out["type"] = rng.choice(["Nope", "Hello", "RoundStart", "MaskedInput", "", 7])
        else:
            out[key] = _mutate_object(out[key], rng)
        return out
    if isinstance(value, list) and value:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = _mutate_object(out[i], rng) if rng.random() < 0.5 else _wrong_value(rng)
        return out
    return _wrong_value(rng)


def mutate(valid: bytes, rng: random.Random) -> bytes:
    """One hostile frame derived from the valid frame ``valid``."""
    kind = rng.randrange(9)
    if kind == 0:
        return nesting_bomb(rng)
    if kind == 1:  # a bomb inside a valid-looking message
        return b"\x82\xa4type\xa5Hello\xa5extra" + nesting_bomb(rng)
    if kind == 2:
        return rng.choice(_HUGE_HEADERS) + bytes(rng.randrange(0, 64))
    if kind == 3:  # a valid message whose one field claims a huge length
        cut = rng.randrange(1, len(valid))
        return valid[:cut] + rng.choice(_HUGE_HEADERS) + valid[cut:]
    if kind == 4:
        return valid[: rng.randrange(len(valid))]
    if kind == 5:
        flipped = bytearray(valid)
        for _ in range(rng.randrange(1, 8)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if kind == 6:
        return rng.randbytes(rng.randrange(0, 2048))
    if kind == 7:  # a number where the decoder expects a Struct, or a bare scalar
        return msgspec.msgpack.encode(_wrong_value(rng)) + struct.pack("<I", rng.getrandbits(32))
    try:
        return msgspec.msgpack.encode(_mutate_object(msgspec.msgpack.decode(valid), rng))
    except (OverflowError, ValueError, TypeError):
        return valid[::-1]


def mutated_frames(corpus: list[bytes], count: int, seed: int) -> Iterator[bytes]:
    """``count`` hostile frames, each a mutation of a frame drawn from ``corpus``."""
    rng = random.Random(seed)
    for _ in range(count):
        yield mutate(rng.choice(corpus), rng)
