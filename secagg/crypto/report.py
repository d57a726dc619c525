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

Names never travel: each metric sits in the entry its name hashes to (the next free one when
two of a site's names hash alike, in name order), with a 1 saying a site reported it and the
32-bit fingerprint of its name (as limbs). A reader finds each of its own names where it would
have put it, and reads it only when the summed fingerprint is the entry's reporters times its
own: so sites may report different metrics (a site whose test set has one class reports no
AUC), and each metric is averaged over the sites that reported it, as a plaintext average is;
an entry where two names met (sites whose names collided differently) reads NaN. A site with
nothing to report (no test data) sends zeros, so that a sum of evaluations still counts every
site of the round (the round policy's threshold holds) while only the evaluating sites weigh
in.

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
#: Limbs per entry: the weighted value, the count, the not-finite flag, the reported flag and
#: the name's fingerprint.
_ENTRY = _VALUE_LIMBS + _COUNT_LIMBS + 2 + _PRINT_LIMBS
_FLAG, _REPORTED, _PRINT = (
    _VALUE_LIMBS + _COUNT_LIMBS,
    _VALUE_LIMBS + _COUNT_LIMBS + 1,
    _ENTRY - _PRINT_LIMBS,
)
#: Where the entries start: after the flag saying the site reported.
_HEAD = 1
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
    for name, slot in _entries(metrics).items():
        value, start = metrics[name], _HEAD + slot * _ENTRY
        entry = out[start : start + _ENTRY]
        entry[_REPORTED] = 1
        entry[_PRINT:] = _split(fingerprint(name), _PRINT_LIMBS)
        if math.isfinite(value) and abs(value) < 1 << VALUE_LIMIT_BITS:
            weighted = round(value * count * (1 << FRACTION_BITS)) + _OFFSET
            entry[:_VALUE_LIMBS] = _split(weighted, _VALUE_LIMBS)
            entry[_VALUE_LIMBS:_FLAG] = _split(count, _COUNT_LIMBS)
        else:
            entry[_FLAG] = 1
    return out


@dataclass(frozen=True)
class Reading:
    """A summed report, read: how many sites reported, the largest summed count of an entry
    (how many examples they claim to have measured over), and the averages by name (None
    when no site reported)."""

    sites: int
    count: int
    averages: dict[str, float] | None


def read(summed: np.ndarray, names: Mapping[str, object], sites: int) -> Reading:
    """The count-weighted average of each metric over the sites that reported it, of the
    ``sites`` whose reports were summed into ``summed``, for this site's own ``names`` (NaN
    where a site's value was not finite, or where sites' names met in one entry). Refuses
    (PayloadError) a sum no honest sites make."""
    summed = np.asarray(summed, dtype=np.float64)
    if summed.shape != (VALUES,) or np.any(summed < 0) or np.any(summed > 15 * sites):
        raise PayloadError(
            "the summed report is out of range: a site encrypted a report no honest site makes",
            "bad-report",
        )
    reporting = int(summed[0])
    if not reporting:
        return Reading(0, 0, None)
    averages: dict[str, float] = {}
    most = 0
    for name, slot in _entries(names).items():
        entry = summed[_HEAD + slot * _ENTRY : _HEAD + (slot + 1) * _ENTRY]
        reporters = int(entry[_REPORTED])
        if not reporters:
            continue
        count = _join(entry[_VALUE_LIMBS:_FLAG])
        most = max(most, count)
        mixed = _join(entry[_PRINT:]) != reporters * fingerprint(name)
        if mixed or entry[_FLAG] or count == 0:
            averages[name] = math.nan
            continue
        weighted = _join(entry[:_VALUE_LIMBS]) - _OFFSET * reporters
        averages[name] = weighted / count / (1 << FRACTION_BITS)
    return Reading(reporting, most, averages)


def fingerprint(name: str) -> int:
    """32 bits of SHA-256 over a metric's name."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[: _FINGERPRINT_BITS // 8], "big")


def _entries(names: Mapping[str, object]) -> dict[str, int]:
    """Each name's entry: the one its fingerprint names, or the next free one (in name
    order), so that sites with the same names place them alike, and others mostly do."""
    taken: dict[str, int] = {}
    used: set[int] = set()
    for name in sorted(names):
        slot = fingerprint(name) % ENTRIES
        while slot in used:
            slot = (slot + 1) % ENTRIES
        taken[name] = slot
        used.add(slot)
    return taken


def _split(number: int, limbs: int) -> np.ndarray:
    mask = (1 << LIMB_BITS) - 1
    return np.array([(number >> (LIMB_BITS * k)) & mask for k in range(limbs)], dtype=np.float64)


def _join(limbs: np.ndarray) -> int:
    return sum(int(limb) << (LIMB_BITS * k) for k, limb in enumerate(limbs))
