"""The negacyclic number-theoretic transform mod one NTT prime, exactly as SEAL computes it.

SEAL keeps the secret key (and CKKS ciphertexts) in "NTT form": a polynomial ``a`` of
``Z_q[X]/(X^N + 1)`` is stored as its values ``a(psi^(2 bitrev(k) + 1))`` for ``k < N``, where
``psi`` is the smallest primitive ``2N``-th root of unity mod ``q`` and ``bitrev`` reverses
``log2 N`` bits. In that form a product of polynomials is the coefficient-wise product.
``forward`` computes it (Cooley-Tukey butterflies, powers of ``psi`` in bit-reversed order:
SEAL's ``ntt_negacyclic_harvey``) and ``inverse`` undoes it (Gentleman-Sande, then ``1/N``),
so ``inverse`` of SEAL's secret key gives back its ternary coefficients (a test checks).

The kernels are compiled with numba (64-bit words, Shoup's precomputed quotients, lazy
reduction in ``[0, 4q)``): about 0.15 ms per transform at N = 8192, where numpy takes 4 ms.
They release the GIL, so a client can prepare ciphertexts in a thread while its model trains.
"""

from __future__ import annotations

from functools import cache

import numba
import numpy as np

from secagg.crypto.ring import kernel

#: q below 2**60: the lazy butterflies hold values up to 4q in 64 bits, and seed expansion sums
#: 16 polynomials before one reduction (``seeded.LAZY_TERMS``). SEAL's primes have 60 bits at
#: most.
MAX_MODULUS_BITS = 60


