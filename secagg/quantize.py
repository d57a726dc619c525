"""Quantization of model updates for the packed codec, with steps every client derives alike.

Integers from different clients can only be added if every client used the same quantization
step, and the sum must stay inside the packed digit. So each round starts with a **scale
exchange**: every client splits its change to the global model ``d_i = w_i - w_global`` into
blocks (``BLOCK`` values, never across tensors), and encrypts, for each block, a one-hot
histogram of ``e_i = ceil(log2(n_i * max |d_i|))`` over ``BINS`` exponents, ``n_i`` its sample
count, with ``n_i`` itself in the scale payload's ledger. The server adds them without reading
them; every client decrypts the same sums, ``H`` and ``N = sum n_i``, and derives for each block
``S = sum_e H[e] * 2**e``, an upper bound of ``sum_i n_i max |d_i|`` within a factor of two, and
the step ``S / N / (limit - ceil(c / 2))`` for ``c`` contributing clients.

A client reports ``n_i`` times its change because its FedAvg weight ``p_i = n_i / N`` is only
known once every client has trained and reported its count. The step can never overflow: a
client sends ``v_i = p_i * d_i`` rounded on the step, within ``n_i max |d_i| / (N step) + 1/2``
of zero, so the sum is within ``S / (N step) + c / 2 <= limit``. Nothing is clipped (except
values beyond ``2**E_MAX / N``, which only a diverged training produces; they are clipped and
counted). And the step adapts to every block in every round, the first one included, with no
state carried between rounds: a client that rejoins needs nothing but the round's two
aggregates.

Precision: rounding adds at most ``c / 2`` steps to each summed value, typically ``sqrt(c /
12)`` steps. With clients of similar updates that is about ``2 * sqrt(c / 12) / limit`` of the
block's largest weighted change (about 2e-4 for 8 clients); the average divides by the total
weight (1 when every client contributed).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from secagg.crypto import report
from secagg.errors import PayloadError

if TYPE_CHECKING:  # the server imports this module to size the scale exchange: no torch
    from secagg.flatten import Layout

#: Values per block: one quantization step each. Blocks never straddle two tensors.
BLOCK = 4096
#: Exponent range of the magnitude histogram (of a client's sample count times its largest
#: change in a block): smaller share the lowest bin; beyond 2**E_MAX is clipped.
E_MIN, E_MAX = -48, 40
BINS = E_MAX - E_MIN + 1


def block_sizes(layout: Layout) -> np.ndarray:
    """Sizes of the quantization blocks of ``layout``, in order: tensor-aligned, BLOCK at most."""
    return blocks_of(entry.size for entry in layout.entries)


def blocks_of(tensor_sizes: Iterable[int]) -> np.ndarray:
    """Sizes of the quantization blocks of tensors of ``tensor_sizes`` values, in order."""
    sizes: list[int] = []
    for size in tensor_sizes:
        full, rest = divmod(size, BLOCK)
        sizes += [BLOCK] * full + ([rest] if rest else [])
    return np.asarray(sizes, dtype=np.int64)


def histogram_values(tensor_sizes: Iterable[int]) -> int:
    """How many values a scale-exchange payload carries for a model of ``tensor_sizes``: the
    histograms, then the site's training report (``secagg.crypto.report``)."""
    return int(blocks_of(tensor_sizes).size) * BINS + report.VALUES


def histogram(
    values: np.ndarray, sizes: np.ndarray, factor: float = 1.0, peak: float | None = None
) -> np.ndarray:
    """One-hot (blocks x BINS, flattened) of each block's magnitude exponent ``ceil(log2 max)``
    of ``factor x values`` (``factor > 0``), with no scaled or absolute copy of ``values``:
    rounding is monotonic, so the largest scaled magnitude is the largest magnitude scaled.
    ``peak``: every block's largest magnitude instead (a bound that says nothing of the data,
    as differential privacy's clipping bound)."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if peak is not None:
        peaks = np.full(sizes.size, peak * factor)
    elif values.size:
        highest = np.maximum.reduceat(values, starts)
        peaks = np.maximum(highest, -np.minimum.reduceat(values, starts)) * factor
    else:
        peaks = np.empty(0)
    _, exponents = np.frexp(peaks)  # peak < 2**exponent (peak = 0 gives exponent 0)
    bins = np.clip(exponents - E_MIN, 0, BINS - 1)
    bins[peaks == 0] = 0
    onehot = np.zeros((sizes.size, BINS))
    onehot[np.arange(sizes.size), bins] = 1.0
    return onehot.reshape(-1)


def steps(summed: np.ndarray, clients: int, limit: int, total: float = 1.0) -> np.ndarray:
    """Each block's step from the summed histograms of ``clients`` clients: the bound on the
    sum of what they reported (each bin's count times its power of two), divided by ``total``
    (the round's sample count: clients report ``n_i x`` their change), over the room ``limit``
    leaves after rounding.

    ``limit`` is the largest magnitude a summed integer may reach (the packed digit's).
    Refuses (PayloadError ``bad-scales``) histograms no ``clients`` honest clients could sum
    to: each client adds one count per block, so every block's counts are non-negative and
    add up to ``clients``.
    """
    counts = summed.reshape(-1, BINS)
    if counts.size and (counts.min() < 0 or np.any(counts.sum(axis=1) != clients)):
        raise PayloadError(
            f"the summed scale histograms are not {clients} non-negative counts per block: a "
            "site sent a histogram no honest site sends (the sum passed its integrity tag)",
            "bad-scales",
        )
    # Exact products summed in numpy's fixed pairwise order (not BLAS, whose order varies by
    # machine): every client derives bit-identical steps.
    bound = np.sum(counts * np.exp2(np.arange(E_MIN, E_MAX + 1, dtype=np.float64)), axis=1)
    return bound / total / (limit - (clients + 1) // 2)


def quantize(
    values: np.ndarray, block_steps: np.ndarray, sizes: np.ndarray, limit: float = 2.0**E_MAX
) -> tuple[np.ndarray, int]:
    """Values to integers on the agreed steps, in place; return them and the clipped count
    (values beyond ``limit``: ``2**E_MAX / N`` for a client's weighted change, what the
    largest histogram bin covers; only a diverged training reaches it).

    In numpy: clip to ``[-limit, limit]``, divide by ``np.repeat(block_steps, sizes)``,
    ``np.rint``; done in one compiled pass, bit for bit the same (a test checks)."""
    from secagg.crypto.codec import quantize_blocks  # numba: clients only

    return values, quantize_blocks(values, block_steps, sizes, limit)


def dequantize(values: np.ndarray, block_steps: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Summed integers back to values: the inverse scaling of ``quantize``, in place (as
    ``values *= np.repeat(block_steps, sizes)``, in one compiled pass)."""
    from secagg.crypto.codec import scale_blocks  # numba: clients only

    scale_blocks(values, block_steps, sizes)
    return values
