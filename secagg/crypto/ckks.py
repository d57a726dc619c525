"""The client side of CKKS: keys through TenSEAL, ciphertexts in numpy (``rlwe``).

Clients weight their own update before encrypting, so the server only adds ciphertexts
(multiplicative depth zero) and one 60-bit data prime is enough. Every party that encrypts
also holds the secret key, so clients encrypt with it (symmetric RLWE: a seventh of the noise
of public-key encryption), which is what lets the packed codec carry three quantized integers
per coefficient (``packing``). Decryptions are exact integers, so what a client publishes (the
global model, checkpoints, metrics) carries no key-dependent noise.

TenSEAL makes the keys (``make_contexts``) and is the only library that reads them; the
ciphertexts themselves are SEAL's, built and read by ``rlwe`` with integers in the plaintext's
coefficients (N per ciphertext, where slot encoding holds N/2). A ciphertext travels as its
``c0`` alone (``seal_format`` words); its uniformly random ``c1`` is re-drawn from a seed the
payload carries (``seeded``), and an aggregate's ``c1`` from its contributors' seeds.

Encrypting is adding ``Delta m`` to an encryption of zero, and those do not depend on the
update: ``precompute`` makes them in a background thread while the model trains (with the
integrity tag's vector), so what is left after training is packing and one addition mod q.
Decrypting is mostly expanding every contributor's seed into the sum's ``c1`` and multiplying
it by ``s``; a round's two payloads share their sender's seed (``first_index``), so a client
starts that for the update's sum as soon as it has decrypted the summed scales, and it runs
while the client encrypts and the server adds.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import tenseal as ts

from secagg.crypto import caches, codec, envelope, integrity, ledger, rlwe, seal_format, seeded
from secagg.crypto.ckks_server import TAIL, RoundFormat
from secagg.crypto.envelope import (
    AGGREGATE,
    EVALUATION,
    SCALES,
    UPDATE,
    UPDATE_PHASE,
    Stamp,
)
from secagg.crypto.ledger import Aggregate, Update
from secagg.crypto.masking import Masker, MaskPlan, Reveal
from secagg.crypto.packing import packing_for
from secagg.crypto.params import CkksParams, Keys
from secagg.errors import KeyFileError, PayloadError

#: The first ciphertext index (``seeded.expand``) of each phase's payloads. A client encrypts
#: both phases of a round under one seed, on disjoint ranges of its key stream, so its peers,
#: who read every contributor's seed in the summed scales, can expand the update's ``c1``
#: before the update's sum arrives (``CkksClient.decrypt``).
_FIRST_INDEX = {UPDATE_PHASE: 0, SCALES: 1 << 63, EVALUATION: 1 << 62}


def first_index(stamp: Stamp) -> int:
    """The seed index of the first ciphertext of a payload of ``stamp``'s phase."""
    return _FIRST_INDEX[stamp.phase]


