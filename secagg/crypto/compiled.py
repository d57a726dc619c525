"""Compiled (numba) kernels outside the NTT: how they are compiled, and the integrity tag's
exact modular dot product.

Clients import this; the server never does (it cannot compute a tag), so a server process
loads no numba.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np


def kernel(function: Callable[..., Any]) -> Any:
    """Compile ``function`` without the GIL, caching the machine code next to this package (or
    in the user's cache folder); where neither is writable (a read-only install, a service user
    without a home), compile it afresh in each process instead of failing the import."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # numba finds no writable cache location
        return numba.njit(nogil=True)(function)


@kernel
def _dot_halves(low, high, values, block, modulus, bound):  # pragma: no cover - compiled
    lo_total = 0
    hi_total = 0
    n = values.size
    for start in range(0, n, block):
        lo_part = 0
        hi_part = 0
        for i in range(start, min(start + block, n)):
            if not abs(values[i]) < bound:  # NaN too
                return False, 0, 0
            value = np.int64(values[i])
            lo_part += low[i] * value
            hi_part += high[i] * value
        lo_total = (lo_total + lo_part % modulus) % modulus
        hi_total = (hi_total + hi_part % modulus) % modulus
    return True, lo_total, hi_total


def dot_halves(
    low: np.ndarray, high: np.ndarray, values: np.ndarray, block: int, modulus: int, bound: int
) -> tuple[int, int] | None:
    """``(sum(low * values) mod modulus, sum(high * values) mod modulus)`` exactly, in one
    pass: ``low`` and ``high`` integers (int32 here) in ``[0, 2**31)``, ``values`` integers
    (float64) below ``bound`` in magnitude, small enough that ``block`` products add up within
    int64 (the caller's bound). None when a value is not below ``bound`` (or is NaN)."""
    ok, lo, hi = _dot_halves(
        low, high, values, np.int64(block), np.int64(modulus), np.float64(bound)
    )
    return (int(lo), int(hi)) if ok else None


@kernel
def _split_halves(words, prime_bits, half_bits, low, high):  # pragma: no cover - compiled
    prime = (np.uint64(1) << np.uint64(prime_bits)) - np.uint64(1)
    mask = (np.uint64(1) << np.uint64(half_bits)) - np.uint64(1)
    for i in range(words.size):
        word = words[i]
        word = (word & prime) + (word >> np.uint64(prime_bits))  # 2**bits = 1 mod the prime
        if word >= prime:
            word -= prime
        low[i] = np.int32(word & mask)
        high[i] = np.int32(word >> np.uint64(half_bits))


def split_halves(
    words: np.ndarray, prime_bits: int, half_bits: int, low: np.ndarray, high: np.ndarray
) -> None:
    """``words mod (2**prime_bits - 1)`` (uint64 words, a Mersenne prime of at most 62 bits)
    into ``low`` (their low ``half_bits`` bits) and ``high`` (the rest), int32 arrays of the
    words' length (``half_bits`` at least ``prime_bits - 31``, at most 31), in one pass."""
    _split_halves(words, np.int64(prime_bits), np.int64(half_bits), low, high)


@kernel
def _take_below(words, mask, modulus, out, at, add):  # pragma: no cover - compiled
    n = out.size
    need = n - at
    if 0 < need <= words.size:
        # The common case (a word is rejected about once in 2**40 for a 60-bit NTT prime):
        # count the rejections, then copy or add without a branch per word (both vectorize).
        rejected = 0
        for i in range(need):
            rejected += (words[i] & mask) >= modulus
        if rejected == 0:
            if add:
                for i in range(need):
                    out[at + i] += words[i] & mask
            else:
                for i in range(need):
                    out[at + i] = words[i] & mask
            return n
    for i in range(words.size):
        if at >= n:
            break
        word = words[i] & mask
        if word < modulus:
            if add:
                out[at] += word
            else:
                out[at] = word
            at += 1
    return at


def take_below(
    words: np.ndarray, bits: int, modulus: int, out: np.ndarray, at: int, add: bool
) -> int:
    """Rejection sampling mod ``modulus``: each of ``words`` masked to its low ``bits`` bits and
    kept when below ``modulus``, written (or, with ``add``, added) to ``out`` from position
    ``at`` until ``out`` is full. Returns the next position to fill."""
    mask = np.uint64((1 << bits) - 1)
    return int(_take_below(words, mask, np.uint64(modulus), out, np.int64(at), add))


@kernel
def _take_rows(stream, mask, modulus, out, add, have):  # pragma: no cover - compiled
    for row in range(out.shape[0]):
        have[row] = _take_below(stream[row], mask, modulus, out[row], 0, add)


@kernel
def _reduce_lazy(out, modulus, bits):  # pragma: no cover - compiled
    for i in range(out.size):
        value = out[i]
        value -= (value >> bits) * modulus  # below 2**bits plus a few q
        while value >= modulus:
            value -= modulus
        out[i] = value


