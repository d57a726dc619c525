"""Ciphers: the one place where plaintext and homomorphic aggregation differ.

A client-side cipher turns a flat float vector into payload bytes and back; a server-side
cipher adds payloads. Payloads are bytes (see ``envelope``), so the same round loop runs
in-process or over a network and measures exactly what would be sent.

``plain`` is the reference implementation and the test oracle; ``ckks`` is the only module that
imports TenSEAL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from secagg.config import RunConfig


@dataclass
class Update:
    """What a client encrypts, and what the sum of them decrypts to.

    ``values`` is the client's weighted model update ``p_i * (w_i - w_global)`` (float64; for an
    integer codec, already quantized to integers), ``weight`` is ``p_i`` and ``clipped`` counts
    the values quantization had to clip. Summed over clients each field is the total.
    """

    values: np.ndarray
    weight: float
    clipped: int = 0


class ClientCipher(Protocol):
    """What a client does with its secret (or, for plaintext, with nothing)."""

    name: str
    #: the last ``encrypt`` split into "encrypt" and "serialize" seconds
    last_seconds: dict[str, float]

    #: For an integer codec, the bound L: a client's values must be integers within
    #: ``weight * L``. None for a float codec, which takes any float values.
    value_bound: int | None

    def encrypt(self, update: Update, round_num: int = 0) -> bytes:
        """Encrypt one client's update; return payload bytes."""
        ...

    def decrypt(self, payload: bytes, round_num: int | None = None) -> Update:
        """Decrypt a payload (checked against ``round_num`` when given)."""
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
    return lambda: CkksClient(loaded, config.codec)


def for_server(config: RunConfig) -> ServerCipher:
    """The server-side cipher for the job; for HE it is built from the public context only."""
    if not config.he:
        from secagg.crypto.plain import PlainCipher

        return PlainCipher()
    from secagg import keys
    from secagg.crypto.ckks import CkksServer

    loaded = keys.load_for_server(config.keys_dir)
    return CkksServer(loaded, config.codec)


#: Float codecs carry the weight and the clipped count as two extra values after the update.
FLOAT_TAIL = 2


def to_float_vector(update: Update) -> np.ndarray:
    """An update as one float64 vector: values, then weight and clipped count."""
    return np.concatenate([np.asarray(update.values, np.float64), [update.weight, update.clipped]])


def from_float_vector(vector: np.ndarray) -> Update:
    """Inverse of ``to_float_vector``."""
    if vector.size < FLOAT_TAIL:
        from secagg.errors import PayloadError

        raise PayloadError("payload is too short to hold an update")
    return Update(vector[:-FLOAT_TAIL], float(vector[-2]), round(float(vector[-1])))
