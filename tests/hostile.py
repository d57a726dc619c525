"""What a dishonest server or a forger could do to payloads, for the tests that must catch it.

These helpers bypass every check on purpose: they add updates the way a server that skipped
its own refusals would, list whatever contributors they like, and rewrite envelope headers
with a valid digest (a digest is no signature).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import oracles

from secagg.crypto import SERVER, Stamp, envelope
from secagg.crypto.ckks_server import CkksServer
from secagg.crypto.packing import PACKED
from secagg.crypto.plain import PlainCipher
from secagg.crypto.seal_format import CiphertextShape, add_mod, from_wire, to_wire

# Offsets into the fixed header (see secagg.crypto.envelope).
JOB_OFFSET = 4 + 4 + 16
ROUND_OFFSET = JOB_OFFSET + 16
SENDER_OFFSET = ROUND_OFFSET + 4


def body_of(payload: bytes) -> tuple[bytes, int, int, int, memoryview]:
    """(header, values, blob count, blob size, body) of any well-formed payload, unchecked."""
    head = payload[: envelope.HEADER_SIZE]
    values, _, count, size, contributors, seed_size, seeds = struct.unpack_from(
        ">Q4sIQIHI", head, ROUND_OFFSET + 12
    )
    start = envelope.HEADER_SIZE + 4 * contributors + seed_size * seeds
    return head, values, count, size, memoryview(payload)[start : start + count * size]


def seeds_of(payload: bytes) -> tuple[bytes, ...]:
    """The seeds a well-formed payload carries (its sender's, or an aggregate's), unchecked."""
    head = payload[: envelope.HEADER_SIZE]
    contributors, seed_size, seeds = struct.unpack_from(">IHI", head, envelope.HEADER_SIZE - 10)
    start = envelope.HEADER_SIZE + 4 * contributors
    return tuple(
        bytes(payload[start + i * seed_size : start + (i + 1) * seed_size]) for i in range(seeds)
    )


def with_seeds(payload: bytes, seeds: tuple[bytes, ...]) -> bytes:
    """``payload`` listing ``seeds`` (any number) instead of its own, its seed count and digest
    made consistent: what a forger sends."""
    head = bytearray(payload[: envelope.HEADER_SIZE])
    contributors, seed_size, old = struct.unpack_from(">IHI", head, envelope.HEADER_SIZE - 10)
    struct.pack_into(">I", head, envelope.HEADER_SIZE - 4, len(seeds))
    start = envelope.HEADER_SIZE + 4 * contributors
    ids = payload[envelope.HEADER_SIZE : start]
    rest = payload[start + old * seed_size : -32]
    return with_digest(bytes(head) + ids + b"".join(seeds) + rest)


def forge_aggregate(
    server: CkksServer | PlainCipher,
    payloads: list[bytes],
    round_stamp: Stamp,
    contributors: tuple[int, ...],
) -> bytes:
    """Add ``payloads`` without any check and claim ``contributors`` added them; an HE
    aggregate lists the seeds of the payloads it added (so it decrypts without noise, and only
    the clients' ledger check can tell what was added)."""
    total: np.ndarray | None = None
    values = count = size = 0
    seeds: tuple[bytes, ...] = ()
    for payload in payloads:
        seeds += seeds_of(payload)
        _, values, count, size, body = body_of(payload)
        if isinstance(server, PlainCipher):
            part = np.frombuffer(body, dtype="<f4").astype(np.float64)
            total = part if total is None else total + part
        else:
            words = from_wire(body, server._shape.modulus)
            if total is None:
                total = words
            else:
                add_mod(total, words, server._shape.modulus)
    assert total is not None
    total = total.astype("<f4") if isinstance(server, PlainCipher) else to_wire(total)
    return envelope.to_bytes(
        server.codec,
        envelope.AGGREGATE,
        round_stamp.for_sender(SERVER),
        values,
        count,
        size,
        [total],
        contributors,
        seeds,
    )


def restamp(payload: bytes, *, round_num: int | None = None, sender: int | None = None) -> bytes:
    """The same payload with its round or sender rewritten and a valid digest."""
    data = bytearray(payload[:-32])
    if round_num is not None:
        struct.pack_into(">I", data, ROUND_OFFSET, round_num)
    if sender is not None:
        struct.pack_into(">I", data, SENDER_OFFSET, sender)
    return bytes(data) + hashlib.sha256(data).digest()


def with_digest(body_without_digest: bytes | bytearray) -> bytes:
    """Re-seal edited payload bytes (everything but the old digest) with a valid digest."""
    return bytes(body_without_digest) + hashlib.sha256(body_without_digest).digest()


def trivial_ciphertext(shape: CiphertextShape, slots: np.ndarray) -> np.ndarray:
    """A keyless ("trivial") ciphertext of the integer ``slots`` (at most N of them): ``c0`` is
    the plaintext ``Delta m`` in coefficients, ``c1`` is zero, so it decrypts to ``slots``
    under *any* key. Anyone can make one from the public parameters alone (N, q and the
    codec's scale, which the envelope names)."""
    n, q = shape.poly_modulus_degree, shape.modulus
    words = oracles.encode(np.rint(slots).astype(np.int64), 1, n, PACKED.scale_bits, q)[0]
    return np.stack([words, np.zeros_like(words)])


def add_trivial(server: CkksServer, aggregate: bytes, delta: np.ndarray) -> bytes:
    """``aggregate`` plus a trivial ciphertext of the slot vector ``delta`` (zeros beyond it),
    what a malicious server that skipped its own rules sends, with a valid digest. Its ``c1``
    is zero, so it changes only the ``c0`` words the aggregate carries."""
    shape = server._shape
    _, _, count, size, body = body_of(aggregate)
    words = from_wire(body, shape.modulus).reshape(count, -1)
    per = shape.poly_modulus_degree
    for index in range(count):
        part = delta[index * per : (index + 1) * per]
        if np.any(part):
            add_mod(words[index], trivial_ciphertext(shape, part)[0], shape.modulus)
    start = len(aggregate) - 32 - count * size
    return with_digest(aggregate[:start] + to_wire(words).tobytes())


def restamp_job(payload: bytes, job: bytes) -> bytes:
    """The same payload with its job field rewritten and a valid digest."""
    data = bytearray(payload[:-32])
    data[JOB_OFFSET : JOB_OFFSET + 16] = job
    return with_digest(data)
