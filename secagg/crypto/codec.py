"""The packed codec's client-side passes, compiled (numba): quantizing a change on the agreed
steps, packing its integers into ciphertext words (``Delta m``, added to an encryption of zero)
and, from a decrypted sum, the summed integers back, each in one pass. Each refusal names what
it refuses (the offending value, or why a sum does not decode), so there is one implementation
of each operation; the tests hold the step-by-step numpy versions as oracles
(``tests/oracles.py``) and check these bit for bit against them.

``packing`` holds the packing's parameters (shared with the server, which never imports this).
"""

from __future__ import annotations

import numba
import numpy as np

from secagg.crypto.packing import PackedParams
from secagg.crypto.ring import kernel
from secagg.crypto.seal_format import NOISE_BOUND
from secagg.errors import PayloadError

# --- quantization on the agreed steps (``secagg.quantize`` calls these) ---


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


# --- packing, encoding and adding in one pass, and back ---

#: ``pack_add``'s and ``open_sum``'s verdicts.
OK, BAD_VALUE, BAD_TAIL, NOT_INTEGER, OUT_OF_RANGE = 0, 1, 2, 3, 4


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
                    return BAD_VALUE, index
                digit = np.int64(value)
            packed = (packed << bits) + digit
        _add_scaled(c0, slot, packed, scale_bits, modulus)
    for t in range(tail.size):
        value = tail[t]
        if not abs(value) < tail_limit or value != np.floor(value):
            return BAD_TAIL, t
        _add_scaled(c0, body + t, np.int64(value), scale_bits, modulus)
    return OK, 0


def pack_add(
    c0: np.ndarray, values: np.ndarray, tail: np.ndarray, packing: PackedParams, modulus: int
) -> None:
    """Pack integer ``values`` (float64; ``packing.values_per_slot`` balanced digits per slot)
    and whole-slot ``tail`` integers, scale them by ``2**scale_bits`` and add them mod
    ``modulus`` to the ``c0`` words (flat, slot ``i`` at word ``i``), in one pass. Refuses
    (PayloadError, naming the first offending value) a value that is not a finite integer in
    the packable range; then ``c0`` is partly changed, and the caller discards it."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    tail = np.ascontiguousarray(tail, dtype=np.float64)
    verdict, at = _pack_add(
        c0,
        values,
        tail,
        np.int64(packing.values_per_slot),
        np.int64(packing.digit_bits),
        np.int64(packing.scale_bits),
        np.int64(modulus),
        np.float64(packing.digit_limit),
        np.float64(packing.tail_limit),
    )
    if verdict == BAD_VALUE:
        raise _unpackable(float(values[at]), "quantized value", f"+-{packing.digit_limit - 1}")
    if verdict == BAD_TAIL:
        raise _unpackable(float(tail[at]), "tail value", f"+-{packing.tail_limit - 1}")


def _unpackable(value: float, what: str, limit: str) -> PayloadError:
    """Why ``value`` cannot be packed, in words."""
    if not np.isfinite(value):
        return PayloadError(f"{what} is NaN or infinite")
    if value != np.floor(value):
        return PayloadError(f"{what}s must be integers for the packed codec (quantize first)")
    return PayloadError(f"{what} {abs(value):.0f} is outside the packable range of {limit}")


@kernel
def _open_sum(
    c0, product, modulus, scale_bits, bound, k, bits, values, slots, tail, digits, whole, strict
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
            outside = not (digit < limit and digit >= -limit) or (at >= values and digit != 0)
            if outside and strict:
                return OUT_OF_RANGE
            if at < values:
                digits[at] = digit
    return OK


def open_sum(
    c0: np.ndarray,
    product: np.ndarray,
    modulus: int,
    contributors: int,
    packing: PackedParams,
    values: int,
    tail: int,
    *,
    check_range: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Decrypt and unpack a sum in one pass: ``c0 + c1 s`` (``product``) mod ``modulus``,
    centered, divided by the scale to integers (off by at most the noise of ``contributors``
    ciphertexts), split into ``values`` balanced digits and ``tail`` whole integers. Returns
    (digits, tail).

    Refuses (PayloadError ``not-integer``) a coefficient further from a multiple of the scale
    than the summed noise can be, beyond any sum's magnitude, or non-zero past the slots: what
    another key, a damaged or forged ciphertext or an overflowing sum decrypts to. Refuses
    (``out-of-range``) a slot whose digits leave the summed range ``[-digit_limit,
    digit_limit)`` or whose padding is not zero: no honest sum makes one, and each slot then
    decodes to one set of digits. ``check_range=False`` decodes such a slot anyway, only to
    diagnose it."""
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
        check_range,
    )
    if verdict == NOT_INTEGER:
        raise PayloadError(
            "aggregate does not decrypt to integers (noise or overflow); it was made with "
            "other keys, corrupted or forged, left masked (a contribution masked for another "
            "attempt of the round, replayed), or summed more clients than the codec allows",
            "not-integer",
        )
    if verdict == OUT_OF_RANGE:
        raise PayloadError(
            "aggregate holds a packed digit outside the summed range, or non-zero padding: "
            "it overflowed or was forged",
            "out-of-range",
        )
    return digits, whole
