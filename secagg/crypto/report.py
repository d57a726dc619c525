"""A site's training metrics and its evaluation, summed inside the encryption: the server
never reads one site's.

With an integer codec a site's sample count travels in its scale payload's ledger (the FedAvg
total every client reads from the summed scales), and its task's training metrics travel in the
same payload, after the histograms, as a **report**: for each metric, in name order, the
count-weighted value ``X = round(v * n * 2**FRACTION_BITS)``, the count ``n`` and a flag set when
``v`` is not a finite number within ``+-2**VALUE_LIMIT_BITS``. The server adds the reports with
the histograms, without reading them; every client decrypts the same sum and reads each
metric's count-weighted average over the sites (NaN when any site's value was not finite, as a
plaintext average would be). The server learns the averages only when the clients report them
back after decrypting (``FitReply.metrics``), checked to agree.

Integers of up to 112 bits cannot sit in one packed digit (15 bits at the narrowest packing),
so each travels as non-negative 4-bit **limbs**, least significant first, one per value: the
sum of up to 1,024 sites' limbs (``15 x 1,024 = 15,360``) stays inside every packing's summed
digit, and the limb sums recombine into the exact total in Python integers.

Names never travel: every site encodes its own metrics in its own name order, with a 1 saying
it reported and the 32-bit fingerprint of its sorted names (as limbs). When the summed
fingerprint is not the reporting sites' count times a reader's own, the sites reported other
metrics, and the averages are unknown (``Reading.averages`` is None): the names must agree, as
every site of a job runs the same task. A site with nothing to report (no test data) sends
zeros, so that a sum of evaluations still counts every site of the round (the round policy's
threshold holds) while only the evaluating sites weigh in.

The same report is a payload of its own in a round's evaluation phase (``EVALUATION``): every
site that sent the round's update encrypts one after applying the round's aggregate, the server
adds them, and the sites decrypt the sum and report the averages back (``rounds``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from secagg.errors import PayloadError

#: Named metrics a report holds: a task's metrics (``messages.MAX_METRICS``) and its loss.
ENTRIES = 65
#: Bits per limb: 15 x 1,024 sites summed stays inside the narrowest packing's digit.
LIMB_BITS = 4
#: Fixed-point fraction of a count-weighted value.
FRACTION_BITS = 24
#: A site's count (the FedAvg weight) stays below this power of two (``max_client_samples``).
COUNT_BITS = 53
#: Values within +-2**VALUE_LIMIT_BITS are summed; beyond, the metric is NaN for the round.
VALUE_LIMIT_BITS = 31
#: Bits of an offset count-weighted value (always non-negative once offset).
VALUE_BITS = FRACTION_BITS + COUNT_BITS + VALUE_LIMIT_BITS + 1
_FINGERPRINT_BITS = 32


def _limbs(bits: int) -> int:
    return math.ceil(bits / LIMB_BITS)


_VALUE_LIMBS, _COUNT_LIMBS, _PRINT_LIMBS = _limbs(VALUE_BITS), _limbs(COUNT_BITS), 8
#: Limbs per entry: the weighted value, the count, the flag.
_ENTRY = _VALUE_LIMBS + _COUNT_LIMBS + 1
#: Where the entries start: after the reporting flag and the names' fingerprint.
_HEAD = 1 + _PRINT_LIMBS
#: Values of a report (what it adds to a scale payload; an evaluation payload's size).
VALUES = _HEAD + ENTRIES * _ENTRY
_OFFSET = 1 << (VALUE_BITS - 1)


def encode(metrics: Mapping[str, float] | None, count: int = 0) -> np.ndarray:
    """The report of a site that measured ``metrics`` over ``count`` examples (its training
    or test set); zeros for a site with nothing to report (``metrics`` None)."""
    out = np.zeros(VALUES)
    if metrics is None:
        return out
    if len(metrics) > ENTRIES:
        raise PayloadError(f"a report holds at most {ENTRIES} metrics, not {len(metrics)}")
    if not 0 < count < 1 << COUNT_BITS:
        raise PayloadError(f"a report's count must be in [1, 2**{COUNT_BITS}), not {count}")
    out[0] = 1
    out[1:_HEAD] = _split(fingerprint(metrics), _PRINT_LIMBS)
    for index, name in enumerate(sorted(metrics)):
        value, start = metrics[name], _HEAD + index * _ENTRY
        if math.isfinite(value) and abs(value) < 1 << VALUE_LIMIT_BITS:
            weighted = round(value * count * (1 << FRACTION_BITS)) + _OFFSET
            out[start : start + _VALUE_LIMBS] = _split(weighted, _VALUE_LIMBS)
            out[start + _VALUE_LIMBS : start + _ENTRY - 1] = _split(count, _COUNT_LIMBS)
        else:
            out[start + _ENTRY - 1] = 1
    return out


@dataclass(frozen=True)
class Reading:
    """A summed report, read: how many sites reported, the largest summed count of an entry
    (how many examples they claim to have measured over), and the averages by name (None
    when the sites reported other metric names than the reader's)."""

    sites: int
    count: int
    averages: dict[str, float] | None


def read(summed: np.ndarray, names: Mapping[str, object], sites: int) -> Reading:
    """The count-weighted average of each metric over the sites that reported, of the
    ``sites`` whose reports were summed into ``summed``, named as this site's own ``names``.
    Refuses (PayloadError) a sum no honest sites make."""
    summed = np.asarray(summed, dtype=np.float64)
    if summed.shape != (VALUES,) or np.any(summed < 0) or np.any(summed > 15 * sites):
        raise PayloadError(
            "the summed report is out of range: a site encrypted a report no honest site makes",
            "bad-report",
        )
    reporting = int(summed[0])
    own = _split(fingerprint(names), _PRINT_LIMBS)
    if not reporting or not np.array_equal(summed[1:_HEAD], own * reporting):
        return Reading(reporting, 0, None)
    averages: dict[str, float] = {}
    most = 0
    for index, name in enumerate(sorted(names)):
        start = _HEAD + index * _ENTRY
        flagged = int(summed[start + _ENTRY - 1])
        count = _join(summed[start + _VALUE_LIMBS : start + _ENTRY - 1])
        most = max(most, count)
        if flagged or count == 0:
            averages[name] = math.nan
            continue
        weighted = _join(summed[start : start + _VALUE_LIMBS]) - _OFFSET * reporting
        averages[name] = weighted / count / (1 << FRACTION_BITS)
    return Reading(reporting, most, averages)


def fingerprint(names: Mapping[str, object]) -> int:
    """32 bits of SHA-256 over the sorted names."""
    digest = hashlib.sha256("\0".join(sorted(names)).encode()).digest()
    return int.from_bytes(digest[: _FINGERPRINT_BITS // 8], "big")


def _split(number: int, limbs: int) -> np.ndarray:
    mask = (1 << LIMB_BITS) - 1
    return np.array([(number >> (LIMB_BITS * k)) & mask for k in range(limbs)], dtype=np.float64)


def _join(limbs: np.ndarray) -> int:
    return sum(int(limb) << (LIMB_BITS * k) for k, limb in enumerate(limbs))
