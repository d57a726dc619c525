"""Quantization of model updates for integer codecs, with a scale every client derives alike.

A client's weighted update ``p_i * (w_i - w_global)`` becomes integers ``round(x / step)``
within ``p_i * L`` (L from the codec). The step is per tensor and must be the same on every
client, or the integers could not be added; it is derived only from what every client already
holds, bit for bit, after decrypting the last round:

- the last global update ``U`` (the previous round's decrypted aggregate): a tensor's range is
  ``GROWTH`` times the largest change any of its values made last round;
- in the first round (and for a tensor that did not move), ``FIRST_RANGE`` times the largest
  magnitude of the tensor in the global model, so an update may move a weight by that much.

Values beyond the range are clipped to it and counted; the count travels encrypted with the
update and every client sees the total. A round that clipped widens the next round's ranges
(``GROWTH`` doubles for each such round), so the scale adapts instead of clipping again.

With L = 2**13 - 1 - clients/2 (14-bit digits), the quantization error of the aggregate is at
most ``clients / 2`` steps, that is about ``clients / 2**14`` of a tensor's range, and its
typical size is ``0.3 * sqrt(clients)`` steps.
"""

from __future__ import annotations

import numpy as np

from secagg.flatten import Layout

#: A tensor's range is this many times its largest change in the last global update.
GROWTH = 4.0
#: Range in the first round: this many times the tensor's largest magnitude.
FIRST_RANGE = 8.0
#: Range of a tensor that is all zeros and never moved (e.g. a counter before training).
DEFAULT_RANGE = 1.0


def tensor_ranges(
    layout: Layout,
    global_vector: np.ndarray,
    last_update: np.ndarray | None,
    clipped_rounds: int = 0,
) -> np.ndarray:
    """Clipping range of each tensor of ``layout`` (one value per entry)."""
    growth = GROWTH * 2.0**clipped_rounds
    ranges = np.empty(len(layout.entries))
    for index, entry in enumerate(layout.entries):
        part = slice(entry.offset, entry.offset + entry.size)
        moved = float(np.abs(last_update[part]).max(initial=0.0)) if last_update is not None else 0
        if moved > 0:
            ranges[index] = growth * moved
        else:
            size = float(np.abs(global_vector[part]).max(initial=0.0))
            ranges[index] = FIRST_RANGE * size if size > 0 else DEFAULT_RANGE
    return ranges


def quantize(
    values: np.ndarray, weight: float, layout: Layout, ranges: np.ndarray, bound: int
) -> tuple[np.ndarray, int]:
    """Weighted values to integers within ``weight * bound``; return them and the clipped count.

    A tensor's values are scaled by ``bound / range``, so a value of ``weight * range`` maps to
    the largest integer a client may send. Works in place on ``values``.
    """
    for entry, scale in zip(layout.entries, bound / ranges, strict=True):
        values[entry.offset : entry.offset + entry.size] *= scale
    limit = weight * bound
    clipped = int(np.count_nonzero(values > limit) + np.count_nonzero(values < -limit))
    np.clip(values, -limit, limit, out=values)
    return np.rint(values, out=values), clipped


def dequantize(values: np.ndarray, layout: Layout, ranges: np.ndarray, bound: int) -> np.ndarray:
    """Integers back to values: the inverse scaling of ``quantize``, in place."""
    for entry, step in zip(layout.entries, ranges / bound, strict=True):
        values[entry.offset : entry.offset + entry.size] *= step
    return values
