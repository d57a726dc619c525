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
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from secagg import noise, quantize
from secagg.crypto import report
from secagg.crypto.ckks import BACKGROUND, CkksClient
from secagg.crypto.envelope import Stamp
from secagg.crypto.ledger import Aggregate, Update
from secagg.crypto.masking import Advertised, Relayed, Reveal, Sealed, SignedKey
from secagg.errors import ConfigError, PayloadError
from secagg.flatten import Layout
from secagg.privacy import ROTATION, Privacy
from secagg.rotation import rotate, rotation_signs, unrotate


class QuantizedCipher:
    """Quantizes on steps agreed each round, then encrypts with an integer cipher."""

    def __init__(self, inner: CkksClient, layout: Layout, privacy: Privacy | None = None) -> None:
        self.inner = inner
        #: differential privacy's clipping bound and noise (``secagg.privacy``; None: off)
        self.privacy = privacy
        self.name = inner.name
        self.blocks = quantize.block_sizes(layout)
        self.size = layout.size
        if privacy is not None and self.size % ROTATION:
            raise ConfigError(
                f"a DP update with HE is a whole number of {ROTATION}-value rotation chunks; "
                f"this layout has {self.size} values (build it with flatten.payload_layout)"
            )
        #: values of a scale exchange payload: one histogram per block, then the report
        self._histogram_values = self.blocks.size * quantize.BINS
        self._scale_values = self._histogram_values + report.VALUES
        #: the last agreement decrypted, by its digest
        self._agreed: tuple[bytes, Agreement] | None = None
        #: DP noise drawn ahead for a round: (job, round, variance, the draw)
        self._noise: tuple[bytes, int, int, Future[np.ndarray]] | None = None
        #: this client's sample count and training metrics, as its last ``prepare`` had them
        self._samples = 0
        self._metrics: Mapping[str, float] = {}

    def __getstate__(self) -> dict[str, object]:
        """Its round state, without the noise drawn ahead in this process (drawn again)."""
        return {**self.__dict__, "_noise": None}

    def prepare(
        self,
        values: np.ndarray,
        stamp: Stamp,
        samples: int = 1,
        metrics: Mapping[str, float] | None = None,
    ) -> bytes:
        """The encrypted magnitude histogram of ``samples x values`` (this client's change
        times its sample count: its weight before the round's total is known), followed by
        its training ``metrics`` (``report``): neither its count nor its metrics travel in
        plain."""
        metrics = dict(metrics or {})
        # With DP every client reports the bound of its rotated values, never its own
        # magnitudes.
        bound = self.privacy.rotated_peak() if self.privacy is not None else None
        histogram = quantize.histogram(values, self.blocks, samples, peak=bound)
        self._samples, self._metrics = samples, metrics
        # The ledger's count slot carries the sample count, so every client reads the round's
        # total from the summed scales, exactly; each weighs 1/roster, so the sum stays <= 1.
        payload = np.concatenate([histogram, report.encode(metrics, samples)])
        update = Update(payload, 1.0 / stamp.roster, samples)
        return self.inner.encrypt(update, stamp.scales())

    def precompute(self, stamp: Stamp) -> None:
        """Prepare both phases' encryptions: the scale exchange's, then the update's; with
        DP, draw the update's noise too (``_noise_ahead``)."""
        self.inner.precompute(stamp.scales(), self._scale_values)
        self.inner.precompute(stamp, self.size)
        if self.privacy is not None:
            self._noise_ahead(stamp)

    def _noise_ahead(self, stamp: Stamp) -> None:
        """Start drawing, in the background while the task trains, the noise this client
        adds if every keyed client of the round takes part: with DP the scale exchange's sum
        is known in advance (every client reports the clipping bound), so its variance is
        too. ``encrypt`` uses the draw only if the round's agreement has that variance, and
        only once; otherwise it draws afresh."""
        masker = self.inner.masker
        clients = len(masker.keyed()) if masker is not None and masker.active(stamp) else 0
        clients = clients or stamp.roster
        assert self.privacy is not None
        summed = _reported_bounds(self.blocks.tobytes(), self.privacy.rotated_peak(), clients)
        try:
            _, variance = self._noise_room(summed, clients, clients, self._limit(stamp))
        except PayloadError:
            return  # no room: encrypt says why
        draw = BACKGROUND.submit(noise.discrete_gaussian, variance, self.size)
        self._noise = (stamp.job, stamp.round_num, variance, draw)

    def _limit(self, stamp: Stamp) -> int:
        return self.inner.sum_limit_for(stamp)

    def publish(self, job: bytes, site: int) -> SignedKey | None:
        masker = self.inner.masker
        return None if masker is None else masker.publish(job, site)

    def advertise(
        self, stamp: Stamp, peers: Sequence[SignedKey | None], nonce: bytes
    ) -> Advertised | None:
        masker = self.inner.masker
        return None if masker is None else masker.advertise(stamp, peers, nonce)

    def agree(self, stamp: Stamp, adverts: Relayed, sealed: Sealed, nonce: bytes) -> None:
        if self.inner.masker is not None:
            self.inner.masker.agree(stamp, adverts, sealed, nonce)

    def confirm(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        return self.inner.confirm(stamp, survivors)

    def reveal(
        self, stamp: Stamp, survivors: tuple[int, ...], confirmations: dict[int, bytes]
    ) -> Reveal:
        return self.inner.reveal(stamp, survivors, confirmations)

    def evaluation(
        self,
        stamp: Stamp,
        metrics: Mapping[str, float] | None,
        count: int = 0,
        unmasked: bool = False,
    ) -> bytes:
        """This client's evaluation of the round's global model (``metrics`` over ``count``
        test examples; None: it has no test data, and reports zeros so that the sum still
        counts it), encrypted (``report``): the server never reads it. A client that masks
        refuses to send it without masks (a server naming a round or roster this client
        holds no keys for) unless ``unmasked`` says the round's evaluation is unmasked."""
        masker = self.inner.masker
        if masker is not None and not unmasked and not masker.active(stamp):
            raise PayloadError(
                f"this site holds no mask keys for round {stamp.round_num}'s evaluation by "
                f"{stamp.roster} sites: it sends none unmasked",
                "bad-plan",
            )
        update = Update(report.encode(metrics, count), 1.0 / stamp.roster)
        return self.inner.encrypt(update, stamp)

    def averages(self, payload: bytes, stamp: Stamp, names: Mapping[str, object]) -> report.Reading:
        """The summed evaluations of ``stamp``'s round, decrypted and checked (ledger, tag,
        the round policy's threshold), read with this client's metric ``names``."""
        summed = self.inner.decrypt(payload, stamp)
        if summed.values.shape != (report.VALUES,):
            raise PayloadError(
                "the summed evaluations do not have an evaluation's length; are all parties "
                "running the same secagg?",
                "wrong-length",
            )
        return report.read(summed.values, names, len(summed.contributors))

    def encrypt(self, update: Update, stamp: Stamp, agreed: bytes | None) -> bytes:
        agreement = self.agreement(stamp, agreed)
        steps, total = agreement.steps, agreement.samples
        values, weight = update.values.copy(), update.weight
        if self._samples and weight != self._samples / total:
            # The steps hold for weights n_i / N with N the scale exchange's (encrypted, exact)
            # total: a sample total from elsewhere that disagrees (a site or server misreporting)
            # must not overflow the sum, so the weight is the one the scales agree on.
            values *= (self._samples / total) / weight
            weight = self._samples / total
        limit = 2.0**quantize.E_MAX / total
        if agreement.variance:  # DP: rotated, then rounded at random within the norm the
            # noise covers; a rotated value over the steps' bound (chance 1e-9) is clipped.
            assert self.privacy is not None
            values = rotate(values, self._signs(stamp))
            bound = self.privacy.rotated_peak() * weight
            clipped = int(np.count_nonzero(np.abs(values) > bound))
            np.clip(values, -bound, bound, out=values)
            scaled = values / np.repeat(steps, self.blocks)
            values = noise.round_within(scaled, agreement.rounded_norm)
            values += self._noise_for(stamp, agreement.variance)
            return self.inner.encrypt(Update(values, weight, clipped), stamp)
        values, clipped = quantize.quantize(values, steps, self.blocks, limit)
        return self.inner.encrypt(Update(values, weight, clipped), stamp)

    def _noise_for(self, stamp: Stamp, variance: int) -> np.ndarray:
        """This round's noise: the one drawn ahead when its variance is the agreed one (used
        once), else a fresh draw."""
        ahead, self._noise = self._noise, None
        if ahead is not None and ahead[:3] == (stamp.job, stamp.round_num, variance):
            return ahead[3].result()
        return noise.discrete_gaussian(variance, self.size)

    def decrypt(self, payload: bytes, stamp: Stamp, agreed: bytes | None) -> Aggregate:
        summed = self.inner.decrypt(payload, stamp)
        if summed.values.shape != (self.size,):
            raise PayloadError(
                f"the aggregate has {summed.values.size} values, this client's model has "
                f"{self.size}; are all parties running the same job?",
                "wrong-length",
            )
        agreement = self.agreement(stamp, agreed)
        steps = agreement.steps
        outside = sorted(set(summed.contributors) - set(agreement.contributors))
        if outside:
            raise PayloadError(
                f"the aggregate adds updates of client(s) {outside} that took no part in the "
                "round's scale exchange: the sum may have overflowed",
                "not-in-round",
            )
        if self.privacy is not None and len(summed.contributors) < self.privacy.threshold:
            # Each update carries 1/threshold of the noise: a smaller sum is less private than
            # differential privacy says (the masks refuse one too; this holds without them).
            raise PayloadError(
                f"the aggregate adds {len(summed.contributors)} update(s), fewer than the "
                f"{self.privacy.threshold} whose noise differential privacy counts on: this "
                "client decrypts no such sum (check the server: it must wait for at least "
                "the threshold's sites)",
                "below-threshold",
            )
        values = quantize.dequantize(summed.values, steps, self.blocks)
        if self.privacy is not None:
            values = unrotate(values, self._signs(stamp))
        return Aggregate(values, summed.weight, summed.clipped, summed.contributors)

    def _signs(self, stamp: Stamp) -> np.ndarray:
        """The round's rotation signs (DP), the same on every client of every attempt."""
        return rotation_signs(stamp.job + stamp.round_num.to_bytes(8, "big"), self.size)

    def agreement(self, stamp: Stamp, agreed: bytes | None) -> Agreement:
        """What the round's summed scales say: the quantization steps, who took part, their
        summed sample count and their training metrics, decrypted once per agreement."""
        if agreed is None:
            raise PayloadError("an integer codec needs the round's scale aggregate", "malformed")
        digest = hashlib.sha256(stamp.label() + bytes(agreed)).digest()
        if self._agreed is None or self._agreed[0] != digest:
            self._agreed = (digest, self._read(stamp, agreed))
        return self._agreed[1]

    def _read(self, stamp: Stamp, agreed: bytes) -> Agreement:
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
                f"the scale aggregate counts {total} samples for {clients} clients: a site "
                "misreported its count",
                "bad-scales",
            )
        limit = self._limit(stamp)
        histograms = summed.values[: self._histogram_values]
        variance, rounded_norm = 0, 0.0
        if self.privacy is not None:
            level, variance = self._noise_room(histograms, clients, total, limit)
            steps = _dp_steps(histograms, clients, level, total)
            rounded_norm = self.privacy.rounded_norm(1 / total, float(steps.min()), self.size)
        else:
            steps = quantize.steps(histograms, clients, limit, total)
        reported = summed.values[self._histogram_values :]
        try:
            metrics = report.read(reported, self._metrics, clients).averages
        except PayloadError:  # a site's report out of range: the metrics are unknown
            metrics = None
        return Agreement(steps, summed.contributors, total, metrics, variance, rounded_norm)

    def _noise_room(
        self, histograms: np.ndarray, clients: int, total: int, limit: int
    ) -> tuple[int, int]:
        """With DP: the part of the codec's range ``limit`` the data may fill (the rest holds
        the summed noise), and each client's noise variance there. Every client weighs 1, so
        the total is the number of clients; another total is a site's lie (``bad-total``)."""
        assert self.privacy is not None
        if total != clients:
            raise PayloadError(
                f"with differential privacy every site weighs 1, but the round's {clients} "
                f"site(s) claim {total}: a site misreported its count",
                "bad-total",
            )
        return _room(histograms.tobytes(), clients, limit, self.privacy, self.size)


