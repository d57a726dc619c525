"""Seeded ciphertexts: ``c1`` travels as a 32-byte seed, only ``c0`` as coefficients.

In symmetric RLWE encryption ``c1 = a`` is uniformly random and independent of the secret key
and of the message; only ``c0 = -a s - e + Delta m`` carries information. So a client draws a
fresh seed per payload, expands it (``expand``) into one uniform polynomial ``a_i`` per
ciphertext ``i``, and sends ``c0`` and the seed: half the bytes. SEAL's own symmetric encryption
does the same when asked to save a seed (``encrypt_zero_symmetric`` with ``save_seed``).

SEAL still makes every ciphertext (it samples the noise and encodes), as ``(c0', a')``; the
client then swaps its ``c1`` for the seeded one (``reseed``)::

    c0 = c0' + (a' - a) s    so    c0 + a s = c0' + a' s = Delta m - e

the same message under the same noise, now with ``c1 = a``: a fresh RLWE sample again, since
``a`` is uniform and independent of ``s`` and ``e``. Ciphertexts are in NTT form, as SEAL keeps
CKKS ciphertexts, and so are ``s`` and ``a``: the NTT is a bijection of ``Z_q^N``, so a
uniform vector is uniform in either domain, and SEAL samples ``c1`` directly in NTT form too.
The product ``(a' - a) s`` is coefficient-wise in that form (SEAL's ``dyadic_product``).

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

from secagg.crypto import seal_format
from secagg.crypto.seal_format import CiphertextShape
from secagg.errors import KeyFileError

#: Bytes of one seed: an AES-256 key.
SEED_BYTES = 32
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
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


class SecretKey:
    """The secret key's NTT-form words mod the data prime, ready for multiplication mod q."""

    def __init__(self, secret_context: bytes, shape: CiphertextShape) -> None:
        words = seal_format.secret_key_words(secret_context, shape)
        if words.shape != (shape.poly_modulus_degree,) or int(words.max()) >= shape.modulus:
            raise KeyFileError("the secret key does not match the context's parameters")
        self.modulus = shape.modulus
        self._words = words
        # Shoup's precomputation: floor(s * 2**64 / q), so s * x mod q needs no 128-bit divide.
        shoup = [(int(w) << 64) // shape.modulus for w in words.tolist()]
        self._shoup = np.array(shoup, dtype=np.uint64)

    def multiply(self, x: np.ndarray) -> np.ndarray:
        """``x * s mod q`` coefficient by coefficient, for uint64 words ``x`` (any value)."""
        q = np.uint64(self.modulus)
        estimate = _mulhi(x, self._shoup)
        # x*s - floor(x*s'/2**64)*q lies in [0, 2q) (Shoup): exact in wrapping uint64.
        out = x * self._words - estimate * q
        np.subtract(out, q, out=out, where=out >= q)
        return out

    def reseed(self, fresh: np.ndarray, seed: bytes, index: int) -> np.ndarray:
        """``c0`` of a SEAL ciphertext ``fresh = (c0', a')`` (2, N) re-randomised to
        ``c1 = expand(seed, index)``: ``c0' + (a' - a) s mod q``."""
        q = self.modulus
        a = expand(seed, index, fresh.shape[1], q)
        difference = fresh[1] + (np.uint64(q) - a)  # a' - a + q, below 2q < 2**64
        np.subtract(difference, np.uint64(q), out=difference, where=difference >= np.uint64(q))
        c0 = fresh[0].copy()
        seal_format.add_mod(c0, self.multiply(difference), q)
        return c0


def _mulhi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The high 64 bits of the 128-bit products ``x * y`` (uint64), from 32-bit halves."""
    x0, x1 = x & _MASK32, x >> _SHIFT32
    y0, y1 = y & _MASK32, y >> _SHIFT32
    low, cross1, cross2 = x0 * y0, x0 * y1, x1 * y0
    middle = (low >> _SHIFT32) + (cross1 & _MASK32) + (cross2 & _MASK32)
    return x1 * y1 + (cross1 >> _SHIFT32) + (cross2 >> _SHIFT32) + (middle >> _SHIFT32)
