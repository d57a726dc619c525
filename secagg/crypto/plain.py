"""Plaintext FedAvg: float vectors in the same envelope and ledger. The reference for tests.

A payload's one blob is ``values ++ tally ++ tail`` (see ``ledger``) as little-endian floats:
float32 by default, what plaintext FedAvg sends, or float64. The server adds in float64 and
sends the sum back at the same precision.

There is no integrity tag here: plaintext FedAvg has no secret to key one with, and its server
reads and could change every value anyway. The ledger's round tag still binds each payload to
its job, round and phase, which catches a misrouted or replayed payload, not a lying server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from secagg.crypto import envelope, ledger
from secagg.crypto.envelope import AGGREGATE, UPDATE, UPDATE_PHASE, Stamp
from secagg.crypto.ledger import Aggregate, Update
from secagg.crypto.masking import Advertised, MaskRoster, Relayed, Reveal, Sealed, SignedKey
from secagg.crypto.report import Reading
from secagg.errors import ConfigError, PayloadError

if TYPE_CHECKING:
    from secagg.privacy import Privacy

# No keys in a plaintext run; a fixed fingerprint still stops HE payloads being read as plain.
FINGERPRINT = hashlib.sha256(b"secagg-plaintext").digest()[:16]
DTYPES = {"float32": "<f4", "float64": "<f8"}
MAX_VALUES = 1 << 31


class PlainCipher:
    """Both sides of plaintext FedAvg: floats on the wire, float64 while summing."""

    name = "plain"
    quantizes = False
    #: floats: no integer limit (an integer cipher's largest summed magnitude)
    sum_limit: int | None = None

    def __init__(self, precision: str = "float32", privacy: Privacy | None = None) -> None:
        #: central differential privacy (``secagg.privacy``): clients clip and weigh alike,
        #: and the server noises each update sum it makes (it reads them: it is trusted)
        self.privacy = privacy
        if precision not in DTYPES:
            raise ConfigError(f"plaintext precision must be one of {', '.join(DTYPES)}")
        self.dtype = np.dtype(DTYPES[precision])
        # Settings "f32" or "f64": the two precisions never read each other's payloads.
        self.codec = envelope.Codec(0, FINGERPRINT, f"f{precision[-2:]}\0".encode())
        #: updates checked as they arrived (``check``), which the sum does not check again
        self._checked = ledger.Checked()

    def codec_for_round(self, stamp: Stamp) -> envelope.Codec:
        """Every round's payloads say the same codec."""
        return self.codec

    def prepare(
        self,
        values: np.ndarray,
        stamp: Stamp,
        samples: int = 1,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Floats need no agreement before they are added (and a plaintext server reads each
        site's count and metrics in plain, as it reads its update)."""
        return None

    def precompute(self, stamp: Stamp) -> None:
        """Nothing to prepare: plaintext payloads are the values themselves."""

    def agreement(self, stamp: Stamp, agreed: bytes | None) -> None:
        """No agreement: the server gives the sample total."""
        return None

    def evaluation(
        self,
        stamp: Stamp,
        metrics: Mapping[str, float] | None,
        count: int = 0,
        unmasked: bool = False,
    ) -> None:
        """A plaintext evaluation travels in plain (the server reads every update anyway)."""
        return None

    def averages(self, payload: bytes, stamp: Stamp, names: Mapping[str, object]) -> Reading:
        raise PayloadError("plaintext FedAvg sums no evaluations", "bad-plan")

    def publish(self, job: bytes, site: int) -> SignedKey | None:
        """Plaintext FedAvg does not mask: its server reads every update anyway."""
        return None

    def advertise(
        self, stamp: Stamp, peers: Sequence[SignedKey | None], nonce: bytes
    ) -> Advertised | None:
        """Nothing to advertise: no masks."""
        return None

    def agree(self, stamp: Stamp, adverts: Relayed, sealed: Sealed, nonce: bytes) -> None:
        """Nothing to agree: no masks."""

    def confirm(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        raise PayloadError("plaintext FedAvg does not mask; it has nothing to confirm", "bad-plan")

    def reveal(
        self, stamp: Stamp, survivors: tuple[int, ...], confirmations: dict[int, bytes]
    ) -> Reveal:
        raise PayloadError("plaintext FedAvg does not mask; it has nothing to unmask", "bad-plan")

    def encrypt(self, update: Update, stamp: Stamp, agreed: bytes | None = None) -> bytes:
        tally, tail = ledger.entries(update, stamp)
        vector = np.concatenate([np.asarray(update.values, np.float64), tally, tail])
        return self._payload(UPDATE, stamp, update.values.size, vector)

    def decrypt(self, payload: bytes, stamp: Stamp, agreed: bytes | None = None) -> Aggregate:
        opened = self._open(payload, stamp, AGGREGATE)
        vector = np.frombuffer(opened.body, dtype=self.dtype).astype(np.float64)
        n, roster = opened.values, stamp.roster
        tally, tail = vector[n : n + roster], vector[n + roster :]
        return ledger.settle(
            vector[:n], tally, tail, stamp, opened.contributors, precision=self.dtype.type
        )

    def size(self, values: int, stamp: Stamp) -> int:
        """The byte length of an update of ``values`` values for ``stamp``'s round."""
        return envelope.update_size(*self._blobs(stamp)(values))

    def check(
        self, payload: bytes | memoryview, stamp: Stamp, values: int | None = None
    ) -> envelope.Envelope:
        """Everything ``sum`` refuses an update for, short of adding it (once: ``sum`` does
        not check again what was checked as it arrived)."""
        return self._checked.check(
            payload, stamp, values, lambda: self._check(payload, stamp, values)
        )

    def _check(
        self, payload: bytes | memoryview, stamp: Stamp, values: int | None
    ) -> envelope.Envelope:
        opened = self._open(payload, stamp, UPDATE)
        ledger.check_length(opened.values, values)
        return opened

    def sum(
        self,
        payloads: Iterable[bytes],
        stamp: Stamp,
        allowed: frozenset[int] | None = None,
        values: int | None = None,
    ) -> bytes:
        # Adaptive clipping: the largest |last value| of an update, its signal (bC/N; without
        # HE the signal is the one value after the model's: ``privacy.extra_sizes``).
        signal = 0.0
        adaptive = self.privacy is not None and self.privacy.adaptive

        def add(total: np.ndarray | None, opened: envelope.Envelope) -> np.ndarray:
            nonlocal signal
            vector = np.frombuffer(opened.body, dtype=self.dtype)
            if adaptive and opened.values:
                signal = max(signal, abs(float(vector[opened.values - 1])))
            if total is None:
                return vector.astype(np.float64)
            total += vector
            return total

        def open_update(payload: bytes) -> envelope.Envelope:
            return self._checked.take(payload, stamp, values) or self._check(payload, stamp, values)

        total, count, senders = ledger.accumulate(payloads, open_update, add, allowed)
        if self.privacy is not None and stamp.phase == UPDATE_PHASE:
            from secagg import privacy

            # Every client weighs 1/N (N: the round's clients), so one client's sensitivity
            # is clip / N; the ledger's slots after the values stay exact.
            total[:count] += privacy.central_noise(self.privacy, len(senders), count, signal)
        return self._payload(AGGREGATE, stamp, count, total, senders)

    def corrected(
        self,
        aggregate: bytes,
        reveals: Sequence[Reveal],
        stamp: Stamp,
        roster: MaskRoster,
    ) -> bytes:
        """Plaintext sums carry no masks: there is nothing to unmask."""
        raise PayloadError("plaintext FedAvg does not mask; it has nothing to unmask", "bad-plan")

    def _payload(
        self,
        kind: int,
        stamp: Stamp,
        values: int,
        vector: np.ndarray,
        contributors: tuple[int, ...] = (),
    ) -> bytes:
        data = np.ascontiguousarray(vector, dtype=self.dtype)
        return envelope.to_bytes(
            self.codec, kind, stamp, values, 1, data.nbytes, [data], contributors
        )

    def _blobs(self, stamp: Stamp) -> Callable[[int], tuple[int, int]]:
        """(blob count, blob size) of a payload of ``values`` values: one blob of floats."""

        def blobs_for(values: int) -> tuple[int, int]:
            return 1, self.dtype.itemsize * (values + stamp.roster + ledger.TAIL)

        return blobs_for

    def _open(self, payload: bytes | memoryview, stamp: Stamp, kind: int) -> envelope.Envelope:
        return envelope.from_bytes(
            payload, self.codec, stamp, kind, blobs_for=self._blobs(stamp), max_values=MAX_VALUES
        )
