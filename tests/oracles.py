"""Step-by-step numpy versions of the packed codec's and the RLWE scheme's one-pass kernels
(``secagg.crypto.codec``, ``secagg.crypto.rlwe``): each says in plain numpy what a kernel
computes, so the tests can check the kernels bit for bit against them, and read ciphertexts
the way the paper would. Production has one implementation of each operation, the kernel.
"""

from __future__ import annotations

import math
import os

import numpy as np

from secagg.crypto import seeded
from secagg.crypto.packing import PackedParams
from secagg.crypto.seal_format import NOISE_BOUND
from secagg.errors import PayloadError

_NOISE_MASK = np.uint64((1 << NOISE_BOUND) - 1)


def pack(packing: PackedParams, values: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Integer values (and whole-slot tail integers) to float64 slot values, exactly (slot
    values stay below 2**46, so float64 arithmetic on them is exact integer arithmetic)."""
    k = packing.values_per_slot
    values = _integers(np.asarray(values, dtype=np.float64), "quantized value")
    if values.size and np.abs(values).max() >= packing.digit_limit:
        raise PayloadError(
            f"quantized value {np.abs(values).max():.0f} is outside the packable range "
            f"of +-{packing.digit_limit - 1}"
        )
    tail = _integers(np.asarray(tail, dtype=np.float64), "tail value")
    if tail.size and np.abs(tail).max() >= packing.tail_limit:
        raise PayloadError(
            f"tail value {np.abs(tail).max():.0f} is outside the packable range "
            f"of +-{packing.tail_limit - 1}"
        )
    body = math.ceil(values.size / k)
    out = np.empty(body + tail.size)
    flat = np.zeros(body * k)
    flat[: values.size] = values
    digits = flat.reshape(body, k)
    np.copyto(out[:body], digits[:, k - 1])
    for j in range(k - 2, -1, -1):
        out[:body] *= 2.0**packing.digit_bits
        out[:body] += digits[:, j]
    out[body:] = tail
    return out


def unpack(
    packing: PackedParams,
    slots: np.ndarray,
    values: int,
    tail: int,
    *,
    check_range: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Decrypted slot integers (float64) back to the summed integers (values, tail), refusing
    what ``codec.open_sum`` refuses, with the same reasons."""
    slots = np.asarray(slots, dtype=np.float64)
    if slots.shape != (packing.slots_for(values, tail),):
        raise PayloadError(
            f"aggregate has {slots.size} slots, expected {packing.slots_for(values, tail)}",
            "malformed",
        )
    rounded = np.rint(slots)
    if slots.size and (
        not np.array_equal(rounded, slots) or np.abs(rounded).max() >= 2 * packing.tail_limit
    ):
        raise PayloadError("aggregate does not decrypt to integers", "not-integer")
    body = rounded[: rounded.size - tail]
    k, base = packing.values_per_slot, 2.0**packing.digit_bits
    digits = np.empty((body.size, k))
    rest = body
    for j in range(k - 1):
        # Balanced digit: rest - base * round(rest / base), exact in float64.
        upper = np.rint(rest / base)
        np.subtract(rest, upper * base, out=digits[:, j])
        rest = upper
    digits[:, k - 1] = rest
    flat = digits.reshape(-1)
    limit = packing.digit_limit
    if (
        check_range
        and flat.size
        and not (flat.max() < limit and flat.min() >= -limit and not np.any(flat[values:]))
    ):
        raise PayloadError(
            "aggregate holds a packed digit outside the summed range", "out-of-range"
        )
    return flat[:values], rounded[rounded.size - tail :]


def _integers(values: np.ndarray, what: str) -> np.ndarray:
    if values.size and not np.isfinite(values).all():
        raise PayloadError(f"{what} is NaN or infinite")
    if values.size and not np.array_equal(np.rint(values), values):
        raise PayloadError(f"{what}s must be integers for the packed codec (quantize first)")
    return values


def noise(shape: tuple[int, ...]) -> np.ndarray:
    """SEAL's centered binomial noise (int64): per coefficient, the popcount of 21 fair bits
    minus that of 21 others, from one 64-bit word of a freshly keyed AES-256-CTR stream."""
    out = np.empty(int(np.prod(shape)), dtype=np.int64)
    at = 0
    for words in seeded.key_stream(os.urandom(32), bytes(16), out.size):
        out[at : at + words.size] = noise_of(words)
        at += words.size
    return out.reshape(shape)


def noise_of(words: np.ndarray) -> np.ndarray:
    """The noise (int64) that key-stream ``words`` draw, one value per word: the popcount of
    its low ``NOISE_BOUND`` bits minus that of the next ``NOISE_BOUND``."""
    plus = np.bitwise_count(words & _NOISE_MASK)
    minus = np.bitwise_count((words >> np.uint64(NOISE_BOUND)) & _NOISE_MASK)
    return np.subtract(plus, minus, dtype=np.int64)


def encode(values: np.ndarray, count: int, n: int, scale_bits: int, modulus: int) -> np.ndarray:
    """Integers (int64, |v| * 2**scale_bits < q/2) to ``Delta m`` words mod q, (count, N),
    zero-padded."""
    words = np.zeros(count * n, dtype=np.int64)
    words[: values.size] = values
    words <<= scale_bits
    # A negative word read unsigned is 2**64 - |w|; adding q wraps it to q - |w|, below it,
    # while a non-negative word is the smaller one unchanged.
    unsigned = words.view(np.uint64)
    np.minimum(unsigned, unsigned + np.uint64(modulus), out=unsigned)
    return unsigned.reshape(count, n)


def decode(phase: np.ndarray, scale_bits: int, contributors: int, values: int) -> np.ndarray:
    """The summed integers (int64) of ``values`` coefficients from a decryption ``phase``
    (``SecretKey.decrypt``) of a sum of ``contributors`` ciphertexts; refuses (``not-integer``)
    a coefficient further from a multiple of ``Delta`` than the summed noise can be, or
    padding that is not zero."""
    flat = phase.reshape(-1)
    half = np.int64(1 << (scale_bits - 1))
    integers = (flat + half) >> np.int64(scale_bits)
    residual = flat - (integers << np.int64(scale_bits))
    bound = NOISE_BOUND * max(contributors, 1)
    if flat.size and (np.abs(residual).max() > bound or np.any(integers[values:])):
        raise PayloadError("aggregate does not decrypt to integers", "not-integer")
    return integers[:values]
