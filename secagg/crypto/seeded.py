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

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Bytes of one seed: an AES-256 key.
SEED_BYTES = 32
#: Polynomials summed before one reduction mod q (q < 2**60, so 15 + 1 terms fit 64 bits).
LAZY_TERMS = 15
#: Extra words drawn with the first batch so that a rejected word almost never costs a second.
_SPARE = 64


def fresh_seed() -> bytes:
    """A new seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


def expand(seed: bytes, index: int, n: int, modulus: int) -> np.ndarray:
    """The uniform polynomial mod ``modulus`` (``n`` uint64 words) of ciphertext ``index``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes")
    counter = struct.pack(">QQ", index, 0)
    stream = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
    mask = np.uint64((1 << modulus.bit_length()) - 1)
    q = np.uint64(modulus)
    parts: list[np.ndarray] = []
    have, draw = 0, n + _SPARE
    while have < n:
        words = np.frombuffer(stream.update(bytes(8 * draw)), dtype="<u8") & mask
        kept = words[words < q]
        parts.append(kept)
        have += kept.size
        draw = n - have + _SPARE
    return np.concatenate(parts)[:n] if len(parts) > 1 else parts[0][:n]


def expand_sum(
    seeds: tuple[bytes, ...], start: int, count: int, n: int, modulus: int
) -> np.ndarray:
    """``(count, n)``: for each ciphertext ``start .. start+count-1``, the sum mod q of every
    seed's polynomial: the ``c1`` of a sum of seeded ciphertexts."""
    out = np.zeros((count, n), dtype="<u8")
    q = np.uint64(modulus)
    for offset in range(count):
        row = out[offset]
        # Words are below q < 2**60: up to 15 of them add without wrapping 64 bits.
        for group in range(0, len(seeds), LAZY_TERMS):
            for seed in seeds[group : group + LAZY_TERMS]:
                row += expand(seed, start + offset, n, modulus)
            np.remainder(row, q, out=row)
    return out
