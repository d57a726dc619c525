"""Ciphers: the one place where plaintext and homomorphic aggregation differ.

A client-side cipher turns a client's update into payload bytes and an aggregate's bytes back
into an audited sum; a server-side cipher adds payloads. A codec that needs the clients to
agree on something first (the packed CKKS codec agrees on quantization steps) says so by
returning a payload from ``prepare``; the server adds those like updates, and every client
reads the agreement back from their sum. Payloads are bytes (``envelope``), so the same round
loop runs in-process or over a network and measures exactly what would be sent. Every payload
carries a ledger (``ledger``) the clients check after decrypting.

``plain`` is the reference implementation and the test oracle; ``ckks`` (client side) is the
only module that imports TenSEAL, ``quantized`` puts the scale exchange around it, and
``ckks_server`` adds ciphertexts without TenSEAL.

The package is in layers, each module importing only from its layer or below (checked by
``tests/test_layers.py``): ring arithmetic (``ring``, ``ntt``, ``seeded``); the RLWE scheme
and SEAL's format (``seal_format``, ``params``, ``caches``, ``rlwe``); the codec (``packing``,
``codec``); the protocol (``envelope``, ``integrity``, ``ledger``, ``report``, ``shares``,
``neighbours``, ``policy``, ``masking``, ``certified``); and the ciphers (this package,
``plain``, ``ckks``, ``ckks_server``, ``quantized``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from secagg.crypto import envelope
from secagg.crypto.envelope import SERVER, Stamp, contributors
from secagg.crypto.ledger import Aggregate, Update
from secagg.crypto.masking import Advertised, Masker, MaskRoster, Relayed, Reveal, Sealed, SignedKey
from secagg.crypto.policy import RoundPolicy

if TYPE_CHECKING:  # the server imports this package: no torch here
    from cryptography.hazmat.primitives.asymmetric import ec

    from secagg.crypto.params import Keys
    from secagg.crypto.quantized import Agreement
    from secagg.crypto.report import Reading
    from secagg.flatten import Layout
    from secagg.privacy import Privacy


class Identities(Protocol):
    """The site keys that sign and check the clients' mask keys: simulated ones
    (``masking.SimulatedIdentities``) or a deployment's site certificates (``sites``)."""

    def signer(self, site: int) -> ec.EllipticCurvePrivateKey:
        """The signing key of ``site`` (a deployment's client holds only its own)."""
        ...

    def verifier(self, site: int) -> ec.EllipticCurvePublicKey:
        """The public key that ``site``'s signatures are checked with."""
        ...

    def name(self, site: int) -> str:
        """How errors call ``site``."""
        ...


