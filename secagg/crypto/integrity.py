"""An integrity tag the clients check: the aggregate must be the sum of what was sent to it.

The server adds ciphertexts it cannot read, so it could add one of its own (a keyless,
"trivial" ciphertext needs no key) and every client would decrypt a sum it never agreed to.
The ledger (``ledger``) catches a dropped, duplicated or replayed contribution, not that. So
each client also encrypts a tag that is *linear* in what it encrypts, and the clients, who
hold the secret key the server lacks, check the summed tag against the decrypted sum:

- **Key**: ``HKDF-extract(salt="secagg aggregate integrity v1", ikm=client.ctx bytes)``.
  Every client holds the same secret context; the server holds only the public parameters,
  and the key fingerprint it knows (``keys.fingerprint_of``) is another, domain-separated hash.
- **Vector**: for each job, round and phase, ``r`` = the AES-256-CTR key stream under
  ``HMAC-SHA256(key, job, round, phase)``, read as 64-bit words mod ``P = 2**61 - 1``, one
  per integer a client encrypts (a pseudorandom function of the label, like the SHAKE-256
  stream it replaces, at a tenth of the cost: 15 ms for 3.5M words). A client computes it
  while its model trains (``ckks``); the process keeps the last few (clients of one key in one
  process, a simulation, share them), so encrypting and decrypting the same phase share one.
- **Tag**: ``t_i = <r, v_i> mod P`` over every integer the client encrypts (its quantized
  digits, tally, weight, clipped count and round tag), sent as three 21-bit limbs in three
  tail slots; summed over up to 1,024 clients the limbs stay below 2**31, far below the
  packings' tail limits (2**41 and more).
- **Check**: ``(lo + 2**21 mid + 2**42 hi) mod P == <r, decrypted sum> mod P``, exact integer
  arithmetic, so an honest aggregate never fails it (false-alarm rate 0).

Why it holds: the server never learns ``r`` (only ciphertexts depend on it), and the decrypted
sum does not depend on ``r`` except through the tags. An aggregate passes only if its entries
are congruent mod ``P`` to the combination of updates its tag slot was summed from (otherwise
it passes for at most 2 of the ``P`` possible ``r``: probability ``2**-60`` per forgery); the
tally, an entry like any other, pins that combination to the listed contributors, each once;
and every entry the unpacker accepts lies within ``+-2**46``, far inside ``P``, so congruent
means equal. Another job's, round's or phase's ciphertext was tagged under another ``r``.

What it does not prove: a client that colludes with the server knows ``r``; the server can
still leave a contributor out (the tally names it) or answer nothing at all.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

from secagg.crypto import seeded
from secagg.crypto.caches import KeyCaches
from secagg.crypto.envelope import Stamp
from secagg.errors import PayloadError

#: The tag's prime: larger than twice any entry the unpacker accepts (|entry| < 2**46).
P = (1 << 61) - 1
#: Tail slots the tag takes: three 21-bit limbs (room for the sums of 1,024 clients).
SLOTS = 3
_LIMB = 21
_LIMB_MASK = (1 << _LIMB) - 1
#: r is split in 31-bit halves for exact int64 dot products (see ``_BLOCK``).
_HALF = 31
_SALT = b"secagg aggregate integrity v1"
#: Entries per exact int64 partial sum: 2**8 x (r's 31-bit half) x (|digit| < 2**23) < 2**62
#: (digits are 15 bits in the standard packing, 23 in the fine one, 21 in the wide one).
_BLOCK = 1 << 8
_DIGIT_BOUND = 1 << 23


class MacKey:
    """The clients' shared integrity key, derived from the secret context they all hold."""

    def __init__(self, secret_context: bytes, caches: KeyCaches | None = None) -> None:
        # HKDF-extract (RFC 5869): a uniform 32-byte key, independent of the key fingerprint
        # (a hash under another label) that the server is told.
        self._key = hmac.new(_SALT, secret_context, hashlib.sha256).digest()
        #: where the vectors ``r`` are kept for the key's other holders (``caches``: owned
        #: by the loaded key; a private one by default)
        self.caches = caches if caches is not None else KeyCaches()

    def seal(self, stamp: Stamp, digits: np.ndarray, whole: np.ndarray) -> np.ndarray:
        """The tag of one client's entries, as the three 21-bit limbs (float64) it sends."""
        tag = self._tag(stamp, digits, whole)
        limbs = [(tag >> (_LIMB * i)) & _LIMB_MASK for i in range(SLOTS)]
        return np.array(limbs, dtype=np.float64)

    def verify(
        self, stamp: Stamp, digits: np.ndarray, whole: np.ndarray, limbs: np.ndarray
    ) -> None:
        """Refuse (PayloadError ``forged``) a decrypted sum whose summed tag does not match.

        ``digits`` and ``whole`` are the decrypted, summed entries, ``limbs`` the summed tag
        slots; all must already be integers (the packed codec decrypts exactly).
        """
        if limbs.shape != (SLOTS,):
            raise PayloadError("the aggregate has no integrity tag", "malformed")
        summed = sum(int(v) << (_LIMB * i) for i, v in enumerate(limbs))
        if summed % P != self._tag(stamp, digits, whole):
            raise PayloadError(
                "the aggregate is not the sum of the listed contributors' updates (its "
                "integrity tag does not match): the server added or changed something; "
                "refuse this round and check the server",
                "forged",
            )

    def _tag(self, stamp: Stamp, digits: np.ndarray, whole: np.ndarray) -> int:
        """``<r, digits ++ whole> mod P`` in exact integer arithmetic."""
        from secagg.crypto.ring import dot_halves  # numba: clients only

        small = np.ascontiguousarray(digits, dtype=np.float64)
        big = [int(v) for v in np.asarray(whole, dtype=np.float64)]
        low, high = self.halves(stamp, small.size + len(big))
        # the range check is the kernel's, in the same pass (no 8-bytes-per-value temporary)
        halves = dot_halves(low, high, small, _BLOCK, P, _DIGIT_BOUND)
        if halves is None:
            raise PayloadError("a packed digit is out of range", "malformed")
        lo, hi = halves
        total = lo + (hi << _HALF)
        for index, value in enumerate(big, start=small.size):
            total += (int(low[index]) + (int(high[index]) << _HALF)) * value
        return total % P

    def vector(self, stamp: Stamp, size: int) -> np.ndarray:
        """``r`` for ``stamp``'s job, round and phase: ``size`` words below P (uint64)."""
        low, high = self.halves(stamp, size)
        return (high.astype(np.uint64) << np.uint64(_HALF)) | low.astype(np.uint64)

    def halves(self, stamp: Stamp, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``r`` for ``stamp``'s label as its low 31 and high 30 bits (int32 each), the form
        the tag's kernel multiplies exactly in int64.

        Kept for the last few labels (a longer one serves shorter requests): the background
        thread that prepares a round's encryptions computes it early (``ckks``)."""
        label = b"r\0" + stamp.label()
        with self.caches.lock:
            kept = self.caches.vectors.get(label)
        if kept is not None and kept[0].size >= size:
            return kept[0][:size], kept[1][:size]
        from secagg.crypto.ring import split_halves  # numba: clients only

        # The AES-256-CTR key stream under HMAC(key, label), as 64-bit words mod P (2**64 mod P
        # is 8, so the bias is below 2**-60), split as it is drawn.
        low, high = np.empty(size, dtype=np.int32), np.empty(size, dtype=np.int32)
        at = 0
        stream = hmac.new(self._key, label, hashlib.sha256).digest()
        for words in seeded.key_stream(stream, bytes(16), size):
            end = at + words.size
            split_halves(words, P.bit_length(), _HALF, low[at:end], high[at:end])
            at = end
        low.flags.writeable = high.flags.writeable = False
        with self.caches.lock:
            self.caches.keep_vector(label, (low, high))
        return low, high
