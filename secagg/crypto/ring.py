"""Ring arithmetic mod a word-sized prime, compiled (numba): how kernels are compiled, the
PRG's rejection sampling and lazy reduction (``seeded``), and the integrity tag's exact modular
dot product (``integrity``). The NTT's kernels live in ``ntt``.

Clients import this; a server imports it only when it expands masks to remove them (through
``seeded``, on first use): it computes no tag, no NTT and no encryption.
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
