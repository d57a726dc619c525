"""Discrete Gaussian noise, sampled exactly (Canonne, Kamath and Steinke, NeurIPS 2020).

Distributed differential privacy (``secagg.privacy``) has every client add integer noise to its
quantized update, so that the decrypted sum carries the whole noise. The noise is the discrete
Gaussian ``N_Z(0, sigma^2)``: ``P(x) ~ exp(-x^2 / (2 sigma^2))`` over the integers, drawn by
the paper's algorithms (a discrete Laplace proposal, accepted with an exact Bernoulli of
``exp(-gamma)`` for rational ``gamma``), in integer arithmetic only: no floating point decides
any draw. ``sigma^2`` is a whole number.

The random words come from AES-256-CTR keyed from the operating system's CSPRNG
(``os.urandom``) afresh for every call: a CSPRNG (NIST's CTR_DRBG construction), never numpy's
generator, whose state an observer of a few outputs could recover. Uniform integers are drawn
by rejection, so none is biased.

One departure, for 64-bit arithmetic: a proposal beyond ``TAIL_SIGMAS`` standard deviations is
rejected outright, where the exact algorithm accepts it with probability below ``exp(-760)``;
the output is the discrete Gaussian conditioned on ``|x| <= 40 sigma``, within ``2^-1000`` of
it in total variation. ``sigma`` is at most ``MAX_SIGMA`` (the codec scales its integers so).
"""

from __future__ import annotations

import os

import numba
import numpy as np

from secagg.crypto import seeded
from secagg.privacy import MAX_SIGMA

#: Proposals beyond this many standard deviations are rejected (see the module docstring).
TAIL_SIGMAS = 40
#: Words drawn per value still to draw (12.3 to 12.9 are read on average), and a margin.
_WORDS_PER_VALUE = 13
_SPARE_WORDS = 4096
_EMPTY = np.int64(-1)


def discrete_gaussian(variance: int, count: int) -> np.ndarray:
    """``count`` independent draws of ``N_Z(0, variance)`` (int64), ``variance`` a whole
    number in ``[1, MAX_SIGMA^2]``."""
    if isinstance(variance, bool) or not isinstance(variance, (int, np.integer)):
        raise TypeError("the discrete Gaussian's variance must be a whole number")
    if not 1 <= variance <= MAX_SIGMA**2:
        raise ValueError(f"the discrete Gaussian's variance must be in [1, {MAX_SIGMA**2}]")
    out = np.empty(count, dtype=np.int64)
    filled = 0
    encryptor = seeded.ctr(os.urandom(seeded.SEED_BYTES), bytes(16))
    leftover = np.empty(0, dtype=np.uint64)
    while filled < count:
        # About the words the rest needs, so that one pass of AES usually suffices; each chunk
        # is a view of a reused buffer, read before the next is drawn.
        for chunk in seeded.draw(encryptor, (count - filled) * _WORDS_PER_VALUE + _SPARE_WORDS):
            # A draw cut off by the end of the words is replayed on the same words and more
            # (never restarted on fresh ones, which would favour draws that need few words).
            words = np.concatenate([leftover, chunk]) if leftover.size else chunk
            filled, resume = _fill(out, filled, words, np.int64(variance))
            leftover = words[resume:].copy()
            if filled == count:
                break
    return out


@numba.njit(cache=True)
def _uniform(words: np.ndarray, pos: np.ndarray, n: np.uint64) -> np.int64:
    """A uniform integer in ``[0, n)`` by rejection from 64-bit words (-1: out of words)."""
    if (n & (n - np.uint64(1))) == np.uint64(0):  # a power of two: low bits, no rejection
        if pos[0] >= words.size:
            return _EMPTY
        pos[0] += 1
        return np.int64(words[pos[0] - 1] & (n - np.uint64(1)))
    top = np.uint64(0xFFFFFFFFFFFFFFFF)
    cut = top - (top % n)  # accept words below a multiple of n: no modulo bias
    while pos[0] < words.size:
        word = words[pos[0]]
        pos[0] += 1
        if word < cut:
            return np.int64(word % n)
    return _EMPTY


@numba.njit(cache=True)
def _bernoulli(words: np.ndarray, pos: np.ndarray, num: np.int64, den: np.int64) -> np.int64:
    """1 with probability ``num / den`` (0 <= num <= den), 0 otherwise, -1: out of words."""
    if num >= den:  # certain: no word spent
        return np.int64(1)
    if num <= 0:
        return np.int64(0)
    u = _uniform(words, pos, np.uint64(den))
    if u < 0:
        return _EMPTY
    return np.int64(1) if u < num else np.int64(0)


