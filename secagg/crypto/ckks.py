"""CKKS through TenSEAL: the only module that imports tenseal.

Clients weight their own update before encrypting, so the server only adds ciphertexts
(multiplicative depth zero): it needs no relinearization, rotation or plaintext multiply, and
one data prime is enough. Vectors are chunked to the slot count here, because TenSEAL would
otherwise split them itself with a warning per call. TenSEAL objects do not pickle and are not
safe to share, so everything that leaves this module is bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np
import tenseal as ts

from secagg.config import CkksParams
from secagg.crypto.envelope import Envelope, check_round, from_bytes
from secagg.errors import KeyFileError, PayloadError

CODEC_ID = 1
# Bound on how large any summed value may grow, so a sum can never wrap around the modulus
# silently: |value| * 2**scale_bits must stay far below the data prime (2**59 for 60 bits).
_HEADROOM_BITS = 3


def make_contexts(params: CkksParams) -> tuple[bytes, bytes]:
    """Generate a key pair; return (client context with secret key, server context without)."""
    try:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
    except ValueError as err:
        raise KeyFileError(f"TenSEAL refused the CKKS parameters: {err}") from err
    context.global_scale = 2.0**params.global_scale_bits
    secret = context.serialize(save_secret_key=True)
    context.make_context_public()
    return secret, context.serialize()


def _load_context(data: bytes) -> ts.Context:
    try:
        return ts.context_from(data)
    except Exception as err:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes
        raise KeyFileError(f"not a TenSEAL CKKS context ({err}); run 'secagg keygen'") from err


def context_is_private(data: bytes) -> bool:
    """True when serialized context bytes hold a secret key."""
    return bool(_load_context(data).is_private())


def max_value(params: CkksParams) -> float:
    """Largest magnitude a (summed) slot value may reach without wrapping the modulus."""
    data_bits = params.coeff_mod_bit_sizes[0]
    return 2.0 ** (data_bits - params.global_scale_bits - _HEADROOM_BITS)


class _CkksBase:
    name = "ckks"

    def __init__(self, context: bytes, fingerprint: bytes, params: CkksParams) -> None:
        self._context = _load_context(context)
        self._fingerprint = fingerprint
        self._params = params
        # A ciphertext is two polynomials of N coefficients, 8 bytes per prime; allow slack.
        primes = len(params.coeff_mod_bit_sizes)
        self._max_blob = 2 * params.poly_modulus_degree * 8 * primes + 65536

    def _open(self, payload: bytes, round_num: int | None) -> Envelope:
        envelope = from_bytes(
            payload, codec=CODEC_ID, fingerprint=self._fingerprint, max_blob=self._max_blob
        )
        check_round(envelope, round_num)
        expected = math.ceil(envelope.length / self._params.slots)
        if len(envelope.blobs) != expected:
            raise PayloadError(
                f"payload has {len(envelope.blobs)} ciphertexts for {envelope.length} values "
                f"(expected {expected})"
            )
        return envelope

    def _vector(self, blob: bytes) -> ts.CKKSVector:
        try:
            return ts.ckks_vector_from(self._context, blob)
        except Exception as err:
            raise PayloadError(f"ciphertext does not load under these keys: {err}") from err


class CkksClient(_CkksBase):
    """Client side: encrypts and decrypts; needs the secret context.

    ``last_seconds`` splits the last ``encrypt`` into encryption and serialization time.
    """

    def __init__(self, context: bytes, fingerprint: bytes, params: CkksParams) -> None:
        super().__init__(context, fingerprint, params)
        self.last_seconds: dict[str, float] = {}
        if not self._context.is_private():
            raise KeyFileError(
                "a client needs the secret context (keys/client.ctx), "
                "but was given a public one (server.ctx)"
            )

    def encrypt(self, vector: np.ndarray, round_num: int = 0) -> bytes:
        vector = np.asarray(vector, dtype=np.float64)
        limit = max_value(self._params)
        if vector.size and not np.isfinite(vector).all():
            raise PayloadError("update has NaN or infinite values; training diverged")
        if vector.size and np.abs(vector).max() > limit:
            raise PayloadError(
                f"update value {np.abs(vector).max():.3g} exceeds the CKKS range {limit:.3g}; "
                "lower --lr or make keys with fewer scale bits"
            )
        slots = self._params.slots
        start_time = time.perf_counter()
        ciphertexts = [
            ts.ckks_vector(self._context, vector[start : start + slots].tolist())
            for start in range(0, vector.size, slots)
        ]
        encrypted = time.perf_counter()
        blobs = tuple(ciphertext.serialize() for ciphertext in ciphertexts)
        payload = Envelope(CODEC_ID, self._fingerprint, round_num, vector.size, blobs).to_bytes()
        self.last_seconds = {
            "encrypt": encrypted - start_time,
            "serialize": time.perf_counter() - encrypted,
        }
        return payload

    def decrypt(self, payload: bytes, round_num: int | None = None) -> np.ndarray:
        envelope = self._open(payload, round_num)
        out = np.empty(envelope.length, dtype=np.float64)
        slots = self._params.slots
        for index, blob in enumerate(envelope.blobs):
            start = index * slots
            stop = min(start + slots, envelope.length)
            values = self._vector(blob).decrypt()
            if len(values) != stop - start:
                raise PayloadError("a ciphertext holds a different number of values than declared")
            out[start:stop] = values
        return out


class CkksServer(_CkksBase):
    """Server side: adds ciphertexts; refuses any context that holds a secret key."""

    def __init__(self, context: bytes, fingerprint: bytes, params: CkksParams) -> None:
        super().__init__(context, fingerprint, params)
        if self._context.is_private():
            raise KeyFileError(
                "the server was given a context with the secret key; it must only ever load "
                "the public context (keys/server.ctx)"
            )

    def sum(self, payloads: Iterable[bytes]) -> bytes:
        """Add payloads as they arrive: holds the running sum and one payload, never all."""
        totals: list[ts.CKKSVector] = []
        first: Envelope | None = None
        for payload in payloads:
            envelope = self._open(payload, first.round_num if first else None)
            if first is None:
                first = envelope
                totals = [self._vector(blob) for blob in envelope.blobs]
                continue
            if envelope.length != first.length:
                raise PayloadError(
                    f"payload has {envelope.length} values, the round has {first.length}"
                )
            for total, blob in zip(totals, envelope.blobs, strict=True):
                try:
                    total += self._vector(blob)
                except ValueError as err:
                    raise PayloadError(f"ciphertexts cannot be added: {err}") from err
        if first is None:
            raise PayloadError("no payloads to sum")
        blobs = tuple(total.serialize() for total in totals)
        return Envelope(
            CODEC_ID, self._fingerprint, first.round_num, first.length, blobs
        ).to_bytes()