@numba.njit(inline="always")
def _mulhi(x: np.uint64, y: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    """The high 64 bits of the 128-bit product ``x * y``."""
    mask, shift = np.uint64(0xFFFFFFFF), np.uint64(32)
    x0, x1, y0, y1 = x & mask, x >> shift, y & mask, y >> shift
    low, cross1, cross2 = x0 * y0, x0 * y1, x1 * y0
    middle = (low >> shift) + (cross1 & mask) + (cross2 & mask)
    return x1 * y1 + (cross1 >> shift) + (cross2 >> shift) + (middle >> shift)


@kernel
def _forward(a, w, shoup, q):  # pragma: no cover - compiled
    rows, n = a.shape
    two_q = q + q
    for r in range(rows):
        x = a[r]
        m, t = 1, n
        while m < n:
            t >>= 1
            for i in range(m):
                wi, si = w[m + i], shoup[m + i]
                first = 2 * i * t
                for j in range(first, first + t):
                    u = x[j]
                    if u >= two_q:
                        u -= two_q
                    v = x[j + t]
                    v = v * wi - _mulhi(v, si) * q  # in [0, 2q)
                    x[j] = u + v
                    x[j + t] = u - v + two_q
            m <<= 1
        for j in range(n):
            u = x[j]
            if u >= two_q:
                u -= two_q
            if u >= q:
                u -= q
            x[j] = u


@kernel
def _inverse(a, w, shoup, q, n_inv, n_inv_shoup):  # pragma: no cover
    rows, n = a.shape
    two_q = q + q
    for r in range(rows):
        x = a[r]
        m, t = n >> 1, 1
        while m >= 1:
            for i in range(m):
                wi, si = w[m + i], shoup[m + i]
                first = 2 * i * t
                for j in range(first, first + t):
                    u, v = x[j], x[j + t]
                    s = u + v
                    if s >= two_q:
                        s -= two_q
                    d = u - v + two_q
                    x[j] = s
                    x[j + t] = d * wi - _mulhi(d, si) * q
            m >>= 1
            t <<= 1
        for j in range(n):
            u = x[j]
            u = u * n_inv - _mulhi(u, n_inv_shoup) * q
            if u >= q:
                u -= q
            x[j] = u


@kernel
def _multiply(a, b, shoup, q):  # pragma: no cover - compiled
    rows, n = a.shape
    for r in range(rows):
        x = a[r]
        for j in range(n):
            u = x[j] * b[j] - _mulhi(x[j], shoup[j]) * q
            if u >= q:
                u -= q
            x[j] = u


def shoup(words: np.ndarray, modulus: int) -> np.ndarray:
    """Shoup's precomputed quotients ``floor(w * 2**64 / q)`` of fixed factors ``w < q``."""
    return np.array([(int(w) << 64) // modulus for w in words.tolist()], dtype=np.uint64)


class Transform:
    """The NTT of one ring ``Z_q[X]/(X^N + 1)``; every method works in place on a C-contiguous
    ``(rows, N)`` uint64 array of words below ``q``."""

    def __init__(self, n: int, modulus: int) -> None:
        if n < 2 or n & (n - 1) or (modulus - 1) % (2 * n):
            raise ValueError(f"q = {modulus} is not an NTT prime for N = {n}")
        if modulus.bit_length() > MAX_MODULUS_BITS:
            raise ValueError(f"q must have at most {MAX_MODULUS_BITS} bits")
        self.n, self.modulus = n, modulus
        bits = n.bit_length() - 1
        psi = minimal_root(2 * n, modulus)
        powers = [pow(psi, _bitrev(k, bits), modulus) for k in range(n)]
        inverses = [pow(p, -1, modulus) for p in powers]
        self._w = np.array(powers, dtype=np.uint64)
        self._w_shoup = shoup(self._w, modulus)
        self._w_inv = np.array(inverses, dtype=np.uint64)
        self._w_inv_shoup = shoup(self._w_inv, modulus)
        n_inv = pow(n, -1, modulus)
        self._n_inv = np.uint64(n_inv)
        self._n_inv_shoup = np.uint64((n_inv << 64) // modulus)
        self._q = np.uint64(modulus)

    def forward(self, a: np.ndarray) -> np.ndarray:
        """Coefficients to NTT form (SEAL's order)."""
        _forward(self._rows(a), self._w, self._w_shoup, self._q)
        return a

    def inverse(self, a: np.ndarray) -> np.ndarray:
        """NTT form back to coefficients."""
        _inverse(
            self._rows(a), self._w_inv, self._w_inv_shoup, self._q, self._n_inv, self._n_inv_shoup
        )
        return a

    def multiply(self, a: np.ndarray, factor: np.ndarray, factor_shoup: np.ndarray) -> np.ndarray:
        """``a * factor mod q`` row by row, coefficient-wise (a product of polynomials in NTT
        form); ``factor_shoup`` is ``shoup(factor)``."""
        _multiply(self._rows(a), factor, factor_shoup, self._q)
        return a

    def _rows(self, a: np.ndarray) -> np.ndarray:
        if a.dtype != np.uint64 or a.ndim != 2 or a.shape[1] != self.n:
            raise ValueError(f"expected a (rows, {self.n}) uint64 array")
        if not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError("the transform works in place on a writeable C-contiguous array")
        return a


@cache
def transform(n: int, modulus: int) -> Transform:
    """The (cached) transform of one ring: its tables take a few milliseconds to build."""
    return Transform(n, modulus)


def minimal_root(order: int, modulus: int) -> int:
    """The smallest primitive ``order``-th root of unity mod the prime ``modulus`` (SEAL's
    ``try_minimal_primitive_root``; ``order`` a power of two dividing ``modulus - 1``)."""
    for base in range(2, modulus):
        root = pow(base, (modulus - 1) // order, modulus)
        if pow(root, order // 2, modulus) == modulus - 1:
            break
    else:  # pragma: no cover - every NTT prime has one
        raise ValueError(f"no primitive {order}-th root of unity mod {modulus}")
    # Every primitive root is an odd power of this one; keep the smallest.
    best, square, current = root, root * root % modulus, root
    for _ in range(order // 2 - 1):
        current = current * square % modulus
        best = min(best, current)
    return best


def _bitrev(value: int, bits: int) -> int:
    return int(format(value, f"0{bits}b")[::-1], 2) if bits else 0