@numba.njit(cache=True)
def _bernoulli_exp1(words: np.ndarray, pos: np.ndarray, num: np.int64, den: np.int64) -> np.int64:
    """1 with probability ``exp(-num / den)`` for ``0 <= num <= den`` (the paper's
    Algorithm 1: the parity of the first k whose Bernoulli(gamma / k) fails)."""
    k = np.int64(1)
    while True:
        a = _bernoulli(words, pos, num, den * k)
        if a < 0:
            return _EMPTY
        if a == 0:
            break
        k += 1
    return np.int64(k % 2)


@numba.njit(cache=True)
def _bernoulli_exp(words: np.ndarray, pos: np.ndarray, num: np.int64, den: np.int64) -> np.int64:
    """1 with probability ``exp(-num / den)`` for any ``num >= 0``: ``exp(-1)`` once per
    whole unit, then the fraction."""
    while num > den:
        b = _bernoulli_exp1(words, pos, np.int64(1), np.int64(1))
        if b <= 0:
            return b
        num -= den
    return _bernoulli_exp1(words, pos, num, den)


@numba.njit(cache=True)
def _laplace(words: np.ndarray, pos: np.ndarray, t: np.int64) -> tuple[np.int64, bool]:
    """One discrete Laplace draw of scale ``t`` (the paper's Algorithm 2); False: out of
    words."""
    while True:
        u = _uniform(words, pos, np.uint64(t))
        if u < 0:
            return np.int64(0), False
        d = _bernoulli_exp(words, pos, u, t)
        if d < 0:
            return np.int64(0), False
        if d == 0:
            continue
        v = np.int64(0)
        while True:
            b = _bernoulli_exp1(words, pos, np.int64(1), np.int64(1))
            if b < 0:
                return np.int64(0), False
            if b == 0:
                break
            v += 1
        x = u + t * v
        sign = _bernoulli(words, pos, np.int64(1), np.int64(2))
        if sign < 0:
            return np.int64(0), False
        if sign == 1 and x == 0:
            continue
        return (x if sign == 0 else -x), True


@numba.njit(cache=True, nogil=True)
def _fill(out: np.ndarray, filled: int, words: np.ndarray, variance: np.int64) -> tuple[int, int]:
    """Write discrete Gaussian draws (the paper's Algorithm 3) into ``out`` from ``filled``
    on, until it is full or ``words`` run out; return how many are filled and where the
    unfinished draw's words begin."""
    pos = np.zeros(1, dtype=np.int64)
    t = np.int64(np.floor(np.sqrt(np.float64(variance)))) + 1
    while t * t <= variance:  # floor(sqrt) exactly, whatever the float rounding
        t += 1
    while (t - 1) * (t - 1) > variance:
        t -= 1
    bound = np.int64(TAIL_SIGMAS) * t
    while filled < out.size:
        start = pos[0]
        y, ok = _laplace(words, pos, t)
        if not ok:
            return filled, start
        magnitude = abs(y)
        if magnitude > bound:
            continue
        # Accept with exp(-(|y| - variance / t)^2 / (2 variance)), as one exact fraction.
        gap = magnitude * t - variance
        accept = _bernoulli_exp(words, pos, gap * gap, 2 * variance * t * t)
        if accept < 0:
            return filled, start
        if accept == 1:
            out[filled] = y
            filled += 1
    return filled, pos[0]


def round_within(scaled: np.ndarray, bound: float, tries: int = 1000) -> np.ndarray:
    """``scaled`` rounded at random to a neighbouring integer, up with probability its
    fractional part (unbiased), drawn again until the result's L2 norm is at most ``bound``
    (conditional randomized rounding); the uniforms are AES-CTR words keyed from the OS's
    CSPRNG, 53 bits each."""
    scaled = np.ascontiguousarray(scaled, dtype=np.float64)
    rounded = np.empty_like(scaled)
    key = os.urandom(seeded.SEED_BYTES)
    for attempt in range(tries):
        counter = (attempt << 64).to_bytes(16, "big")  # streams that never overlap
        done = 0
        squares = 0.0
        # Each chunk is a view of one reused buffer: used before the next is drawn.
        for words in seeded.key_stream(key, counter, max(scaled.size, 1)):
            take = min(words.size, scaled.size - done)
            squares += _round(scaled[done : done + take], words[:take], rounded[done:])
            done += take
        if squares <= bound * bound:
            return rounded
    raise ValueError(
        f"no rounding within the norm {bound} in {tries} draws: is the change clipped?"
    )


@numba.njit(cache=True, nogil=True)
def _round(scaled: np.ndarray, words: np.ndarray, out: np.ndarray) -> float:
    """``out``: each of ``scaled`` rounded up when its word's top 53 bits, as a uniform in
    [0, 1), fall below its fractional part, down otherwise; return their sum of squares."""
    squares = 0.0
    for i in range(scaled.size):
        floor = np.floor(scaled[i])
        uniform = np.float64(words[i] >> np.uint64(11)) * 2.0**-53
        value = floor + 1.0 if uniform < scaled[i] - floor else floor
        out[i] = value
        squares += value * value
    return squares
