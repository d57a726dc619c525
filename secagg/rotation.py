"""The randomized Hadamard rotation a DP client applies to its update before rounding it
(``secagg.privacy``: why, and the bound it gives), compiled (numba).

A chunk of ``ROTATION`` values has its signs flipped by the round's shared random signs, then
goes through the normalized Walsh-Hadamard transform. Both are orthogonal, so the norm and the
noise's distribution are kept; the transform, divided by ``sqrt(ROTATION)`` (32: exact in
floating point), is its own inverse.
"""

from __future__ import annotations

import hashlib

import numpy as np

from secagg.crypto.ring import kernel
from secagg.privacy import ROTATION


def rotation_signs(label: bytes, size: int) -> np.ndarray:
    """The round's random signs (``+-1.0``, ``size`` of them) from its public ``label``: the
    same on every client, independent of any update."""
    digest = hashlib.shake_256(b"secagg dp rotation\0" + label).digest((size + 7) // 8)
    bits = np.unpackbits(np.frombuffer(digest, dtype=np.uint8))[:size]
    return 1.0 - 2.0 * bits


def rotate(values: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """The rotation of ``values`` (a whole number of ``ROTATION`` chunks): each chunk's signs
    flipped by ``signs``, then its normalized Walsh-Hadamard transform (a new array)."""
    out = _chunked(values) * signs
    _hadamard(out, ROTATION)
    out *= 1 / np.sqrt(ROTATION)
    return out


def unrotate(values: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``rotate``'s inverse (a new array)."""
    out = _chunked(values).copy()
    _hadamard(out, ROTATION)
    out *= signs / np.sqrt(ROTATION)
    return out


def _chunked(values: np.ndarray) -> np.ndarray:
    if values.size % ROTATION:
        raise ValueError(
            f"a rotated update must be a whole number of {ROTATION}-value chunks, not "
            f"{values.size} values (size it with flatten.payload_layout)"
        )
    return np.ascontiguousarray(values, dtype=np.float64)


@kernel
def _hadamard(values, chunk):  # pragma: no cover - compiled
    """Each ``chunk`` of ``values``, in place, through the unnormalized Walsh-Hadamard
    transform (Sylvester's order)."""
    for start in range(0, values.size, chunk):
        width = 1
        while width < chunk:
            for block in range(start, start + chunk, 2 * width):
                for i in range(block, block + width):
                    a = values[i]
                    b = values[i + width]
                    values[i] = a + b
                    values[i + width] = a - b
            width *= 2