def reduce_lazy(out: np.ndarray, modulus: int) -> None:
    """``out mod modulus`` in place (uint64): cheaper than a division for words that are lazy
    sums of a few words below ``modulus`` (one subtraction or two for an NTT prime just below
    a power of two; correct, if slower, for any)."""
    _reduce_lazy(out.reshape(-1), np.uint64(modulus), np.uint64(modulus.bit_length()))


def take_rows(
    stream: np.ndarray, bits: int, modulus: int, out: np.ndarray, add: bool
) -> np.ndarray:
    """``take_below`` row by row, from position 0 of each row of ``out``, in one call: how far
    each row was filled (int64), ``out.shape[1]`` where its words sufficed."""
    have = np.empty(out.shape[0], dtype=np.int64)
    mask = np.uint64((1 << bits) - 1)
    _take_rows(stream, mask, np.uint64(modulus), out, add, have)
    return have


# --- quantization on the agreed steps (``quantize`` says the same in numpy) ---


@kernel
def _quantize_blocks(values, steps, sizes, limit):  # pragma: no cover - compiled
    clipped = 0
    at = 0
    for block in range(sizes.size):
        step = steps[block]
        for i in range(at, at + sizes[block]):
            value = values[i]
            if value > limit:
                value = limit
                clipped += 1
            elif value < -limit:
                value = -limit
                clipped += 1
            values[i] = np.rint(value / step)  # NaN stays NaN, as in numpy
        at += sizes[block]
    return clipped


@kernel
def _scale_blocks(values, steps, sizes):  # pragma: no cover - compiled
    at = 0
    for block in range(sizes.size):
        step = steps[block]
        for i in range(at, at + sizes[block]):
            values[i] *= step
        at += sizes[block]


def _check_blocks(values: np.ndarray, steps: np.ndarray, sizes: np.ndarray) -> None:
    if values.dtype != np.float64 or values.ndim != 1 or not values.flags.writeable:
        raise ValueError(
            "quantization works in place on a writeable one-dimensional float64 array: pass "
            "a float64 copy of the flattened update"
        )
    if steps.shape != sizes.shape or int(sizes.sum()) != values.size or np.any(sizes < 0):
        raise ValueError(
            f"{sizes.size} blocks of {int(sizes.sum())} values for {values.size}: take the "
            "steps and block sizes from the same model layout as the values (block_sizes)"
        )


def quantize_blocks(values: np.ndarray, steps: np.ndarray, sizes: np.ndarray, limit: float) -> int:
    """In place, in one pass: each value clipped to ``[-limit, limit]``, divided by its
    block's step and rounded half to even; returns how many were clipped."""
    _check_blocks(values, steps, sizes)
    return int(
        _quantize_blocks(
            values, steps.astype(np.float64), sizes.astype(np.int64), np.float64(limit)
        )
    )


def scale_blocks(values: np.ndarray, steps: np.ndarray, sizes: np.ndarray) -> None:
    """In place: each value times its block's step."""
    _check_blocks(values, steps, sizes)
    _scale_blocks(values, steps.astype(np.float64), sizes.astype(np.int64))


# --- packing, encoding and adding in one pass (``packing`` and ``rlwe`` are the reference) ---

#: ``pack_add``'s and ``open_sum``'s verdicts: what the numpy reference refuses by name.
OK, BAD_VALUE, BAD_TAIL, NOT_INTEGER, OUT_OF_RANGE = 0, 1, 2, 3, 4


@numba.njit(inline="always")
def _popcount(x):  # pragma: no cover - compiled (LLVM emits the CPU's popcount for this idiom)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@kernel
def _zero_from(product, words, bound, modulus):  # pragma: no cover - compiled
    mask = (np.uint64(1) << np.uint64(bound)) - np.uint64(1)
    q = np.int64(modulus)
    for i in range(product.size):
        word = words[i]
        noise = _popcount(word & mask) - _popcount((word >> np.uint64(bound)) & mask)
        value = q - np.int64(product[i]) + noise  # in [1 - bound, q + bound]
        if value >= q:
            value -= q
        elif value < 0:
            value += q
        product[i] = np.uint64(value)


def zero_from(product: np.ndarray, words: np.ndarray, bound: int, modulus: int) -> None:
    """``product = -product + e mod q`` in place, one pass: ``product`` holds ``a s`` (uint64
    words below q), ``e`` is the centered binomial noise ``rlwe.noise_of(words)`` draws
    from the same key-stream words (one per coefficient)."""
    _zero_from(product, words, np.int64(bound), np.int64(modulus))


@numba.njit(inline="always")
def _add_scaled(c0, at, integer, scale_bits, modulus):  # pragma: no cover - compiled
    """``c0[at] += integer * 2**scale_bits mod modulus`` (``c0[at]`` below the modulus)."""
    word = integer << scale_bits
    if word < 0:
        word += modulus
    total = c0[at] + np.uint64(word)
    c0[at] = total - np.uint64(modulus) if total >= np.uint64(modulus) else total


