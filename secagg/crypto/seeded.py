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
about 2**40 is drawn again). Pure numpy and ``cryptography``: no TenSEAL, so it can run
anywhere, though only clients need it.
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
    return draw(Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor(), words)


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
    out = np.empty(n, dtype="<u8")
    _expand_into(out, seed, index, modulus, add=False)
    return out


def expand_sum(
    seeds: tuple[bytes, ...], start: int, count: int, n: int, modulus: int
) -> np.ndarray:
    """``(count, n)``: for each ciphertext ``start .. start+count-1``, the sum mod q of every
    seed's polynomial: the ``c1`` of a sum of seeded ciphertexts."""
    out = np.zeros((count, n), dtype="<u8")
    q = np.uint64(modulus)
    # Words are below q < 2**60: up to 15 of them add without wrapping 64 bits.
    for group in range(0, len(seeds), LAZY_TERMS):
        for seed in seeds[group : group + LAZY_TERMS]:
            for offset in range(count):
                _expand_into(out[offset], seed, start + offset, modulus, add=True)
        np.remainder(out, q, out=out)
    return out


def _expand_into(row: np.ndarray, seed: bytes, index: int, modulus: int, *, add: bool) -> None:
    """Write (or add) ciphertext ``index``'s polynomial into ``row``: the key stream from
    ``index || 0`` on, words masked to q's bit length and kept below q, ``n + _SPARE`` words
    drawn first and (rarely) what rejection left plus ``_SPARE`` again."""
    from secagg.crypto.compiled import take_below  # numba: clients only

    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes")
    n, bits = row.size, modulus.bit_length()
    counter = struct.pack(">QQ", index, 0)
    stream = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
    have, more = 0, n + _SPARE
    while have < n:
        for chunk in draw(stream, more):
            have = take_below(chunk, bits, modulus, row, have, add)
        more = n - have + _SPARE