@dataclass(frozen=True)
class Agreement:
    """A round's decrypted scale exchange."""

    steps: np.ndarray
    #: who took part (the only clients whose updates the steps hold for)
    contributors: tuple[int, ...]
    #: their summed sample count: the FedAvg total
    samples: int
    #: their training metrics, each averaged weighted by sample count (None: the sites
    #: reported different metric names)
    metrics: dict[str, float] | None
    #: with DP: the discrete Gaussian variance each client adds to its integers (0: none)
    variance: int = 0
    #: with DP: the L2 norm each client's rounded integers stay within (its sensitivity)
    rounded_norm: float = 0.0


@lru_cache(maxsize=64)
def _reported_bounds(blocks: bytes, peak: float, clients: int) -> np.ndarray:
    """The summed scale histograms of ``clients`` DP clients that all report ``peak`` (read
    only): known before any is sent, once per process."""
    sizes = np.frombuffer(blocks, dtype=np.int64)
    summed = quantize.histogram(np.empty(0), sizes, 1, peak=peak) * clients
    summed.setflags(write=False)
    return summed


@lru_cache(maxsize=64)
def _room(
    histograms: bytes, clients: int, limit: int, privacy: Privacy, values: int
) -> tuple[int, int]:
    """``_noise_room``'s search, once per process for the same round: every client of a
    simulation derives the same from the same (public) sums."""
    summed = np.frombuffer(histograms, dtype=np.float64)

    def variance_at(level: int) -> int:
        step = float(_dp_steps(summed, clients, level, clients).min())
        return privacy.calibrate(1.0 / clients, step, values, clients)

    level = privacy.level(limit, clients, variance_at)
    return level, variance_at(level)


def _dp_steps(histograms: np.ndarray, clients: int, level: int, total: int) -> np.ndarray:
    """The steps that keep a DP round's summed data within ``level``: rounding at random moves
    each client's integer by up to 1, not 1/2 (``quantize.steps`` leaves half a step each)."""
    return quantize.steps(histograms, clients, level - clients + (clients + 1) // 2, total)
