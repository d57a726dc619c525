"""The clients' CKKS ciphertexts, built in numpy: symmetric RLWE with integers in coefficients.

Every client holds the secret key ``s`` (SEAL's, read from ``client.ctx``), so it encrypts
symmetrically, and the server only ever adds ciphertexts. A ciphertext of the integers
``m_0 .. m_{N-1}`` (one per coefficient of the plaintext polynomial ``m``) is ::

    c1 = a                      uniform mod q, expanded from a 32-byte seed (``seeded``)
    c0 = -a s + e + Delta m     in coefficients; e from SEAL's noise distribution

with ``Delta = 2**scale_bits``. The clients decrypt a sum of ciphertexts as
``c0 + c1 s = Delta sum(m) + sum(e)``: every coefficient carries one integer, so a ciphertext
carries N of them, where CKKS's slot encoding carries N/2 (its canonical embedding spends
the other half on the imaginary parts, which secagg never used). It is the same ring, key and
encryption as SEAL's, with another encoding: SEAL decrypts these ciphertexts (a test turns
``c0`` into NTT form and has TenSEAL decrypt it), and no TenSEAL call is needed to make or
read one.

- **Noise** ``e``: SEAL's default sampler, a centered binomial distribution of 21 + 21 fair
  bits per coefficient (standard deviation 3.24, every value within +-21). The bits come from
  AES-256-CTR keyed with 32 fresh bytes of the operating system's CSPRNG for every call: a
  CTR DRBG, as SEAL draws its own from a Blake2xb stream seeded from the system's random
  device (four times faster than reading every bit from ``os.urandom``). A sum of ``c``
  ciphertexts is off by at most ``21 c`` in every coefficient, with certainty: decryption is
  exact whenever ``Delta > 42 c``, and a coefficient further off than that marks a wrong key,
  a damaged or a forged ciphertext.
- **Encryptions of zero** (``encrypt_zero``: ``-a s + e`` for a fresh seed) are the whole cost
  of encrypting and do not depend on the message: a client prepares them while its model trains
  (``ckks``), so after training it only adds ``Delta m`` to them.
- ``a s`` is computed in SEAL's NTT form (``ntt``), where the key is stored and where ``a`` is
  expanded: the NTT is a bijection of ``Z_q^N``, so ``a`` is uniform in either form.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future

import numba
import numpy as np

from secagg.crypto import seal_format, seeded
from secagg.crypto.caches import KeyCaches
from secagg.crypto.ntt import shoup, transform
from secagg.crypto.ring import kernel
from secagg.crypto.seal_format import NOISE_BOUND, CiphertextShape
from secagg.errors import KeyFileError

#: A product computed at decryption is kept for the key's other holders only up to this size.
_SHARED_BYTES = 64 << 20


class SecretKey:
    """The clients' secret key: encrypts zeros and decrypts sums, in coefficients.

    ``c1 s`` products are computed in the background as soon as a sum's seeds are known
    (``prefetch``) and shared with the key's other holders in the process through ``caches``
    (``secagg.crypto.caches``: owned by the loaded key; a private one by default). A product
    that no other holder can use is handed over, not copied."""

    def __init__(
        self, secret_context: bytes, shape: CiphertextShape, caches: KeyCaches | None = None
    ) -> None:
        words = seal_format.secret_key_words(secret_context, shape)
        if words.shape != (shape.poly_modulus_degree,) or int(words.max()) >= shape.modulus:
            raise KeyFileError("the secret key does not match the context's parameters")
        self.shape = shape
        self.modulus, self.n = shape.modulus, shape.poly_modulus_degree
        try:
            self._ntt = transform(self.n, self.modulus)
        except ValueError as err:
            raise KeyFileError(
                f"these CKKS parameters cannot be used ({err}); run 'secagg keygen'"
            ) from err
        self._s, self._s_shoup = words, shoup(words, shape.modulus)
        self.caches = caches if caches is not None else KeyCaches()
        with self.caches.lock:
            self.caches.holders.add(self)

    def encrypt_zero(self, seed: bytes, count: int, start: int = 0) -> np.ndarray:
        """``c0`` (count, N) of ``count`` encryptions of zero in coefficients, ciphertext ``i``
        with ``c1 = expand(seed, start + i)``: ``-a_i s + e_i mod q``."""
        q = self.modulus
        product = np.empty((count, self.n), dtype=np.uint64)
        seeded.expand_rows(product, seed, start, q)
        self._ntt.multiply(product, self._s, self._s_shoup)
        self._ntt.inverse(product)
        # -a s + e mod q in one pass over a fresh key stream
        flat, at = product.reshape(-1), 0
        for words in seeded.key_stream(os.urandom(32), bytes(16), flat.size):
            zero_from(flat[at : at + words.size], words, NOISE_BOUND, q)
            at += words.size
        return product

    def decrypt(self, c0: np.ndarray, seeds: tuple[bytes, ...], start: int = 0) -> np.ndarray:
        """``Delta m + e`` (int64, centered) of the sums whose ``c0`` words (count, N) are given,
        ciphertexts ``start ..`` of their payloads; ``c1`` is the sum of every seed's ``a``."""
        q = np.uint64(self.modulus)
        c1 = self.c1_s(seeds, start, len(c0)).copy()
        seal_format.add_mod(c1, c0, self.modulus)
        centered = c1.view(np.int64)
        centered[c1 > q // np.uint64(2)] -= np.int64(self.modulus)
        return centered

    def prefetch(
        self,
        seeds: tuple[bytes, ...],
        start: int,
        count: int,
        submit: Callable[..., Future[np.ndarray]],
    ) -> None:
        """Start computing (with ``submit``, a background executor's) the ``c1 s`` that
        decrypting a sum of ``seeds``' ciphertexts ``start .. start + count - 1`` takes, so
        ``decrypt`` finds it ready. A sum with other seeds (a client dropped) just does not
        find it."""
        key = (seeds, start, count)
        with self.caches.lock:
            if key not in self.caches.products:
                self.caches.keep_product(key, submit(self._product, seeds, start, count))

    def c1_s(self, seeds: tuple[bytes, ...], start: int, count: int) -> np.ndarray:
        """``c1 s`` in coefficients, (count, N), for ``seeds``' ciphertexts ``start .. start +
        count - 1``. It may be shared with the key's other holders: never change it."""
        key = (seeds, start, count)
        caches = self.caches
        with caches.lock:
            kept = caches.products.get(key)
            sole = len(caches.holders) == 1
            if kept is not None and sole:
                del caches.products[key]  # no one else can use it: hand it over
        if kept is not None:
            return kept.result()
        c1 = self._product(seeds, start, count)
        if not sole and c1.nbytes <= _SHARED_BYTES:
            done: Future[np.ndarray] = Future()
            done.set_result(c1)
            with caches.lock:
                caches.keep_product(key, done)
        return c1

    def _product(self, seeds: tuple[bytes, ...], start: int, count: int) -> np.ndarray:
        c1 = seeded.expand_sum(seeds, start, count, self.n, self.modulus)
        self._ntt.multiply(c1, self._s, self._s_shoup)
        self._ntt.inverse(c1)
        return c1


# --- the noise, drawn and added in one pass ---


@numba.njit(inline="always")
def _popcount(x):  # pragma: no cover - compiled (LLVM emits the CPU's popcount for this idiom)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@kernel
def _zero_from(product, words, bound, modulus):  # pragma: no cover - compiled
    mask = (np.uint64(1) << np.uint64(bound)) - np.uint64(1)
    q = np.int64(modulus)
    for i in range(product.size):
        word = words[i]
        noise = _popcount(word & mask) - _popcount((word >> np.uint64(bound)) & mask)
        value = q - np.int64(product[i]) + noise  # in [1 - bound, q + bound]
        if value >= q:
            value -= q
        elif value < 0:
            value += q
        product[i] = np.uint64(value)


def zero_from(product: np.ndarray, words: np.ndarray, bound: int, modulus: int) -> None:
    """``product = -product + e mod q`` in place, one pass: ``product`` holds ``a s`` (uint64
    words below q), ``e`` the centered binomial noise the key-stream ``words`` draw, one per
    coefficient: the popcount of a word's low ``bound`` bits minus that of the next
    ``bound``."""
    _zero_from(product, words, np.int64(bound), np.int64(modulus))
