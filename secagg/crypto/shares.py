"""t-of-n Shamir shares of the clients' self-mask keys, sealed to each recipient.

A client's self-mask key (``masking``) is normally revealed by the client itself once the
phase's survivors confirmed their set. So that a survivor that vanishes while the round
unmasks does not fail the round, each client also splits both phases' keys into shares, one
per keyed position of the round (``split``), any ``threshold`` of which rebuild the key
(``combine``), and seals each recipient's shares with AES-256-GCM under a key derived from the
pair's X25519 secret (``seal``/``open``): the server relays sealed shares it cannot read.
A survivor reveals its share of another survivor's key only for a survivor set that at least
``threshold`` sites confirmed, never of a site outside the set (whose pairs it corrects
instead): so the server never holds both a site's self-mask key and its pairs' corrections.

The field is GF(2^521 - 1) (a Mersenne prime, above any 32-byte key); a share is its
x-coordinate (the recipient's position + 1) and a 66-byte y.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.errors import PayloadError

PRIME = (1 << 521) - 1
#: Bytes of one share's y (a field element).
SHARE_BYTES = 66
_LABEL = b"secagg self-mask shares v1\0"
_NONCE = bytes(12)  # each sealing key seals one message


def split(secret: bytes, positions: Sequence[int], threshold: int) -> dict[int, bytes]:
    """``secret``'s share for each of ``positions`` (0-based), any ``threshold`` of which
    rebuild it: a random polynomial of degree ``threshold - 1`` through ``secret`` at 0."""
    if not 1 <= threshold <= len(positions):
        raise ValueError("threshold must be between 1 and the number of shares")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [int.from_bytes(os.urandom(72), "big") % PRIME for _ in range(threshold - 1)]
    shares = {}
    for position in positions:
        x, y = position + 1, 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares[position] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], size: int) -> bytes:
    """The secret (``size`` bytes) the ``shares`` (position -> y) lie on, by Lagrange
    interpolation at 0; any ``threshold`` correct shares give it."""
    points = [(position + 1, int.from_bytes(y, "big")) for position, y in shares.items()]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * -xj % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise PayloadError("the revealed shares do not rebuild a key", "bad-share")
    return secret.to_bytes(size, "big")


def seal(pair_secret: bytes, context: bytes, sender: int, recipient: int, shares: bytes) -> bytes:
    """``shares`` (the sender's shares for ``recipient``, concatenated) sealed to the pair."""
    key = _key(pair_secret, context, sender, recipient)
    return AESGCM(key).encrypt(_NONCE, shares, None)


def open_sealed(
    pair_secret: bytes, context: bytes, sender: int, recipient: int, sealed: bytes
) -> bytes:
    """Inverse of ``seal``; PayloadError ``bad-share`` when the sealed bytes were altered."""
    key = _key(pair_secret, context, sender, recipient)
    try:
        return AESGCM(key).decrypt(_NONCE, sealed, None)
    except (InvalidTag, ValueError) as err:
        raise PayloadError(
            f"the shares position {sender} sealed to this site do not open: altered on the "
            "way (the server or the network) or sealed wrongly",
            "bad-share",
        ) from err


def _key(pair_secret: bytes, context: bytes, sender: int, recipient: int) -> bytes:
    info = _LABEL + context + struct.pack(">II", sender, recipient)
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(pair_secret)
