"""Ciphers: the one place where plaintext and homomorphic aggregation differ.

A client-side cipher turns a flat float vector into payload bytes and back; a server-side
cipher adds payloads. Payloads are bytes (see ``envelope``), so the same round loop runs
in-process or over a network and measures exactly what would be sent.

``plain`` is the reference implementation and the test oracle; ``ckks`` is the only module that
imports TenSEAL.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np


class ClientCipher(Protocol):
    """What a client does with its secret (or, for plaintext, with nothing)."""

    name: str

    def encrypt(self, vector: np.ndarray, round_num: int = 0) -> bytes:
        """Encrypt a flat float vector; return payload bytes."""
        ...

    def decrypt(self, payload: bytes, round_num: int | None = None) -> np.ndarray:
        """Decrypt a payload (checked against ``round_num`` when given); return float64 values."""
        ...


class ServerCipher(Protocol):
    """What the server can do: add payloads it cannot read."""

    name: str

    def sum(self, payloads: Iterable[bytes]) -> bytes:
        """Add payloads one at a time as they arrive; return the summed payload."""
        ...
