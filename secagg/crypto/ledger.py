"""What every payload carries besides the update, so the clients can audit the aggregate.

The server adds updates it cannot read, so only the clients can check what it added, and only
after decrypting. Each client therefore encrypts, next to its update:

- a **tally**: one value per roster member, 1 at its own index and 0 elsewhere. Summed, the
  tallies count every member's contributions: a client sees at once whether an update the
  server lists as added is missing (0), was added twice (2), or was added but not listed.
- its **weight** ``p_i = n_i / N`` (in units of 2**-32): the sum is the divisor of the
  weighted average, right by construction whoever dropped out.
- how many values its quantization **clipped** (integer codecs), so everyone sees the total.
- a **round tag**, a 24-bit hash of the job, round and phase: the sum must be ``tag x
  contributors``, so a ciphertext replayed from another job, round or phase, even with a
  forged envelope, breaks it (and is named ``replayed``).

The ledger holds the same integers whatever the codec, and is checked in one place
(``settle``). On its own it is not a MAC: a server that knows the encoding could add a crafted
ciphertext that leaves it intact. The packed CKKS codec therefore also seals every integer it
encrypts, the ledger's included, with a keyed linear tag (``integrity``) that ``settle``
checks last; plaintext FedAvg has no secret to key one with, and its server can read and
change everything anyway, so there the ledger only catches accidents.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from secagg.crypto.envelope import SERVER, Envelope, Stamp
from secagg.crypto.integrity import MacKey
from secagg.errors import PayloadError

T = TypeVar("T")
S = TypeVar("S")

#: Whole-number values after the tallies: weight units, clipped count, round tag.
TAIL = 3
#: Round tags are below 2**24 + 1: exact in float32, so plaintext sums carry them too.
_ROUND_TAG_BITS = 24
WEIGHT_UNIT = 2.0**32


@dataclass
class Update:
    """What a client encrypts.

    ``values`` is the client's weighted model update ``p_i * (w_i - w_global)`` (float64; for
    an integer codec, already quantized to integers), ``weight`` is ``p_i`` and ``clipped``
    counts the values quantization had to clip.
    """

    values: np.ndarray
    weight: float
    clipped: int = 0


@dataclass(frozen=True)
class Aggregate:
    """A decrypted, audited sum of updates: each field is the total over ``contributors``."""

    values: np.ndarray
    weight: float
    clipped: int
    contributors: tuple[int, ...]


def entries(update: Update, stamp: Stamp) -> tuple[np.ndarray, np.ndarray]:
    """The sender's tally (one value per roster member) and its tail, as float64 integers."""
    tally = np.zeros(stamp.roster)
    tally[stamp.sender] = 1.0
    tail = np.array([np.rint(update.weight * WEIGHT_UNIT), update.clipped, round_tag(stamp)])
    return tally, tail


def round_tag(stamp: Stamp) -> int:
    """The job's, round's, phase's (and attempt's) tag, in ``[1, 2**24]``: what each
    contribution adds."""
    label = b"secagg round tag\0" + stamp.label()
    digest = hashlib.sha256(label).digest()
    return 1 + (int.from_bytes(digest[:4], "big") >> (32 - _ROUND_TAG_BITS))


def settle(
    values: np.ndarray,
    tally: np.ndarray,
    tail: np.ndarray,
    stamp: Stamp,
    contributors: tuple[int, ...],
    *,
    mac: MacKey | None = None,
    precision: type[np.floating] = np.float64,
) -> Aggregate:
    """Check a decrypted sum's ledger against the contributors the server listed.

    ``tally`` and ``tail`` must already be integers (the integer codec decrypts exactly; the
    plaintext codec's are exact in float). With ``mac`` (the packed codec), ``tail`` ends with
    the summed integrity tag, checked last against everything else. ``precision`` is the float
    type the sums travelled in (plaintext float32 rounds large sums). Raises PayloadError
    naming what was wrong.
    """
    limbs = tail[TAIL:]
    tail = tail[:TAIL]
    check_tally(tally, stamp, contributors)
    weight_units, clipped, rounds = (float(v) for v in np.rint(tail))
    tag = round_tag(stamp)
    # Exact for the packed codec; plaintext float32 rounds the sum, and every client the same.
    expected = float(precision(float(precision(tag)) * len(contributors)))
    if rounds != expected:
        raise PayloadError(
            f"the aggregate's round tags add up to {rounds:.0f}, not {tag} x "
            f"{len(contributors)}: it holds a contribution replayed from another job, round "
            "or phase",
            "replayed",
        )
    weight = weight_units / WEIGHT_UNIT
    # Weights are n_i / N: they sum to 1 when every client contributed, less on dropouts;
    # more than 1 means a sample count was misreported, and the headroom is not safe.
    if not 0 < weight <= 1 + 1e-6:
        raise PayloadError(
            f"summed weight {weight:.6g} is outside (0, 1]: the round plan's sample counts "
            "were wrong or the aggregate is damaged",
            "bad-weight",
        )
    if clipped < 0:
        raise PayloadError("the aggregate's clipped count is negative", "tampered")
    if mac is not None:
        mac.verify(stamp, np.concatenate([values, tally]), tail, limbs)
    elif limbs.size:
        raise PayloadError(f"the aggregate's ledger has {limbs.size} extra values", "malformed")
    return Aggregate(values, weight, int(clipped), contributors)


