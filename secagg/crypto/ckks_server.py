"""The server side of CKKS: adds ciphertexts as numbers mod q. It imports no TenSEAL.

A ciphertext travels as the coefficients of its ``c0`` (``rlwe``: N words, each below q, 60 bits
apiece on the wire, ``seal_format.to_wire``) and,
for its uniformly random ``c1``, a seed (``seeded``: one per payload). Two ciphertexts add
coefficient by coefficient mod the data prime ``q``: that is all SEAL's own ``add`` does. So the
server adds the ``c0`` words and lists each contributor's seed next to its id; the clients
expand the seeds into the summed ``c1`` themselves. The server needs only the public
parameters (N and q, read from ``server.ctx``), never parses bytes with a C++ library, and
cannot be crashed by a crafted payload: every word is checked to be below ``q`` before it is
added. The codec description both sides must agree on
(``codec_for``, ``blobs_for``) lives here too, because the client side imports TenSEAL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from secagg.crypto import envelope, integrity, ledger, masking, seal_format, shares
from secagg.crypto.envelope import AGGREGATE, SERVER, UPDATE, Stamp
from secagg.crypto.masking import Reveal
from secagg.crypto.packing import PACKED, PACKINGS, PackedParams, packing_for
from secagg.crypto.params import Keys
from secagg.crypto.seal_format import CiphertextShape
from secagg.crypto.seeded import SEED_BYTES
from secagg.errors import KeyFileError, PayloadError

#: 3: integers in the plaintext's coefficients (2: in CKKS slots, half as many per ciphertext)
CODEC_ID = 3
#: The most values a payload may declare: a 2-billion-parameter model.
MAX_VALUES = 1 << 31
#: Whole-number slots after the packed values and tally: the ledger's, then the integrity tag.
TAIL = ledger.TAIL + integrity.SLOTS


def codec_for(keys: Keys, packed: PackedParams = PACKED) -> tuple[envelope.Codec, CiphertextShape]:
    """The envelope codec and ciphertext shape of the packed CKKS codec under ``keys``."""
    shape = seal_format.shape_of_context(keys.context)
    packed.check(shape.modulus.bit_length())
    settings = bytes(
        [
            packed.values_per_slot,
            packed.digit_bits,
            packed.scale_bits,
            shape.poly_modulus_degree.bit_length() - 1,
        ]
    )
    return envelope.Codec(CODEC_ID, keys.fingerprint, settings, SEED_BYTES), shape


def blobs_for(
    shape: CiphertextShape, roster: int, packing: PackedParams
) -> Callable[[int], tuple[int, int]]:
    """(ciphertext count, bytes per ciphertext) of a payload of ``values`` update values in a
    round of ``roster`` clients packed by ``packing``: a ciphertext carries N packed slots and
    travels as its ``c0`` alone, N words (its ``c1`` is the payload's seed)."""

    def layout(values: int) -> tuple[int, int]:
        slots = packing.slots_for(values + roster, TAIL)
        return math.ceil(slots / shape.poly_modulus_degree), shape.c0_nbytes

    return layout


class RoundFormat:
    """What a round's payloads look like under one key set and precision (``standard`` or
    ``fine``, see ``packing``): the packing (from the round's size), the envelope codec and the
    ciphertext layout. Client and server build the same one."""

    def __init__(self, keys: Keys, precision: str) -> None:
        self.precision = precision
        self._codecs = {p: codec_for(keys, p)[0] for p in PACKINGS}
        #: the codec of rounds of up to 128 clients
        self.codec, self.shape = codec_for(keys, packing_for(1, precision))

    def packing(self, stamp: Stamp) -> PackedParams:
        return packing_for(stamp.roster, self.precision)

    def codec_for(self, stamp: Stamp) -> envelope.Codec:
        return self._codecs[self.packing(stamp)]

    def blobs(self, stamp: Stamp) -> Callable[[int], tuple[int, int]]:
        return blobs_for(self.shape, stamp.roster, self.packing(stamp))

    def open(self, payload: bytes | memoryview, stamp: Stamp, kind: int) -> envelope.Envelope:
        """A payload's envelope, checked against ``stamp``'s round and its layout."""
        return envelope.from_bytes(
            payload,
            self.codec_for(stamp),
            stamp,
            kind,
            blobs_for=self.blobs(stamp),
            max_values=MAX_VALUES,
        )


class CkksServer:
    """Adds packed-CKKS payloads; refuses any context that holds a secret key.

    ``precision`` (``standard`` or ``fine``, see ``packing``) must be the clients' own: it
    sets how many values a ciphertext carries."""

    name = "ckks-packed"
    quantizes = True

    def __init__(self, keys: Keys, precision: str = "standard") -> None:
        if seal_format.context_has_secret_key(keys.context):
            raise KeyFileError(
                "the server was given a context with the secret key; it must only ever load "
                "the public context (keys/server.ctx)"
            )
        self._format = RoundFormat(keys, precision)
        self.codec, self._shape = self._format.codec, self._format.shape
        #: updates checked as they arrived (``check``), which the sum does not check again
        self._checked = ledger.Checked()

    def codec_for_round(self, stamp: Stamp) -> envelope.Codec:
        """The envelope codec of ``stamp``'s round (its packing depends on the round's size)."""
        return self._format.codec_for(stamp)

    def size(self, values: int, stamp: Stamp) -> int:
        """The byte length of an update of ``values`` values for ``stamp``'s round."""
        count, size = self._format.blobs(stamp)(values)
        return envelope.update_size(count, size, SEED_BYTES)

    def check(
        self, payload: bytes | memoryview, stamp: Stamp, values: int | None = None
    ) -> envelope.Envelope:
        """Everything ``sum`` refuses an update for, short of adding it: its envelope against
        the round (and its length against ``values``), and every ciphertext word below q.
        Returns the opened envelope."""
        return self._checked.check(
            payload, stamp, values, lambda: self._check(payload, stamp, values)
        )

    def _check(
        self, payload: bytes | memoryview, stamp: Stamp, values: int | None
    ) -> envelope.Envelope:
        opened = self._format.open(payload, stamp, UPDATE)
        ledger.check_length(opened.values, values)
        seal_format.from_wire(opened.body, self._shape.modulus)
        return opened

    def sum(
        self,
        payloads: Iterable[bytes],
        stamp: Stamp,
        allowed: frozenset[int] | None = None,
        values: int | None = None,
    ) -> bytes:
        """Add payloads as they arrive: holds the running sum and one payload, never all.

        The aggregate holds the summed ``c0`` words and every contributor's seed."""
        seeds: dict[int, bytes] = {}

        words: np.ndarray | None = None  # each update's words in turn, in one reused array

        def add(total: np.ndarray | None, opened: envelope.Envelope) -> np.ndarray:
            nonlocal words
            seeds[opened.stamp.sender] = opened.seeds[0]
            # Every update was checked below q (``_check``) when it was opened.
            if total is None:
                return seal_format.unpack_wire(opened.body)
            words = seal_format.unpack_wire(opened.body, out=words)
            seal_format.add_mod(total, words, self._shape.modulus)
            return total

        def open_update(payload: bytes) -> envelope.Envelope:
            return self._checked.take(payload, stamp, values) or self._check(payload, stamp, values)

        total, count_values, senders = ledger.accumulate(
            payloads, open_update, add, allowed, self._format.packing(stamp).max_clients
        )
        count, size = self._format.blobs(stamp)(count_values)
        return envelope.to_bytes(
            self.codec_for_round(stamp),
            AGGREGATE,
            stamp.for_sender(SERVER),
            count_values,
            count,
            size,
            [seal_format.to_wire(total)],
            senders,
            tuple(seeds[sender] for sender in senders),
        )

    def corrected(
        self,
        aggregate: bytes,
        reveals: Sequence[Reveal],
        stamp: Stamp,
        roster: masking.MaskRoster,
    ) -> bytes:
        """The aggregate unmasked (``masking.unmasking``): every contributor's self-mask and,
        for each position of ``roster`` that advertised keys and sent nothing, its pairs with
        the contributors, taken off. Refused (PayloadError) when a reveal is not a
        contributor's, is a second one or is malformed, or when a key cannot be had."""
        summed = self._format.open(aggregate, stamp, AGGREGATE)
        q = self._shape.modulus
        total = seal_format.from_wire(summed.body, q)
        seen: set[int] = set()
        for reveal in reveals:
            if reveal.sender not in summed.contributors or reveal.sender in seen:
                raise PayloadError(
                    f"a reveal from client {reveal.sender}, which is not a contributor or sent "
                    "one already, is refused",
                    "duplicate",
                )
            _check_reveal(reveal)
            seen.add(reveal.sender)
        plan = masking.unmasking(stamp, summed.contributors, reveals, roster)
        n = self._shape.poly_modulus_degree
        removal = plan.words(summed.blob_count, n, q)
        seal_format.add_mod(total, removal.reshape(-1), q)
        count, size = self._format.blobs(stamp)(summed.values)
        return envelope.to_bytes(
            self.codec_for_round(stamp),
            AGGREGATE,
            stamp.for_sender(SERVER),
            summed.values,
            count,
            size,
            [seal_format.to_wire(total)],
            summed.contributors,
            summed.seeds,
        )


def _check_reveal(reveal: Reveal) -> None:
    """Refuse a reveal whose key or shares are not the lengths they must be."""
    if len(reveal.key) != SEED_BYTES:
        raise PayloadError(
            f"client {reveal.sender}'s self-mask key is not {SEED_BYTES} bytes", "malformed"
        )
    for held in (reveal.shares, reveal.lost):
        if any(len(share) != shares.SHARE_BYTES for share in held.values()):
            raise PayloadError(
                f"client {reveal.sender}'s reveal holds a share that is not "
                f"{shares.SHARE_BYTES} bytes",
                "malformed",
            )