class ClientCipher(Protocol):
    """What a client does with its secret (or, for plaintext, with nothing)."""

    name: str
    #: differential privacy's clipping and noise (``secagg.privacy``; None: off)
    privacy: Privacy | None

    def prepare(
        self,
        values: np.ndarray,
        stamp: Stamp,
        samples: int = 1,
        metrics: Mapping[str, float] | None = None,
    ) -> bytes | None:
        """What this client contributes to the round's agreement on how to encode ``values``
        (its change to the global model; ``samples`` its sample count, its weight before the
        round's total is known; ``metrics`` its task's training metrics, which an integer
        codec encrypts with the agreement), or None when the codec needs none (the count and
        metrics then travel in plain)."""
        ...

    def precompute(self, stamp: Stamp) -> None:
        """Start preparing, in the background, what encrypting this client's payloads of
        ``stamp``'s round takes beyond the values themselves (called before training)."""
        ...

    def publish(self, job: bytes, site: int) -> SignedKey | None:
        """This client's signed key-agreement key for ``job`` as ``site``, or None when it
        does not mask (``masking``)."""
        ...

    def advertise(
        self, stamp: Stamp, peers: Sequence[SignedKey | None], nonce: bytes
    ) -> Advertised | None:
        """This client's signed keys for attempt ``nonce`` of ``stamp``'s round and its shares
        of them, sealed to the round's positions (``peers[p]``: position ``p``'s job key, None
        for a position without one); None when it does not mask (``masking``)."""
        ...

    def agree(self, stamp: Stamp, adverts: Relayed, sealed: Sealed, nonce: bytes) -> None:
        """Check the attempt's relayed keys (``adverts[p]``: position ``p``'s, None for a
        position that advertised none), open the shares sealed to this client, and mask every
        payload of ``stamp``'s round, attempt ``nonce``, with them."""
        ...

    def confirm(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        """This client's signature of the survivor set of ``stamp``'s phase (``masking``)."""
        ...

    def reveal(
        self, stamp: Stamp, survivors: tuple[int, ...], confirmations: dict[int, bytes]
    ) -> Reveal:
        """What unmasks the sum of ``stamp``'s phase over ``survivors``, once at least the
        policy's threshold of them confirmed that set (once per round and phase)."""
        ...

    def agreement(self, stamp: Stamp, agreed: bytes | None) -> Agreement | None:
        """What the sum of ``stamp``'s round's ``prepare`` payloads says (the integer codec's
        steps, sample total and training metrics), or None when the codec needs none."""
        ...

    def evaluation(
        self,
        stamp: Stamp,
        metrics: Mapping[str, float] | None,
        count: int = 0,
        unmasked: bool = False,
    ) -> bytes | None:
        """This client's evaluation (``metrics`` over ``count`` test examples; None: no test
        data) encrypted for ``stamp``'s evaluation phase (masked unless ``unmasked``), or None
        when the codec sends evaluations in plain."""
        ...

    def averages(self, payload: bytes, stamp: Stamp, names: Mapping[str, object]) -> Reading:
        """The sum of ``stamp``'s evaluations, decrypted and read with ``names``."""
        ...

    def encrypt(self, update: Update, stamp: Stamp, agreed: bytes | None) -> bytes:
        """Encrypt one client's weighted update, stamped with its job, round and roster index;
        ``agreed`` is the sum of the round's ``prepare`` payloads."""
        ...

    def decrypt(self, payload: bytes, stamp: Stamp, agreed: bytes | None) -> Aggregate:
        """Decrypt the aggregate of ``stamp``'s job and round, check its ledger, and return the
        sum of the weighted updates as floats."""
        ...


class ServerCipher(Protocol):
    """What the server can do: add payloads it cannot read."""

    name: str
    #: what this codec's payloads must say in their envelope (a receiver checks headers early)
    codec: envelope.Codec
    #: whether clients send a ``prepare`` payload (the scale exchange) before their update
    quantizes: bool

    def codec_for_round(self, stamp: Stamp) -> envelope.Codec:
        """What the payloads of ``stamp``'s round must say in their envelope (the packed
        codec's packing depends on the round's size)."""
        ...

    def size(self, values: int, stamp: Stamp) -> int:
        """The byte length of a well-formed update of ``values`` values for ``stamp``'s round
        (a streaming receiver refuses any other declared size at the first chunk)."""
        ...

    def check(
        self, payload: bytes | memoryview, stamp: Stamp, values: int | None = None
    ) -> envelope.Envelope:
        """Refuse (PayloadError) an update ``sum`` would refuse, without adding it; with
        ``values``, also one that does not carry exactly that many values. A payload (``bytes``)
        checked here, as it arrived, is not checked again when ``sum`` adds it."""
        ...

    def sum(
        self,
        payloads: Iterable[bytes],
        stamp: Stamp,
        allowed: frozenset[int] | None = None,
        values: int | None = None,
    ) -> bytes:
        """Add a round's payloads one at a time as they arrive; return the aggregate.

        ``allowed``: the only senders whose payloads may be added (None: any roster member).
        ``values``: how many values every payload must carry, from the job's model (None: the
        first payload's, only for callers summing payloads they made themselves).
        """
        ...

    def corrected(
        self, aggregate: bytes, reveals: Sequence[Reveal], stamp: Stamp, roster: MaskRoster
    ) -> bytes:
        """``aggregate`` unmasked (``masking.unmasking``): every contributor's self-mask
        removed with the key it revealed (or, for one that revealed nothing, the key its
        shares rebuild, checked against its commitment in ``roster``), and the pairs of every
        position of ``roster`` that advertised keys and sent nothing, from its mask key
        rebuilt from the contributors' shares."""
        ...


def for_client(
    he: bool,
    keys_dir: str | Path,
    precision: str | None = None,
    identities: Identities | None = None,
    policy: RoundPolicy | None = None,
    privacy: Privacy | None = None,
    keys: Keys | None = None,
) -> Callable[[Layout], ClientCipher]:
    """A factory of client-side ciphers for a job: each client gets its own, for its model's
    layout. Keys are read once, here. ``precision``: ``float32``/``float64`` for plaintext,
    ``standard``/``fine`` for HE (``RunConfig.precision``). With ``identities`` (HE only)
    every cipher masks its payloads pairwise, signing its key-agreement keys with those site
    keys, and enforces ``policy`` on every round (``crypto.policy``). ``privacy``: differential
    privacy (``secagg.privacy``): clipping, and with HE the noise inside the encrypted sum.
    ``keys``: the client keys already loaded (then ``keys_dir`` is not read)."""
    if not he:
        from secagg.crypto.plain import PlainCipher

        return lambda layout: PlainCipher(precision or "float32", privacy)
    from secagg import keys as key_files
    from secagg.crypto.ckks import CkksClient
    from secagg.crypto.quantized import QuantizedCipher

    loaded = keys if keys is not None else key_files.load_for_client(keys_dir)

    def make(layout: Layout) -> ClientCipher:
        masker = None
        if identities is not None:
            masker = Masker(identities.signer, identities.verifier, identities.name, policy)
        inner = CkksClient(loaded, masker, precision or "standard")
        return QuantizedCipher(inner, layout, privacy)

    return make


def for_server(
    he: bool, keys_dir: str | Path, precision: str | None = None, privacy: Privacy | None = None
) -> ServerCipher:
    """The server-side cipher for a job; for HE it is built from the public context only.
    ``precision`` as in ``for_client``; the clients' and the server's must match.
    ``privacy`` (plaintext only: with HE the sites add the noise): central differential
    privacy, the server noising each update sum it makes."""
    if not he:
        from secagg.crypto.plain import PlainCipher

        return PlainCipher(precision or "float32", privacy)
    from secagg import keys
    from secagg.crypto.ckks_server import CkksServer

    return CkksServer(keys.load_for_server(keys_dir), precision or "standard")


__all__ = [
    "SERVER",
    "Aggregate",
    "ClientCipher",
    "Identities",
    "MaskRoster",
    "Reveal",
    "RoundPolicy",
    "ServerCipher",
    "Stamp",
    "Update",
    "contributors",
    "for_client",
    "for_server",
]