def check_tally(tally: np.ndarray, stamp: Stamp, contributors: tuple[int, ...]) -> None:
    """Refuse a summed tally that does not count each listed contributor exactly once,
    naming a duplicated, dropped or unlisted contribution."""
    listed = np.zeros(stamp.roster)
    listed[list(contributors)] = 1.0
    counts = np.rint(tally)
    if not np.array_equal(counts, listed):
        missing = [int(i) for i in np.flatnonzero((listed == 1) & (counts == 0))]
        twice = [int(i) for i in np.flatnonzero(counts > 1)]
        unlisted = [int(i) for i in np.flatnonzero((listed == 0) & (counts == 1))]
        if twice:
            raise PayloadError(
                f"the aggregate holds client(s) {twice} more than once: a contribution was "
                "duplicated",
                "duplicate",
            )
        if missing:
            raise PayloadError(
                f"the aggregate lacks the update of client(s) {missing} although the server "
                "lists them: a contribution was dropped",
                "dropped",
            )
        detail = f"client(s) {unlisted} unlisted" if unlisted else "a tally that is not 0 or 1"
        raise PayloadError(
            f"the aggregate's contributor tally does not match the server's list ({detail})",
            "tampered",
        )


def admit(
    sender: int,
    seen: list[int],
    allowed: frozenset[int] | None = None,
) -> None:
    """The server's check before adding an update: one per client per round, and
    (``allowed``) only from clients that took part in the round's scale exchange."""
    if allowed is not None and sender not in allowed:
        raise PayloadError(
            f"client {sender} did not take part in this round's scale exchange, so its update "
            "could overflow the agreed quantization steps; it is refused",
            "not-in-round",
        )
    if sender in seen:
        raise PayloadError(
            f"client {sender} already contributed to this round; a duplicate or replayed "
            "update is refused",
            "duplicate",
        )


def check_length(values: int, expected: int | None) -> None:
    """Refuse a payload whose value count is not the round's (the job's model decides it,
    never a payload: a wrong first payload must not get the honest ones refused)."""
    if expected is not None and values != expected:
        raise PayloadError(
            f"payload has {values} values, the round has {expected} (the job's model)",
            "wrong-length",
        )


def accumulate(
    payloads: Iterable[T],
    open_update: Callable[[T], Envelope],
    add: Callable[[S | None, Envelope], S],
    allowed: frozenset[int] | None = None,
    most: int | None = None,
) -> tuple[S, int, tuple[int, ...]]:
    """The server's streaming sum, whatever the codec: open each payload as it arrives
    (``open_update`` checks it, its length against the round's included), admit it
    (``admit``; at most ``most`` of them), add it; return the total, the number of values and
    the contributors in order. Without a length to check against, the first payload's is
    taken (callers that sum payloads they made themselves; the round loop always passes one)."""
    total: S | None = None
    values: int | None = None
    senders: list[int] = []
    for payload in payloads:
        opened = open_update(payload)
        admit(opened.stamp.sender, senders, allowed)
        check_length(opened.values, values)
        if most is not None and len(senders) >= most:
            raise PayloadError(
                f"a round sums at most {most} clients; more could overflow the codec's headroom",
                "too-many",
            )
        total = add(total, opened)
        values = opened.values
        senders.append(opened.stamp.sender)
        del opened, payload
    if total is None or values is None:
        raise PayloadError("no payloads to sum", "empty")
    return total, values, tuple(sorted(senders))


class Checked:
    """Updates a server cipher has checked as they arrived, until its sum adds them.

    A network server checks each upload on the thread that receives it, as it arrives, so a
    bad one is refused (and its site named) at once, and many are checked at the same time;
    the round's sum then only adds. A payload is known by identity: ``bytes`` cannot change
    after they were checked. A payload checked with its sender's stamp also passes for the
    round's (the sender's is the stricter check). Only one round's payloads are kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._round: tuple[bytes, int] | None = None
        self._opened: dict[int, tuple[bytes, Stamp, int | None, Envelope]] = {}

    def check(
        self,
        payload: bytes | memoryview,
        stamp: Stamp,
        values: int | None,
        check: Callable[[], Envelope],
    ) -> Envelope:
        """``check()``'s envelope of ``payload``, checked once."""
        found = self._find(payload, stamp, values, remove=False)
        if found is not None:
            return found
        opened = check()
        if isinstance(payload, bytes):
            with self._lock:
                if self._round != (stamp.job, stamp.round_num):
                    self._opened.clear()
                    self._round = (stamp.job, stamp.round_num)
                self._opened[id(payload)] = (payload, stamp, values, opened)
        return opened

    def take(
        self, payload: bytes | memoryview, stamp: Stamp, values: int | None
    ) -> Envelope | None:
        """The envelope of a payload checked for ``stamp`` and ``values`` (forgotten now), or
        None when it was not."""
        return self._find(payload, stamp, values, remove=True)

    def _find(
        self, payload: bytes | memoryview, stamp: Stamp, values: int | None, *, remove: bool
    ) -> Envelope | None:
        with self._lock:
            entry = self._opened.get(id(payload))
            if entry is None or entry[0] is not payload or entry[2] != values:
                return None
            checked = entry[1]
            same = checked.for_sender(SERVER) == stamp.for_sender(SERVER)
            if not same or stamp.sender not in (SERVER, checked.sender):
                return None
            if remove:
                del self._opened[id(payload)]
            return entry[3]