@kernel
def _pack_add(
    c0, values, tail, k, bits, scale_bits, modulus, digit_limit, tail_limit
):  # pragma: no cover - compiled
    n = values.size
    body = (n + k - 1) // k
    for slot in range(body):
        packed = np.int64(0)
        for j in range(k - 1, -1, -1):
            index = slot * k + j
            digit = np.int64(0)
            if index < n:
                value = values[index]
                # NaN fails the comparison too
                if not abs(value) < digit_limit or value != np.floor(value):
                    return BAD_VALUE
                digit = np.int64(value)
            packed = (packed << bits) + digit
        _add_scaled(c0, slot, packed, scale_bits, modulus)
    for t in range(tail.size):
        value = tail[t]
        if not abs(value) < tail_limit or value != np.floor(value):
            return BAD_TAIL
        _add_scaled(c0, body + t, np.int64(value), scale_bits, modulus)
    return OK


def pack_add(
    c0: np.ndarray, values: np.ndarray, tail: np.ndarray, packing: Any, modulus: int
) -> int:
    """Pack integer ``values`` (float64) and whole-slot ``tail`` integers as ``packing`` does,
    scale them by ``2**scale_bits`` and add them mod ``modulus`` to the ``c0`` words (flat,
    slot ``i`` at word ``i``), in one pass. Returns ``OK``, or ``BAD_VALUE``/``BAD_TAIL`` for
    what ``packing.pack`` refuses (then ``c0`` is partly changed: the caller discards it)."""
    return int(
        _pack_add(
            c0,
            np.ascontiguousarray(values, dtype=np.float64),
            np.ascontiguousarray(tail, dtype=np.float64),
            np.int64(packing.values_per_slot),
            np.int64(packing.digit_bits),
            np.int64(packing.scale_bits),
            np.int64(modulus),
            np.float64(packing.digit_limit),
            np.float64(packing.tail_limit),
        )
    )


@kernel
def _open_sum(
    c0, product, modulus, scale_bits, bound, k, bits, values, slots, tail, digits, whole
):  # pragma: no cover - compiled
    q = np.uint64(modulus)
    half_q = q // np.uint64(2)
    half = np.int64(1) << (scale_bits - 1)
    base = np.float64(np.int64(1) << bits)
    limit = np.float64(np.int64(1) << (bits - 1))
    top = np.float64(np.int64(1) << (k * bits))  # twice the tail limit
    body = slots - tail
    for i in range(c0.size):
        word = c0[i] + product[i]
        if word >= q:
            word -= q
        centered = np.int64(word) if word <= half_q else np.int64(word) - np.int64(modulus)
        integer = (centered + half) >> scale_bits
        if abs(centered - (integer << scale_bits)) > bound:
            return NOT_INTEGER
        if i >= slots:
            if integer != 0:
                return NOT_INTEGER
            continue
        rest = np.float64(integer)
        if abs(rest) >= top:
            return NOT_INTEGER
        if i >= body:
            whole[i - body] = rest
            continue
        for j in range(k):
            digit = rest  # the top digit is what is left
            if j < k - 1:  # balanced: rest - base * round(rest / base), exact in float64
                upper = np.rint(rest / base)
                digit = rest - upper * base
                rest = upper
            at = i * k + j
            if not (digit < limit and digit >= -limit) or (at >= values and digit != 0):
                return OUT_OF_RANGE
            if at < values:
                digits[at] = digit
    return OK


def open_sum(
    c0: np.ndarray,
    product: np.ndarray,
    modulus: int,
    contributors: int,
    packing: Any,
    values: int,
    tail: int,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Decrypt and unpack a sum in one pass: ``c0 + c1 s`` (``product``) mod ``modulus``,
    centered, divided by the scale to integers (off by at most the noise of ``contributors``
    ciphertexts), split into ``values`` balanced digits and ``tail`` whole integers, as
    ``rlwe.decrypt``, ``rlwe.decode`` and ``packing.unpack`` do. Returns (verdict, digits,
    tail), the verdict ``OK``, ``NOT_INTEGER`` or ``OUT_OF_RANGE`` as those refuse."""
    from secagg.crypto.packing import NOISE_BOUND

    digits = np.empty(values)
    whole = np.empty(tail)
    verdict = _open_sum(
        c0.reshape(-1),
        product.reshape(-1),
        np.int64(modulus),
        np.int64(packing.scale_bits),
        np.int64(NOISE_BOUND * max(contributors, 1)),
        np.int64(packing.values_per_slot),
        np.int64(packing.digit_bits),
        np.int64(values),
        np.int64(packing.slots_for(values, tail)),
        np.int64(tail),
        digits,
        whole,
    )
    return int(verdict), digits, whole
