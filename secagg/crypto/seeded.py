"""Seeded ciphertexts: ``c1`` travels as a 32-byte seed, only ``c0`` as coefficients.

In symmetric RLWE encryption ``c1 = a`` is uniformly random and independent of the secret key
and of the message; only ``c0 = -a s + e + Delta m`` carries information. So a client draws a
fresh seed per round, expands it (``expand``) into one uniform polynomial ``a_i`` per
ciphertext ``i`` (in SEAL's NTT form, where the key is kept), builds ``c0`` for that ``a_i``
(``rlwe``) and sends ``c0`` and the seed: half the bytes. The round's two payloads (the scale
exchange, then the update) take disjoint ranges of ``i`` (``ckks.first_index``), so no ``a_i``
serves two messages, and the peers who read the seeds in the summed scales can expand the
update sum's ``c1`` before it arrives. SEAL's own symmetric encryption does
the same when asked to save a seed (``encrypt_zero_symmetric`` with ``save_seed``).

Sums: the server adds the ``c0`` of every update mod q and lists every contributor's seed;
each client expands all of them and adds the ``a``'s into the summed ``c1`` (``expand_sum``).
A seed that is not the one the contributor used (forged, dropped, another ciphertext's) adds
``(a_wrong - a) s`` to what the client decrypts: uniformly random to anyone without ``s``, so
the aggregate decrypts to noise and the unpacker refuses it (``not-integer``).

Expansion: AES-256-CTR keyed with the seed, its 128-bit counter starting at ``index || 0``
(``index`` of the ciphertext in the payload in the high 64 bits, so ciphertexts never share
key stream), read as little-endian 64-bit words, each masked to ``q``'s bit length and kept
when below ``q`` (rejection sampling: exactly uniform mod q; for a 60-bit NTT prime one word in
about 2**40 is drawn again). Many ciphertexts' streams are drawn in one AES call, over their
counter blocks written out (what CTR mode encrypts), which gives the same words. numpy,
``cryptography`` and one compiled rejection pass (``ring``, imported only when a client
expands): no TenSEAL, and the server, which only carries seeds, loads no numba.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

#: Bytes of one seed: an AES-256 key.
SEED_BYTES = 32
#: Polynomials summed before one reduction mod q (q < 2**60, so 15 + 1 terms fit 64 bits).
LAZY_TERMS = 15
#: Extra words drawn with the first batch so that a rejected word almost never costs a second.
_SPARE = 64
#: Key stream is drawn into a reused buffer of this many words at most: a fresh buffer per draw
#: costs more in page faults than AES itself does (28 MB: 25 ms fresh, 4 ms reused).
_CHUNK_WORDS = 1 << 17
_ZEROS = bytes(8 * _CHUNK_WORDS)
_SCRATCH = threading.local()


def key_stream(key: bytes, counter: bytes, words: int) -> Iterator[np.ndarray]:
    """``words`` little-endian 64-bit words of the AES-256-CTR key stream under ``key`` from
    the 16-byte ``counter`` on (``draw``'s chunks)."""
    return draw(ctr(key, counter), words)


def ctr(key: bytes, counter: bytes) -> CipherContext:
    """AES-256-CTR under ``key`` from the 16-byte ``counter`` on: ``draw`` reads its key
    stream, as much at a time as asked."""
    return Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()


def draw(encryptor: CipherContext, words: int) -> Iterator[np.ndarray]:
    """The next ``words`` 64-bit words of an AES-CTR ``encryptor``'s key stream, in chunks of
    at most 1 MiB. Each chunk is a view of one buffer per thread, valid only until the next
    chunk is drawn in that thread: use it, or copy it."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None:
        buffer = _SCRATCH.buffer = bytearray(len(_ZEROS) + 16)
    while words > 0:
        take = min(words, _CHUNK_WORDS)
        encryptor.update_into(memoryview(_ZEROS)[: 8 * take], buffer)
        yield np.frombuffer(buffer, dtype="<u8", count=take)
        words -= take


def fresh_seed() -> bytes:
    """A new seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


def expand(seed: bytes, index: int, n: int, modulus: int) -> np.ndarray:
    """The uniform polynomial mod ``modulus`` (``n`` uint64 words) of ciphertext ``index``."""
    out = np.empty((1, n), dtype="<u8")
    expand_rows(out, seed, index, modulus)
    return out[0]


def expand_rows(out: np.ndarray, seed: bytes, start: int, modulus: int) -> None:
    """Write the polynomials of ciphertexts ``start .. start + rows - 1`` into the rows of
    ``out`` (``(rows, n)`` uint64)."""
    _expand_rows(out, (seed,), start, modulus, add=False)


def expand_sum(
    seeds: tuple[bytes, ...], start: int, count: int, n: int, modulus: int
) -> np.ndarray:
    """``(count, n)``: for each ciphertext ``start .. start+count-1``, the sum mod q of every
    seed's polynomial: the ``c1`` of a sum of seeded ciphertexts."""
    from secagg.crypto.ring import reduce_lazy  # numba: clients only

    out = np.zeros((count, n), dtype="<u8")
    # Words are below q < 2**60: up to 15 of them add without wrapping 64 bits.
    for group in range(0, len(seeds), LAZY_TERMS):
        _expand_rows(out, seeds[group : group + LAZY_TERMS], start, modulus, add=True)
        reduce_lazy(out, modulus)
    return out


def _expand_rows(
    out: np.ndarray, seeds: tuple[bytes, ...], start: int, modulus: int, *, add: bool
) -> None:
    """Write (or, with ``add``, add) every seed's polynomials of ciphertexts ``start ..`` into
    the rows of ``out`` (``add=False`` takes one seed).

    Every row's first ``n + _SPARE`` words come from one AES call for many rows: CTR mode's
    key stream is AES of the counter blocks ``index || j``, so encrypting those blocks
    explicitly (ECB over counters, one key schedule per seed) gives the same words as one CTR
    stream per row at a fraction of the calls; the counter blocks are written once for all the
    seeds. A row that rejection left short (for a 60-bit NTT prime, one word in about 2**40 is
    rejected) continues its own CTR stream (``_expand_into``)."""
    from secagg.crypto.ring import take_rows  # numba: clients only

    if any(len(seed) != SEED_BYTES for seed in seeds):
        raise ValueError(f"a seed is {SEED_BYTES} bytes")
    count, n = out.shape
    words, bits = n + _SPARE, modulus.bit_length()
    if words % 2 or words > _CHUNK_WORDS:  # not whole AES blocks, or rows too long to batch
        for seed in seeds:
            for row in range(count):
                _expand_into(out[row], seed, start + row, modulus, add=add)
        return
    blocks, batch = words // 2, _CHUNK_WORDS // words
    ciphers = [Cipher(algorithms.AES(seed), modes.ECB()).encryptor() for seed in seeds]
    buffer = getattr(_SCRATCH, "rows", None)
    if buffer is None:
        buffer = _SCRATCH.rows = bytearray(len(_ZEROS) + 16)
    for first in range(0, count, batch):
        rows = min(batch, count - first)
        counters = np.empty((rows, blocks, 2), dtype=">u8")
        counters[:, :, 0] = (np.uint64(start + first) + np.arange(rows, dtype=np.uint64))[:, None]
        counters[:, :, 1] = np.arange(blocks, dtype=np.uint64)[None, :]
        for seed, aes in zip(seeds, ciphers, strict=True):
            aes.update_into(counters.data.cast("B"), buffer)
            stream = np.frombuffer(buffer, dtype="<u8", count=rows * words).reshape(rows, words)
            filled = take_rows(stream, bits, modulus, out[first : first + rows], add)
            for offset in np.flatnonzero(filled < n).tolist():
                index, row = start + first + offset, out[first + offset]
                have = int(filled[offset])
                _expand_into(row, seed, index, modulus, add=add, block=blocks, have=have)


def _expand_into(
    row: np.ndarray,
    seed: bytes,
    index: int,
    modulus: int,
    *,
    add: bool,
    block: int = 0,
    have: int = 0,
) -> None:
    """Write (or add) ciphertext ``index``'s polynomial into ``row``, one CTR stream from block
    ``index || block`` on (``have`` words already filled from the blocks before it): words
    masked to q's bit length and kept below q, ``n + _SPARE`` drawn first and (rarely) what
    rejection left plus ``_SPARE`` again."""
    from secagg.crypto.ring import take_below  # numba: clients only

    n, bits = row.size, modulus.bit_length()
    counter = struct.pack(">QQ", index, block)
    stream = ctr(seed, counter)
    more = n + _SPARE if block == 0 else n - have + _SPARE
    while have < n:
        for chunk in draw(stream, more):
            have = take_below(chunk, bits, modulus, row, have, add)
        more = n - have + _SPARE