def make_contexts(params: CkksParams) -> tuple[bytes, bytes]:
    """Generate a key; return (client context with the secret key, server context without).

    The server's context holds the encryption parameters only: it can neither decrypt nor
    encrypt, and the server needs no more, since adding ciphertexts takes no key.
    """
    try:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        )
    except ValueError as err:
        raise KeyFileError(f"TenSEAL refused the CKKS parameters: {err}") from err
    secret = context.serialize(save_secret_key=True)
    public = context.serialize(
        save_public_key=False,
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    if load_context(public).is_private() or not load_context(secret).is_private():
        raise KeyFileError("TenSEAL did not separate the secret key from the public context")
    return secret, public


def load_context(data: bytes) -> ts.Context:
    """A TenSEAL context from trusted local bytes (a key file checked against the manifest)."""
    try:
        return ts.context_from(data)
    except Exception as err:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes
        raise KeyFileError(f"not a TenSEAL CKKS context ({err}); run 'secagg keygen'") from err


class CkksClient:
    """Client side: encrypts updates and decrypts aggregates; needs the secret context.

    ``last_seconds`` splits the last ``encrypt`` into encryption (packing, the tag, adding the
    message to a prepared encryption of zero, masks) and serialization of the envelope.
    """

    name = "ckks-packed"

    def __init__(
        self, keys: Keys, masker: Masker | None = None, precision: str = "standard"
    ) -> None:
        #: pairwise masks (``masking``): None sends ciphertexts any key holder can read
        self.masker = masker
        if not load_context(keys.context).is_private():
            raise KeyFileError(
                "a client needs the secret context (keys/client.ctx), "
                "but was given a public one (server.ctx)"
            )
        self._keys, self._precision = keys, precision
        self._derive()
        #: the update's ciphertext count of the round last prepared: (job, round) -> count
        self._update_blobs: dict[tuple[bytes, int], int] = {}
        #: the largest magnitude a summed integer may reach in a round of up to 128 clients
        #: (``sum_limit_for`` says it for any round)
        self.sum_limit: int = packing_for(1, precision).sum_limit
        self.last_seconds: dict[str, float] = {}

    def _derive(self) -> None:
        """What the keys give (the format, the secret key's arrays, the tag's key) and what
        lives in this process only (encryptions and masks made ahead of time)."""
        # precision: ``standard`` or ``fine`` (``packing``); the server's must be the same
        self._format = RoundFormat(self._keys, self._precision)
        self.codec, self._shape = self._format.codec, self._format.shape
        # What the key's holders in this process share, owned by the loaded key (``caches``).
        shared = caches.of(self._keys)
        self._secret = rlwe.SecretKey(self._keys.context, self._shape, shared)
        self._mac = integrity.MacKey(self._keys.context, shared)
        self._zeros = _Zeros(self._secret)
        #: masks expanded ahead of time, by (job, round, phase): their plan and the words
        self._masks: dict[tuple[bytes, int, int], tuple[MaskPlan, Future[np.ndarray]]] = {}

    _DERIVED = ("_format", "codec", "_shape", "_secret", "_mac", "_zeros", "_masks")

    def __getstate__(self) -> dict[str, object]:
        """The client's round state (its masks' keys and what it agreed, its ledger of
        rounds), without what it derives from the keys or made ahead of time in this
        process. The keys themselves are pickled as they are unless the pickler stands them
        in for a reference (``secagg.flower`` does: a node's state never holds its key)."""
        return {k: v for k, v in self.__dict__.items() if k not in self._DERIVED}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._derive()

    def sum_limit_for(self, stamp: Stamp) -> int:
        """The largest magnitude a summed integer of ``stamp``'s round may reach."""
        return self._format.packing(stamp).sum_limit

    def codec_for_round(self, stamp: Stamp) -> envelope.Codec:
        """The envelope codec of ``stamp``'s round (its packing depends on the round's size)."""
        return self._format.codec_for(stamp)

    def precompute(self, stamp: Stamp, values: int) -> None:
        """Start preparing, in the background, what encrypting ``values`` values in ``stamp``'s
        phase needs beyond the values themselves: encryptions of zero and the integrity
        tag's vector. ``encrypt`` waits for them if they are not ready (or makes them)."""
        count, _ = self._format.blobs(stamp)(values)
        self._zeros.prepare(stamp, count)
        if stamp.phase == UPDATE_PHASE:
            self._update_blobs = {(stamp.job, stamp.round_num): count}
        BACKGROUND.submit(self._mac.halves, stamp, _entries(values, stamp))
        if self.masker is not None and self.masker.active(stamp):
            # The mask is the pairs' PRG words: known once the round's keys are agreed.
            plan = self.masker.plan(stamp)
            n, q = self._shape.poly_modulus_degree, self._shape.modulus
            words = BACKGROUND.submit(plan.words, count, n, q)
            stale = [key for key in self._masks if key[1] < stamp.round_num]
            for key in stale:  # a phase this client never sent (it dropped out)
                del self._masks[key]
            self._masks[(stamp.job, stamp.round_num, stamp.phase)] = (plan, words)

    def encrypt(self, update: Update, stamp: Stamp) -> bytes:
        start = time.perf_counter()
        tally, tail = ledger.entries(update, stamp)
        digits = np.concatenate([update.values, tally])
        packing = self._format.packing(stamp)
        count, size = self._format.blobs(stamp)(update.values.size)
        q, n = self._shape.modulus, self._shape.poly_modulus_degree
        seed, c0 = self._zeros.take(stamp, count)
        words = c0.reshape(-1)
        # Packed, scaled and added to the encryption of zero in one pass (``codec``), which
        # refuses what the packing cannot
        # carry before the tag reads any of it; the tag's slots come last.
        whole = np.concatenate([tail, np.zeros(integrity.SLOTS)])
        codec.pack_add(words, digits, whole, packing, q)
        tag_slots = packing.slots_for(digits.size, whole.size) - integrity.SLOTS
        tag = self._mac.seal(stamp, digits, tail)
        codec.pack_add(words[tag_slots:], np.empty(0), tag, packing, q)
        if self.masker is not None and self.masker.active(stamp):
            ahead = self._masks.pop((stamp.job, stamp.round_num, stamp.phase), None)
            prepared = None if ahead is None else (ahead[0], ahead[1].result())
            seal_format.add_mod(c0, self.masker.mask(stamp, count, n, q, prepared), q)
        encrypted = time.perf_counter()
        envelope_codec = self.codec_for_round(stamp)
        payload = envelope.to_bytes(
            envelope_codec,
            UPDATE,
            stamp,
            update.values.size,
            count,
            size,
            [seal_format.to_wire(c0)],
            seeds=(seed,),
        )
        self.last_seconds = {
            "encrypt": encrypted - start,
            "serialize": time.perf_counter() - encrypted,
        }
        return payload

    def confirm(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        """This client's signature of the survivor set of ``stamp``'s phase (``masking``)."""
        return self._masker().confirm(stamp, survivors)

    def reveal(
        self, stamp: Stamp, survivors: tuple[int, ...], confirmations: dict[int, bytes]
    ) -> Reveal:
        """What unmasks the sum of ``stamp``'s phase over the confirmed ``survivors``
        (``masking.Masker.reveal``)."""
        return self._masker().reveal(stamp, survivors, confirmations)

    def _masker(self) -> Masker:
        if self.masker is None:
            raise PayloadError("this client does not mask; it has nothing to unmask", "bad-plan")
        return self.masker

    def decrypt(self, payload: bytes, stamp: Stamp) -> Aggregate:
        opened = self._format.open(payload, stamp, AGGREGATE)
        if self.masker is not None:
            self.masker.check_late(stamp, opened.contributors)
        c0 = seal_format.from_wire(opened.body, self._shape.modulus).reshape(
            opened.blob_count, self._shape.poly_modulus_degree
        )
        n, roster = opened.values, stamp.roster
        packing = self._format.packing(stamp)
        # Decrypted, scaled down and unpacked in one pass (``codec``).
        product = self._secret.c1_s(opened.seeds, first_index(stamp), len(c0))
        q, senders = self._shape.modulus, len(opened.contributors)
        try:
            digits, tail = codec.open_sum(c0, product, q, senders, packing, n + roster, TAIL)
        except PayloadError as err:
            if err.reason == "out-of-range":
                # A duplicated update overflows digits too: let the tally name it if it can.
                loose, _ = codec.open_sum(
                    c0, product, q, senders, packing, n + roster, TAIL, check_range=False
                )
                ledger.check_tally(loose[n:], stamp, opened.contributors)
            raise
        update_blobs = self._update_blobs.get((stamp.job, stamp.round_num))
        if stamp.phase == SCALES and update_blobs:
            # The update's sum will list the same seeds, unless a client drops out between the
            # phases: its c1 s can be made while this client encrypts and the server adds.
            self._secret.prefetch(opened.seeds, 0, update_blobs, BACKGROUND.submit)
        return ledger.settle(
            digits[:n], digits[n:], tail, stamp, opened.contributors, mac=self._mac
        )


def _entries(values: int, stamp: Stamp) -> int:
    """Integers a client encrypts and tags for ``values`` values: its digits, the tally (one
    per roster position) and the ledger's whole-number entries."""
    return values + stamp.roster + ledger.TAIL


#: One background thread per process prepares every client's encryptions (a simulation holds
#: many clients; a deployed site, one), and with DP draws their noise after them
#: (``quantized``): one thread, in order, so that a client's own work never waits on two.
BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="secagg-precompute")


class _Zeros:
    """Encryptions of zero made ahead of time in the background thread, each used once.

    The thread runs numba kernels and AES, which release the GIL: it prepares a round's
    payloads while the client's model trains. Both phases of a round share one seed (on
    disjoint index ranges, ``_FIRST_INDEX``); a phase prepared again (a retried round) draws a
    new seed, so no seed's key stream ever encrypts two messages. A payload that was not
    prepared makes its own, under a fresh seed."""

    def __init__(self, secret: rlwe.SecretKey) -> None:
        self._secret = secret
        #: (job, round, phase) -> (ciphertext count, its seed and encryptions of zero)
        self._ready: dict[tuple[bytes, int, int], tuple[int, Future[tuple[bytes, np.ndarray]]]]
        self._ready = {}
        #: the round being prepared, its seed and the phases prepared under that seed
        self._seed: tuple[tuple[bytes, int], bytes, set[int]] | None = None
        self._lock = threading.Lock()

    def prepare(self, stamp: Stamp, count: int) -> None:
        this_round = (stamp.job, stamp.round_num)
        with self._lock:
            if self._seed is None or self._seed[0] != this_round or stamp.phase in self._seed[2]:
                self._seed = (this_round, seeded.fresh_seed(), set())
                self._ready = {key: v for key, v in self._ready.items() if key[:2] == this_round}
            _, seed, phases = self._seed
            phases.add(stamp.phase)
            made = BACKGROUND.submit(self._make, seed, count, first_index(stamp))
            self._ready[(*this_round, stamp.phase)] = (count, made)

    def take(self, stamp: Stamp, count: int) -> tuple[bytes, np.ndarray]:
        """A seed and its ``count`` encryptions of zero for ``stamp``'s phase, never handed
        out twice (each is removed before it is used)."""
        with self._lock:
            prepared = self._ready.pop((stamp.job, stamp.round_num, stamp.phase), None)
        if prepared is not None and prepared[0] == count:
            return prepared[1].result()
        return self._make(seeded.fresh_seed(), count, first_index(stamp))

    def _make(self, seed: bytes, count: int, start: int) -> tuple[bytes, np.ndarray]:
        return seed, self._secret.encrypt_zero(seed, count, start)
