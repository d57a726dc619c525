"""Ciphers: the one place where plaintext and homomorphic aggregation differ.

A client-side cipher turns a flat float vector into payload bytes and back; a server-side
cipher adds payloads. Payloads are bytes (see ``envelope``), so the same round loop runs
in-process or over a network and measures exactly what would be sent.

``plain`` is the reference implementation and the test oracle; ``ckks`` is the only module that
imports TenSEAL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

from secagg.config import RunConfig


class ClientCipher(Protocol):
    """What a client does with its secret (or, for plaintext, with nothing)."""

    name: str
    #: the last ``encrypt`` split into "encrypt" and "serialize" seconds
    last_seconds: dict[str, float]

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


def for_client(config: RunConfig) -> Callable[[], ClientCipher]:
    """A factory of client-side ciphers for the job (each client gets its own)."""
    if not config.he:
        from secagg.crypto.plain import PlainCipher

        return PlainCipher
    from secagg import keys
    from secagg.crypto.ckks import CkksClient

    loaded = keys.load_for_client(config.keys_dir)
    return lambda: CkksClient(loaded.context, loaded.fingerprint, loaded.params)


def for_server(config: RunConfig) -> ServerCipher:
    """The server-side cipher for the job; for HE it is built from the public context only."""
    if not config.he:
        from secagg.crypto.plain import PlainCipher

        return PlainCipher()
    from secagg import keys
    from secagg.crypto.ckks import CkksServer

    loaded = keys.load_for_server(config.keys_dir)
    return CkksServer(loaded.context, loaded.fingerprint, loaded.params)
