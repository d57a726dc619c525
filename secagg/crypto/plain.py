"""Plaintext FedAvg: float32 vectors in the same envelope and ledger. The reference for tests.

A payload's one blob is ``values ++ tally ++ tail`` (see ``ledger``) as little-endian float32,
what plaintext FedAvg sends; the server adds in float64 and sends the sum back as float32.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

import numpy as np

from secagg.crypto import envelope, ledger
from secagg.crypto.envelope import AGGREGATE, UPDATE, Stamp
from secagg.crypto.ledger import Aggregate, Update
from secagg.errors import PayloadError

# No keys in a plaintext run; a fixed fingerprint still stops HE payloads being read as plain.
CODEC = envelope.Codec(0, hashlib.sha256(b"secagg-plaintext").digest()[:16], b"f32\0")
MAX_VALUES = 1 << 31


class PlainCipher:
    """Both sides of plaintext FedAvg: float32 on the wire, float64 while summing."""

    name = "plain"
    sum_limit: int | None = None

    def __init__(self) -> None:
        self.last_seconds: dict[str, float] = {}

    def encrypt(self, update: Update, stamp: Stamp) -> bytes:
        start = time.perf_counter()
        tally, tail = ledger.entries(update, stamp)
        vector = np.concatenate([np.asarray(update.values, np.float64), tally, tail])
        payload = _payload(UPDATE, stamp, update.values.size, vector)
        self.last_seconds = {"encrypt": 0.0, "serialize": time.perf_counter() - start}
        return payload

    def decrypt(self, payload: bytes, stamp: Stamp) -> Aggregate:
        opened = _open(payload, stamp, AGGREGATE)
        vector = np.frombuffer(opened.body, dtype="<f4").astype(np.float64)
        n, roster = opened.values, stamp.roster
        return ledger.settle(
            vector[:n], vector[n : n + roster], vector[n + roster :], stamp, opened.contributors
        )

    def sum(
        self, payloads: Iterable[bytes], stamp: Stamp, allowed: frozenset[int] | None = None
    ) -> bytes:
        total: np.ndarray | None = None
        values = 0
        senders: list[int] = []
        for payload in payloads:
            opened = _open(payload, stamp, UPDATE)
            ledger.admit(opened.stamp.sender, senders, opened.values, values, allowed)
            vector = np.frombuffer(opened.body, dtype="<f4")
            if total is None:
                total, values = vector.astype(np.float64), opened.values
            else:
                total += vector
            senders.append(opened.stamp.sender)
        if total is None:
            raise PayloadError("no payloads to sum", "empty")
        return _payload(AGGREGATE, stamp, values, total, tuple(sorted(senders)))


def _payload(
    kind: int, stamp: Stamp, values: int, vector: np.ndarray, contributors: tuple[int, ...] = ()
) -> bytes:
    data = np.ascontiguousarray(vector, dtype="<f4")
    return envelope.to_bytes(CODEC, kind, stamp, values, 1, data.nbytes, [data], contributors)


def _open(payload: bytes, stamp: Stamp, kind: int) -> envelope.Envelope:
    def blobs_for(values: int) -> tuple[int, int]:
        return 1, 4 * (values + stamp.roster + ledger.TAIL)

    return envelope.from_bytes(
        payload, CODEC, stamp, kind, blobs_for=blobs_for, max_values=MAX_VALUES
    )
