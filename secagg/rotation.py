"""The randomized Hadamard rotation a DP client applies to its update before rounding it
(``secagg.privacy``: why, and the bound it gives), compiled (numba).

A chunk of ``ROTATION`` values has its signs flipped by the round's shared random signs, then
goes through the normalized Walsh-Hadamard transform. Both are orthogonal, so the norm and the
noise's distribution are kept; the transform, divided by ``sqrt(ROTATION)`` (32: exact in
floating point), is its own inverse.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from secagg.crypto.ring import kernel
from secagg.privacy import ROTATION


@lru_cache(maxsize=8)
def rotation_signs(label: bytes, size: int) -> np.ndarray:
    """The round's random signs (``+-1.0``, ``size`` of them, read-only) from its public
    ``label``: the same on every client, independent of any update; computed once per
    process for the clients it simulates."""
    digest = hashlib.shake_256(b"secagg dp rotation\0" + label).digest((size + 7) // 8)
    bits = np.unpackbits(np.frombuffer(digest, dtype=np.uint8))[:size]
    signs = 1.0 - 2.0 * bits
    signs.setflags(write=False)
    return signs


def rotate(values: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """The rotation of ``values`` (a whole number of ``ROTATION`` chunks): each chunk's signs
    flipped by ``signs``, then its normalized Walsh-Hadamard transform (a new array)."""
    out = np.empty(_chunked(values, signs).size)
    _rotate(np.ascontiguousarray(values, dtype=np.float64), signs, out, ROTATION, True)
    return out


def unrotate(values: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``rotate``'s inverse (a new array)."""
    out = np.empty(_chunked(values, signs).size)
    _rotate(np.ascontiguousarray(values, dtype=np.float64), signs, out, ROTATION, False)
    return out


def _chunked(values: np.ndarray, signs: np.ndarray) -> np.ndarray:
    if signs.shape != (values.size,):
        raise ValueError(f"{values.size} values need as many signs, not {signs.size}")
    if values.size % ROTATION:
        raise ValueError(
            f"a rotated update must be a whole number of {ROTATION}-value chunks, not "
            f"{values.size} values (size it with flatten.payload_layout)"
        )
    return values


@kernel
def _rotate(values, signs, out, chunk, forward):  # pragma: no cover - compiled
    """``out``: each ``chunk`` of ``values`` with its signs flipped by ``signs`` before
    (``forward``) or after the unnormalized Walsh-Hadamard transform (Sylvester's order),
    divided by ``sqrt(chunk)``; one chunk at a time, while it is in cache. ``chunk`` is a
    power of four, so the division is by a power of two: exact, in any order."""
    scale = 1.0 / np.sqrt(chunk)
    for start in range(0, values.size, chunk):
        for i in range(start, start + chunk):
            out[i] = values[i] * scale * (signs[i] if forward else 1.0)
        width = 1
        while width < chunk:
            for block in range(start, start + chunk, 2 * width):
                for i in range(block, block + width):
                    a = out[i]
                    b = out[i + width]
                    out[i] = a + b
                    out[i + width] = a - b
            width *= 2
        if not forward:
            for i in range(start, start + chunk):
                out[i] *= signs[i]
