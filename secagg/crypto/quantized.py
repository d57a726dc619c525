"""The scale exchange around an integer cipher: agree on steps, quantize, encrypt; decrypt,
dequantize. It is what makes the packed CKKS codec a ``ClientCipher``.

Each round, every client first encrypts a one-hot histogram of how large its change to the
global model is, per block (``prepare``); the server adds the histograms like any payload; every
client decrypts the same sum and derives the same quantization steps (``quantize.steps``), then
quantizes its weighted update on them (``encrypt``). The aggregate decrypts to exact integers,
which ``decrypt`` turns back into the sum of weighted updates on the same steps. The steps of a
round are decrypted once and kept until the next round's agreement arrives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from secagg import quantize
from secagg.crypto.ckks import CkksClient
from secagg.crypto.envelope import SCALES, Stamp
from secagg.crypto.ledger import Aggregate, Update
from secagg.crypto.masking import Reveal, ShareBundle, SignedKey
from secagg.errors import PayloadError
from secagg.flatten import Layout


class QuantizedCipher:
    """Quantizes on steps agreed each round, then encrypts with an integer cipher."""

    def __init__(self, inner: CkksClient, layout: Layout) -> None:
        self.inner = inner
        self.name = inner.name
        self.blocks = quantize.block_sizes(layout)
        self.size = layout.size
        #: values of a scale exchange payload: one histogram per block
        self._scale_values = self.blocks.size * quantize.BINS
        #: the last agreement decrypted: (its digest, the steps, who took part, their samples)
        self._agreed: tuple[bytes, np.ndarray, tuple[int, ...], int] | None = None
        #: this client's sample count, as its last ``prepare`` reported it
        self._samples = 0

    def prepare(self, values: np.ndarray, stamp: Stamp, samples: int = 1) -> bytes:
        """The encrypted magnitude histogram of ``samples x values`` (this client's change
        times its sample count: its weight before the round's total is known)."""
        histogram = quantize.histogram(values, self.blocks, samples)
        self._samples = samples
        # The ledger's count slot carries the sample count, so every client reads the round's
        # total from the summed scales, exactly; each weighs 1/roster, so the sum stays <= 1.
        update = Update(histogram, 1.0 / stamp.roster, samples)
        return self.inner.encrypt(update, stamp.scales())

    def precompute(self, stamp: Stamp) -> None:
        """Prepare both phases' encryptions: the scale exchange's, then the update's."""
        self.inner.precompute(stamp.scales(), self._scale_values)
        self.inner.precompute(stamp, self.size)

    def publish(self, job: bytes, site: int) -> SignedKey | None:
        masker = self.inner.masker
        return None if masker is None else masker.publish(job, site)

    def agree(self, stamp: Stamp, peers: Sequence[SignedKey | None], nonce: bytes = b"") -> None:
        if self.inner.masker is not None:
            self.inner.masker.agree(stamp, peers, nonce)

    def confirm(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        return self.inner.confirm(stamp, survivors)

    def reveal(
        self,
        stamp: Stamp,
        survivors: tuple[int, ...],
        confirmations: dict[int, bytes],
        sealed: dict[int, bytes] | None = None,
    ) -> Reveal:
        values = self._scale_values if stamp.phase == SCALES else self.size
        return self.inner.reveal(stamp, survivors, confirmations, values, sealed)

    def share(self, stamp: Stamp) -> ShareBundle | None:
        masker = self.inner.masker
        return masker.share(stamp) if masker is not None and masker.active(stamp) else None

    def encrypt(self, update: Update, stamp: Stamp, agreed: bytes | None) -> bytes:
        steps, _, total = self._steps(stamp, agreed)
        values, weight = update.values.copy(), update.weight
        if self._samples and weight != self._samples / total:
            # The steps hold for weights n_i / N with N the scale exchange's (encrypted, exact)
            # total: a sample total from elsewhere that disagrees (a site or server misreporting)
            # must not overflow the sum, so the weight is the one the scales agree on.
            values *= (self._samples / total) / weight
            weight = self._samples / total
        limit = 2.0**quantize.E_MAX / total
        values, clipped = quantize.quantize(values, steps, self.blocks, limit)
        return self.inner.encrypt(Update(values, weight, clipped), stamp)

    def decrypt(self, payload: bytes, stamp: Stamp, agreed: bytes | None) -> Aggregate:
        summed = self.inner.decrypt(payload, stamp)
        if summed.values.shape != (self.size,):
            raise PayloadError(
                f"the aggregate has {summed.values.size} values, this client's model has "
                f"{self.size}; are all parties running the same job?",
                "wrong-length",
            )
        steps, agreeing, _ = self._steps(stamp, agreed)
        outside = sorted(set(summed.contributors) - set(agreeing))
        if outside:
            raise PayloadError(
                f"the aggregate adds updates of client(s) {outside} that took no part in the "
                "round's scale exchange: the sum may have overflowed",
                "not-in-round",
            )
        values = quantize.dequantize(summed.values, steps, self.blocks)
        return Aggregate(values, summed.weight, summed.clipped, summed.contributors)

    def _steps(self, stamp: Stamp, agreed: bytes | None) -> tuple[np.ndarray, tuple[int, ...], int]:
        """The round's quantization steps, who agreed on them and their summed sample count,
        from the summed histograms."""
        if agreed is None:
            raise PayloadError("an integer codec needs the round's scale aggregate", "malformed")
        digest = hashlib.sha256(stamp.label() + bytes(agreed)).digest()
        if self._agreed is None or self._agreed[0] != digest:
            summed = self.inner.decrypt(agreed, stamp.scales())
            if summed.values.shape != (self._scale_values,):
                raise PayloadError(
                    "the scale aggregate does not match this client's model; are all parties "
                    "running the same job?",
                    "wrong-length",
                )
            clients, total = len(summed.contributors), summed.clipped
            if total < clients:
                raise PayloadError(
                    f"the scale aggregate counts {total} samples for {clients} clients",
                    "bad-scales",
                )
            limit = self.inner.sum_limit_for(stamp)
            steps = quantize.steps(summed.values, clients, limit, total)
            self._agreed = (digest, steps, summed.contributors, total)
        return self._agreed[1], self._agreed[2], self._agreed[3]
