"""Ciphers: the one place where plaintext and homomorphic aggregation differ.

A client-side cipher turns an update into payload bytes and an aggregate's bytes back into an
audited sum; a server-side cipher adds payloads. Payloads are bytes (``envelope``), so the same
round loop runs in-process or over a network and measures exactly what would be sent. Every
payload carries a ledger (``ledger``) the clients check after decrypting.

``plain`` is the reference implementation and the test oracle; ``ckks`` (client side) is the
only module that imports TenSEAL, and ``ckks_server`` adds ciphertexts without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from secagg.config import RunConfig
from secagg.crypto import envelope
from secagg.crypto.envelope import SERVER, Stamp, contributors
from secagg.crypto.ledger import Aggregate, Update


class ClientCipher(Protocol):
    """What a client does with its secret (or, for plaintext, with nothing)."""

    name: str
    #: the last ``encrypt`` split into "encrypt" and "serialize" seconds
    last_seconds: dict[str, float]
    #: For an integer codec, the largest magnitude a *summed* value may reach (the clients'
    #: quantization steps keep every sum within it); None for a float codec.
    sum_limit: int | None

    def encrypt(self, update: Update, stamp: Stamp) -> bytes:
        """Encrypt one client's update, stamped with its job, round and roster index."""
        ...

    def decrypt(self, payload: bytes, stamp: Stamp) -> Aggregate:
        """Decrypt the aggregate of ``stamp``'s job and round and check its ledger."""
        ...


class ServerCipher(Protocol):
    """What the server can do: add payloads it cannot read."""

    name: str
    #: what this codec's payloads must say in their envelope (a receiver checks headers early)
    codec: envelope.Codec
    #: whether rounds start with the scale exchange (integer codecs)
    quantizes: bool

    def check(self, payload: bytes | memoryview, stamp: Stamp) -> envelope.Envelope:
        """Refuse (PayloadError) an update ``sum`` would refuse, without adding it."""
        ...

    def sum(
        self, payloads: Iterable[bytes], stamp: Stamp, allowed: frozenset[int] | None = None
    ) -> bytes:
        """Add a round's payloads one at a time as they arrive; return the aggregate.

        ``allowed``: the only senders whose payloads may be added (None: any roster member).
        """
        ...


def for_client(config: RunConfig) -> Callable[[], ClientCipher]:
    """A factory of client-side ciphers for the job (each client gets its own)."""
    if not config.he:
        from secagg.crypto.plain import PlainCipher

        return lambda: PlainCipher(config.plain_precision)
    from secagg import keys
    from secagg.crypto.ckks import CkksClient

    loaded = keys.load_for_client(config.keys_dir)
    return lambda: CkksClient(loaded)


def for_server(config: RunConfig) -> ServerCipher:
    """The server-side cipher for the job; for HE it is built from the public context only."""
    if not config.he:
        from secagg.crypto.plain import PlainCipher

        return PlainCipher(config.plain_precision)
    from secagg import keys
    from secagg.crypto.ckks_server import CkksServer

    return CkksServer(keys.load_for_server(config.keys_dir))


__all__ = [
    "SERVER",
    "Aggregate",
    "ClientCipher",
    "ServerCipher",
    "Stamp",
    "Update",
    "contributors",
    "for_client",
    "for_server",
]
