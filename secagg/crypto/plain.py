"""Plaintext FedAvg: float32 vectors in the same envelope. The reference for every test."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

import numpy as np

from secagg.crypto import Update, from_float_vector, to_float_vector
from secagg.crypto.envelope import Envelope, check_round, from_bytes
from secagg.errors import PayloadError

CODEC_ID = 0
# No keys in a plaintext run; a fixed fingerprint still stops HE payloads being read as plain.
FINGERPRINT = hashlib.sha256(b"secagg-plaintext").digest()[:16]


class PlainCipher:
    """Both sides of plaintext FedAvg: float32 on the wire, float64 while summing."""

    name = "plain"
    value_bound: int | None = None

    def __init__(self) -> None:
        self.last_seconds: dict[str, float] = {}

    def encrypt(self, update: Update, round_num: int = 0) -> bytes:
        return self._encode(to_float_vector(update), round_num)

    def decrypt(self, payload: bytes, round_num: int | None = None) -> Update:
        envelope = self._open(payload, round_num)
        return from_float_vector(np.frombuffer(envelope.blobs[0], dtype="<f4").astype(np.float64))

    def _encode(self, vector: np.ndarray, round_num: int) -> bytes:
        start = time.perf_counter()
        data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        payload = Envelope(CODEC_ID, FINGERPRINT, round_num, len(vector), (data,)).to_bytes()
        self.last_seconds = {"encrypt": 0.0, "serialize": time.perf_counter() - start}
        return payload

    def sum(self, payloads: Iterable[bytes]) -> bytes:
        total: np.ndarray | None = None
        first: Envelope | None = None
        for payload in payloads:
            envelope = self._open(payload, first.round_num if first else None)
            if first is not None and envelope.length != first.length:
                raise PayloadError(
                    f"payload has {envelope.length} values, the round has {first.length}"
                )
            values = np.frombuffer(envelope.blobs[0], dtype="<f4")
            if total is None:
                first, total = envelope, values.astype(np.float64)
            else:
                total += values
        if first is None or total is None:
            raise PayloadError("no payloads to sum")
        return self._encode(total, first.round_num)

    def _open(self, payload: bytes, round_num: int | None) -> Envelope:
        envelope = from_bytes(payload, codec=CODEC_ID, fingerprint=FINGERPRINT, max_blob=1 << 34)
        check_round(envelope, round_num)
        if len(envelope.blobs) != 1 or len(envelope.blobs[0]) != 4 * envelope.length:
            raise PayloadError("plaintext payload blob does not match its declared length")
        return envelope
