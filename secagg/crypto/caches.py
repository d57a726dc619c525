"""Values derived from a secret key and kept for reuse, owned by the key that made them.

Decrypting a sum is mostly computing ``c1 s`` (``rlwe``), and tagging a payload mostly drawing
the integrity tag's vector ``r`` (``integrity``): both depend on the secret key. The clients of
one key in one process (a simulation's many clients; a site's one) compute each once and share
it. What they share lives in a ``KeyCaches``, owned by the loaded key material (``Keys``) they
were built from: it is dropped with the last object that holds that key, never kept for the
life of the process.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from secagg.crypto.rlwe import SecretKey

#: ``c1 s`` products kept per key: a round's update and its next phase.
PRODUCTS_KEPT = 2
#: Integrity vectors kept per key: both phases of this round and the next round's.
VECTORS_KEPT = 4


class KeyCaches:
    """What the holders of one key share: ``c1 s`` products (computing or done) by seeds and
    ciphertext range, the key's live ``SecretKey`` objects, and the integrity tag's vectors by
    label. Each keeps only its last few entries."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.products: OrderedDict[tuple[tuple[bytes, ...], int, int], Future[np.ndarray]] = (
            OrderedDict()
        )
        self.holders: weakref.WeakSet[SecretKey] = weakref.WeakSet()
        self.vectors: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def keep_product(
        self, key: tuple[tuple[bytes, ...], int, int], product: Future[np.ndarray]
    ) -> None:
        """Keep ``product`` (the caller holds ``lock``), forgetting the oldest beyond
        ``PRODUCTS_KEPT``."""
        self.products[key] = product
        while len(self.products) > PRODUCTS_KEPT:
            self.products.popitem(last=False)

    def keep_vector(self, label: bytes, halves: tuple[np.ndarray, np.ndarray]) -> None:
        """Keep a tag vector's halves (the caller holds ``lock``), forgetting the oldest beyond
        ``VECTORS_KEPT``."""
        self.vectors[label] = halves
        self.vectors.move_to_end(label)
        while len(self.vectors) > VECTORS_KEPT:
            self.vectors.popitem(last=False)


_OWNED: weakref.WeakKeyDictionary[object, KeyCaches] = weakref.WeakKeyDictionary()
_OWNED_LOCK = threading.Lock()


def of(owner: object) -> KeyCaches:
    """The caches of the key ``owner`` (loaded key material: equal keys share them), made on
    first use and dropped with ``owner``."""
    with _OWNED_LOCK:
        caches = _OWNED.get(owner)
        if caches is None:
            caches = _OWNED[owner] = KeyCaches()
        return caches
