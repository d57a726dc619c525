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
def _dot_halves(low, high, values, block, modulus):  # pragma: no cover - compiled
    lo_total = 0
    hi_total = 0
    n = values.size
    for start in range(0, n, block):
        lo_part = 0
        hi_part = 0
        for i in range(start, min(start + block, n)):
            value = np.int64(values[i])
            lo_part += low[i] * value
            hi_part += high[i] * value
        lo_total = (lo_total + lo_part % modulus) % modulus
        hi_total = (hi_total + hi_part % modulus) % modulus
    return lo_total, hi_total


def dot_halves(
    low: np.ndarray, high: np.ndarray, values: np.ndarray, block: int, modulus: int
) -> tuple[int, int]:
    """``(sum(low * values) mod modulus, sum(high * values) mod modulus)`` exactly, in one
    pass: ``low`` and ``high`` integers (int32 here) in ``[0, 2**31)``, ``values`` integers
    (float64) small enough that ``block`` products add up within int64 (the caller's bound)."""
    lo, hi = _dot_halves(low, high, values, np.int64(block), np.int64(modulus))
    return int(lo), int(hi)
