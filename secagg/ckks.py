"""CKKS aggregation (TenSEAL): institutions encrypt, the coordinator adds ciphertexts blindly.

Key custody is the *shared-key model* (as in NVIDIA FLARE's HE mode): every institution holds
the same CKKS secret key, shared among them out of band; the coordinator holds an evaluation
context with no key material at all, so it can add ciphertexts but can neither decrypt nor
encrypt. This is weaker than pairwise masking: a coordinator that colludes with any one
institution can decrypt every individual update it relayed.

Encryption is symmetric (under the secret key): the institutions hold that key anyway, and
symmetric CKKS encryption adds about ten times less noise than public-key encryption.

Many tensors are packed densely into each ciphertext: the arrays are flattened, concatenated,
and cut into chunks of ``slot_count = poly_modulus_degree / 2`` values (the last chunk padded
with zeros). :class:`EncryptedBatch` carries the ciphertexts (TenSEAL serialized bytes) and the
array shapes, so it travels as msgpack and decrypts to the same list of arrays.

Precision with the defaults (degree 8192, coefficient moduli (60, 40, 40, 60) bits, scale
2^40), measured by ``benchmarks/ckks_precision.py`` on values in [-1, 1]: the decrypted sum of
n batches differs from the float64 sum by at most 1.1e-9 (n = 2), 2.5e-9 (n = 10) and 9.1e-9
(n = 100) per value (RMS 2.7e-10, 6.0e-10, 1.9e-9; 1e5 values per batch).
:data:`DEFAULT_ABS_ERROR_PER_SUMMAND` is the documented bound, with margin:
``n * DEFAULT_ABS_ERROR_PER_SUMMAND`` absolute for values in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi  # registers seal::Modulus so coeff_modulus() can be read

from secagg.errors import ConfigError
from secagg.errors import MalformedMessage
from secagg.errors import ProtocolError

DEFAULT_ABS_ERROR_PER_SUMMAND = 1e-8
"""Documented absolute error per summand of the default parameters, values in [-1, 1]."""
SCALING_ERROR_PER_FACTOR_AND_SUMMAND = 3e-7
SCALING_ERROR_FLOOR = 2e-8
"""With the default parameters, :meth:`CkksEvaluator.scale_and_add` of a sum of n batches of
values in [-1, 1] is off by at most ``n * |factor| * SCALING_ERROR_PER_FACTOR_AND_SUMMAND +
SCALING_ERROR_FLOOR`` per value and round (measured worst case 1.4e-7 * n * |factor| + 1e-8,
``benchmarks/ckks_scaling.py``): the plaintext multiplication, not the sum, dominates."""

# Largest total coefficient-modulus size (bits) with 128-bit classical security for each ring
# degree, from the HomomorphicEncryption.org security standard (as enforced by Microsoft SEAL).
MAX_COEFF_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
_MAX_PRIME_BITS = 60  # SEAL's limit for one prime of the coefficient modulus


@dataclass(frozen=True)
class CkksParams:
    """CKKS context parameters, validated on construction (128-bit security, decodable sums).

    ``coeff_mod_bit_sizes`` lists the prime sizes of the coefficient modulus; the last one is
    SEAL's special (key-switching) prime, the others carry data. Addition needs no levels, so
    two primes such as ``(60, 60)`` suffice and give 2.5 times smaller ciphertexts than the
    default, at the cost of a smaller range (see :attr:`max_abs_value`).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40

    def __post_init__(self) -> None:
        degree = self.poly_modulus_degree
        if not _is_int(degree) or degree not in MAX_COEFF_BITS:
            raise ConfigError(
                f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS)}, got {degree!r}"
            )
        bits = self.coeff_mod_bit_sizes
        if isinstance(bits, (str, bytes)) or not isinstance(bits, Sequence):
            raise ConfigError(f"coeff_mod_bit_sizes must be a sequence of ints, got {bits!r}")
        bits = tuple(bits)
        object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        if len(bits) < 2:
            raise ConfigError(
                f"coeff_mod_bit_sizes needs at least 2 primes (data + special), got {bits}"
            )
        if not all(_is_int(b) and 1 <= b <= _MAX_PRIME_BITS for b in bits):
            raise ConfigError(
                f"coeff_mod_bit_sizes entries must be ints in [1, {_MAX_PRIME_BITS}], got {bits}"
            )
        limit = MAX_COEFF_BITS[degree]
        if sum(bits) > limit:
            raise ConfigError(
                f"coeff_mod_bit_sizes {bits} sum to {sum(bits)} bits, above the 128-bit security "
                f"limit of {limit} bits for poly_modulus_degree={degree}"
            )
        scale = self.global_scale_bits
        if not _is_int(scale) or scale < 1:
            raise ConfigError(f"global_scale_bits must be a positive int, got {scale!r}")
        if self._headroom_bits < 1:
            raise ConfigError(
                f"global_scale_bits={scale} leaves no room for values: the data primes "
                f"{bits[:-1]} give {sum(bits[:-1])} bits; lower global_scale_bits or add "
                f"data primes to coeff_mod_bit_sizes"
            )

    @property
    def slot_count(self) -> int:
        """Values packed into one ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def _headroom_bits(self) -> int:
        # Each data prime is a little below 2^bits (one bit of slack each), the centred
        # representation costs one bit, and one more bit is margin for noise.
        data = self.coeff_mod_bit_sizes[:-1]
        return sum(data) - len(data) - self.global_scale_bits - 2

    @property
    def max_abs_value(self) -> float:
        """Largest magnitude an input value, or any aggregate, may reach and still decrypt.

        A sum that exceeds it wraps around silently, so callers summing n inputs should keep
        every input below ``max_abs_value / n``.
        """
        return float(2.0**self._headroom_bits)

    def _context(self) -> ts.Context:
        try:
            ctx = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=self.poly_modulus_degree,
                coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes),
                encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
            )
        except ValueError as exc:  # SEAL found no suitable primes of these sizes
            raise ConfigError(
                f"coeff_mod_bit_sizes {self.coeff_mod_bit_sizes} are unusable with "
                f"poly_modulus_degree={self.poly_modulus_degree}: {exc}"
            ) from exc
        ctx.global_scale = 2.0**self.global_scale_bits
        return ctx

    @classmethod
    def _of_context(cls, ctx: ts.Context) -> CkksParams:
        """Read (and so re-validate) the parameters of a deserialized context."""
        parms = ctx.seal_context().data.key_context_data().parms()
        if parms.scheme().name != "CKKS":
            raise ConfigError(f"context is for scheme {parms.scheme().name}, not CKKS")
        scale_bits = math.log2(ctx.global_scale) if ctx.global_scale > 0 else 0.0
        if not scale_bits.is_integer():
            raise ConfigError(f"context global scale {ctx.global_scale} is not a power of two")
        return cls(
            poly_modulus_degree=int(parms.poly_modulus_degree()),
            coeff_mod_bit_sizes=tuple(int(m.bit_count()) for m in parms.coeff_modulus()),
            global_scale_bits=int(scale_bits),
        )


class EncryptedBatch(msgspec.Struct, frozen=True):
    """Ciphertexts of a list of arrays (or of a sum of such lists with the same layout).

    ``ciphertexts`` are TenSEAL-serialized CKKS vectors of ``slot_count`` values each;
    ``shapes`` is the layout; ``n_summed`` counts the batches summed into this one (as claimed
    by whoever built it: a coordinator can lie about it, see docs/ckks.md); ``depth`` counts
    the plaintext multiplications the ciphertexts went through (0 for fresh encryptions and
    their sums, 1 after :meth:`CkksEvaluator.scale_and_add`), each of which drops one level.
    """

    ciphertexts: tuple[bytes, ...]
    shapes: tuple[tuple[int, ...], ...]
    n_summed: int = 1
    depth: int = 0

    def __post_init__(self) -> None:
        if self.n_summed < 1:
            raise MalformedMessage(f"n_summed must be >= 1, got {self.n_summed}")
        if self.depth < 0:
            raise MalformedMessage(f"depth must be >= 0, got {self.depth}")
        if not self.ciphertexts:
            raise MalformedMessage("an encrypted batch needs at least one ciphertext")
        for shape in self.shapes:
            if any(d < 0 for d in shape):
                raise MalformedMessage(f"negative dimension in shape {shape}")

    @property
    def n_values(self) -> int:
        """Number of real values the layout describes (padding excluded)."""
        return sum(math.prod(s) for s in self.shapes)

    def _check_layout(self, params: CkksParams) -> None:
        expected = -(-self.n_values // params.slot_count)
        if expected == 0 or len(self.ciphertexts) != expected:
            raise MalformedMessage(
                f"layout of {self.n_values} values needs {expected} ciphertexts of "
                f"{params.slot_count} slots, batch has {len(self.ciphertexts)}"
            )

    def window(self, start: int, stop: int, slot_count: int) -> EncryptedBatch:
        """The ciphertexts that hold values ``[start, stop)`` of the flattened layout.

        Nothing is decrypted or re-encrypted: the window starts at the ciphertext boundary
        before ``start``, so its layout is ``((k,), (stop - start,))`` with ``k = start %
        slot_count`` leading values that belong to someone else; the second array is the
        requested range. Lets a coordinator relay one segment of a sum without the rest.
        """
        if not 0 <= start <= stop <= self.n_values or start == stop:
            raise MalformedMessage(
                f"window [{start}, {stop}) is empty or outside the {self.n_values} values"
            )
        first, last = start // slot_count, -(-stop // slot_count)
        return EncryptedBatch(
            ciphertexts=self.ciphertexts[first:last],
            shapes=((start - first * slot_count,), (stop - start,)),
            n_summed=self.n_summed,
            depth=self.depth,
        )


class CkksKeyHolder:
    """Institution side: holds the CKKS secret key, encrypts updates, decrypts aggregates."""

    def __init__(self, ctx: ts.Context, params: CkksParams) -> None:
        """Use :meth:`generate` or :meth:`from_bytes`; this wraps an already checked context."""
        self._ctx = ctx
        self.params = params

    @classmethod
    def generate(cls, params: CkksParams | None = None) -> CkksKeyHolder:
        """Make a fresh secret key (SEAL draws it from the OS CSPRNG)."""
        params = params or CkksParams()
        return cls(params._context(), params)

    @classmethod
    def from_bytes(cls, data: bytes) -> CkksKeyHolder:
        """Load a secret context written by :meth:`to_bytes` (shared among institutions)."""
        ctx = _load_context(data)
        if not ctx.has_secret_key():
            raise ConfigError("context bytes hold no secret key: not a key holder's context")
        holder = cls(ctx, CkksParams._of_context(ctx))
        try:  # a context that cannot encrypt (e.g. public-key type without a public key)
            ts.ckks_vector(ctx, [0.0])
        except ValueError as exc:
            raise ConfigError(f"context cannot encrypt: {exc}") from exc
        return holder

    def to_bytes(self) -> bytes:
        """Serialize the context WITH THE SECRET KEY.

        Whoever holds these bytes can decrypt every institution's update. Share them only
        among institutions, over an authenticated encrypted channel; never with the
        coordinator (give it :meth:`public_context`).
        """
        return self._ctx.serialize(
            save_public_key=False,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )

    def public_context(self) -> bytes:
        """Serialize the evaluation context for the coordinator: parameters only, no keys."""
        return _public_bytes(self._ctx)

    def encrypt(self, arrays: Sequence[np.ndarray]) -> EncryptedBatch:
        """Pack real arrays of any shapes densely into ciphertexts."""
        if isinstance(arrays, np.ndarray):
            raise MalformedMessage("encrypt takes a sequence of arrays, not one array")
        flats: list[np.ndarray] = []
        shapes: list[tuple[int, ...]] = []
        bound = self.params.max_abs_value
        for i, array in enumerate(arrays):
            a = np.asarray(array)
            if a.dtype.kind not in "biuf":
                raise MalformedMessage(f"array {i} has dtype {a.dtype}, expected real numbers")
            flat = a.astype(np.float64).ravel()
            if not np.all(np.isfinite(flat)):
                raise MalformedMessage(f"array {i} holds NaN or infinite values")
            if flat.size and np.max(np.abs(flat)) > bound:
                raise MalformedMessage(
                    f"array {i} has values beyond max_abs_value={bound:g} of these parameters"
                )
            flats.append(flat)
            shapes.append(tuple(int(d) for d in a.shape))
        stream = np.concatenate(flats) if flats else np.zeros(0)
        if stream.size == 0:
            raise MalformedMessage("nothing to encrypt: the arrays hold no values")
        slots = self.params.slot_count
        padded = np.zeros(-(-stream.size // slots) * slots)
        padded[: stream.size] = stream
        cts = tuple(
            ts.ckks_vector(self._ctx, chunk.tolist()).serialize()
            for chunk in padded.reshape(-1, slots)
        )
        return EncryptedBatch(ciphertexts=cts, shapes=tuple(shapes))

    def decrypt(self, batch: EncryptedBatch) -> list[np.ndarray]:
        """Decrypt a batch (usually an aggregate) back into float64 arrays of its layout."""
        batch._check_layout(self.params)
        values = np.concatenate(
            [
                np.asarray(_load_vector(self._ctx, self.params, ct, batch.depth).decrypt())
                for ct in batch.ciphertexts
            ]
        )
        out: list[np.ndarray] = []
        offset = 0
        for shape in batch.shapes:
            size = math.prod(shape)
            out.append(values[offset : offset + size].reshape(shape))
            offset += size
        return out


class CkksAggregator:
    """Coordinator side: adds encrypted batches of one layout without any key."""

    def __init__(self, public_context: bytes) -> None:
        ctx = _keyless_context(public_context)
        self.params = CkksParams._of_context(ctx)
        self._ctx = ctx
        self._sums: list[ts.CKKSVector] = []
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        self._count = 0

    @property
    def count(self) -> int:
        """Batches summed so far (the sum of their ``n_summed``)."""
        return self._count

    def add(self, batch: EncryptedBatch) -> None:
        """Validate one batch and add it to the running sum (nothing changes if it is bad)."""
        batch._check_layout(self.params)
        if self._shapes is not None and batch.shapes != self._shapes:
            raise MalformedMessage(
                f"batch layout {batch.shapes} differs from this aggregate's {self._shapes}"
            )
        if batch.depth != 0:
            raise MalformedMessage(f"only fresh batches (depth 0) are summed, got {batch.depth}")
        vectors = [_load_vector(self._ctx, self.params, ct) for ct in batch.ciphertexts]
        if self._shapes is None:
            self._sums, self._shapes = vectors, batch.shapes
        else:
            for acc, vec in zip(self._sums, vectors, strict=True):
                acc.add_(vec)
        self._count += batch.n_summed

    def sum(self) -> EncryptedBatch:
        """The encrypted sum of every batch added so far."""
        if self._shapes is None:
            raise ProtocolError("no batch has been added, so there is no sum")
        return EncryptedBatch(
            ciphertexts=tuple(v.serialize() for v in self._sums),
            shapes=self._shapes,
            n_summed=self._count,
        )


class CkksEvaluator:
    """Coordinator side: keyless affine maps of encrypted sums, for a state it cannot read.

    With expert updates under CKKS the coordinator never sees the global adapters: it keeps
    them encrypted and folds each round's encrypted sum in with public factors (FedAvg's
    ``bound / sum(w)``), ``state = factors * sum + state``. One plaintext multiplication per
    round drops the sum one level; the state stays at that level, so rounds do not use up the
    modulus chain. Needs a second data prime (the default parameters have two).
    """

    def __init__(self, public_context: bytes) -> None:
        ctx = _keyless_context(public_context)
        self.params = CkksParams._of_context(ctx)
        if len(self.params.coeff_mod_bit_sizes) < 3:
            raise ConfigError(
                f"coeff_mod_bit_sizes {self.params.coeff_mod_bit_sizes} leave no level for a "
                "plaintext multiplication: add a data prime (e.g. the default (60, 40, 40, 60))"
            )
        self._ctx = ctx

    def scale_and_add(
        self,
        total: EncryptedBatch,
        factors: np.ndarray,
        base: EncryptedBatch | Sequence[np.ndarray],
    ) -> EncryptedBatch:
        """``Enc(factors * total[:d] + base)`` with ``d = len(factors)``, at depth 1.

        ``total`` is a fresh sum (depth 0) holding at least ``d`` values; ``base`` is either a
        previous result (depth 1, ``d`` values) or public plaintext arrays of ``d`` values in
        all, whose shapes the result takes.
        """
        total._check_layout(self.params)
        if total.depth != 0:
            raise MalformedMessage(f"total must be a fresh sum (depth 0), got {total.depth}")
        factors = np.asarray(factors, dtype=np.float64).ravel()
        d = factors.size
        if d == 0 or d > total.n_values or not np.all(np.isfinite(factors)):
            raise MalformedMessage(
                f"need 1..{total.n_values} finite factors for this sum, got {d} values"
            )
        if isinstance(base, EncryptedBatch):
            base._check_layout(self.params)
            if base.depth != 1 or base.n_values != d:
                raise MalformedMessage(
                    f"base must be a depth-1 state of {d} values, got depth {base.depth} with "
                    f"{base.n_values} values"
                )
            shapes, plain = base.shapes, None
        else:
            arrays = [np.asarray(a, dtype=np.float64) for a in base]
            shapes = tuple(tuple(int(n) for n in a.shape) for a in arrays)
            plain = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0)
            if plain.size != d or not np.all(np.isfinite(plain)):
                raise MalformedMessage(f"base must hold {d} finite values, got {plain.size}")
        slots = self.params.slot_count
        out: list[bytes] = []
        for i in range(-(-d // slots)):
            chunk = np.zeros(slots)
            part = factors[i * slots : (i + 1) * slots]
            chunk[: part.size] = part
            vec = _load_vector(self._ctx, self.params, total.ciphertexts[i]) * chunk.tolist()
            if plain is None:
                vec.add_(_load_vector(self._ctx, self.params, base.ciphertexts[i], 1))
            else:
                offset = np.zeros(slots)
                part = plain[i * slots : (i + 1) * slots]
                offset[: part.size] = part
                vec.add_(offset.tolist())
            out.append(vec.serialize())
        return EncryptedBatch(
            ciphertexts=tuple(out), shapes=shapes, n_summed=total.n_summed, depth=1
        )


def context_params(context: bytes) -> CkksParams:
    """The validated parameters of serialized context bytes (public or secret)."""
    return CkksParams._of_context(_load_context(context))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _public_bytes(ctx: ts.Context) -> bytes:
    return ctx.serialize(
        save_public_key=False,
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )


def _keyless_context(public_context: bytes) -> ts.Context:
    """The coordinator's context; refuses one that holds the institutions' secret key."""
    ctx = _load_context(public_context)
    if ctx.has_secret_key():
        raise ConfigError(
            "public_context holds a secret key: the coordinator must get "
            "CkksKeyHolder.public_context(), never the institutions' secret context"
        )
    return ctx


def _load_context(data: bytes) -> ts.Context:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise MalformedMessage("context must be non-empty bytes")
    try:
        return ts.context_from(bytes(data))
    except Exception as exc:  # TenSEAL's C++ parsers raise ValueError or RuntimeError
        raise MalformedMessage(f"bytes do not decode to a TenSEAL context: {exc}") from exc


def _load_vector(ctx: ts.Context, params: CkksParams, data: bytes, depth: int = 0) -> ts.CKKSVector:
    """Deserialize one ciphertext; check it belongs to this context, ``depth`` levels down."""
    if not isinstance(data, bytes) or len(data) == 0:
        raise MalformedMessage("ciphertext must be non-empty bytes")
    try:
        vec = ts.ckks_vector_from(ctx, data)
    except Exception as exc:  # TenSEAL's C++ parsers raise ValueError or RuntimeError
        raise MalformedMessage(f"bytes do not decode to a CKKS ciphertext: {exc}") from exc
    if vec.size() != params.slot_count:
        raise MalformedMessage(
            f"ciphertext holds {vec.size()} values, expected {params.slot_count} slots"
        )
    cts = vec.ciphertext()
    seal = ctx.seal_context().data
    level = seal.first_context_data()
    for _ in range(depth):
        level = level.next_context_data() if level is not None else None
    if level is None:
        raise MalformedMessage(f"depth {depth} is below the last level of these parameters")
    if len(cts) != 1:
        raise MalformedMessage(f"CKKS vector has {len(cts)} ciphertexts, expected 1")
    ct = cts[0]
    if (
        ct.size() != 2
        or ct.parms_id() != level.parms_id()
        or ct.scale != ctx.global_scale
        or not sealapi.is_valid_for(ct, seal)
    ):
        raise MalformedMessage(
            "ciphertext does not match the context (size, level, scale or parameters)"
        )
    return vec
