"""t-of-n Shamir shares of a client's attempt keys, sealed to each recipient.

So that a client that vanishes mid-round does not fail it (``masking``), each client splits
its scale and update self-mask keys and its mask key of each phase into shares, one per
holder position of the round (``split``), any ``threshold`` of which rebuild a key
(``combine``), and seals each holder's shares with AES-256-GCM under a key derived from the
pair's job-key agreement (``seal``/``open_sealed``): the server relays sealed shares it cannot
read. A survivor reveals its share of another survivor's self-mask key, or of a position's
mask key when that position sent nothing, only for a survivor set that at least
``threshold`` sites confirmed, and never both for one position.

The field is GF(p), p = 2^256 + 297 (the least prime above 2^256, so above any 32-byte key);
a share is its x-coordinate (the holder's position + 1) and a 33-byte y.
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

PRIME = (1 << 256) + 297
#: Bytes of one share's y (a field element).
SHARE_BYTES = 33
_LABEL = b"secagg attempt key shares v2\0"
_NONCE = bytes(12)  # each sealing key seals one message


def split(secret: bytes, positions: Sequence[int], threshold: int) -> dict[int, bytes]:
    """``secret``'s share for each of ``positions`` (0-based), any ``threshold`` of which
    rebuild it: a random polynomial of degree ``threshold - 1`` through ``secret`` at 0."""
    if not 1 <= threshold <= len(positions):
        raise ValueError("threshold must be between 1 and the number of shares")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [int.from_bytes(os.urandom(48), "big") % PRIME for _ in range(threshold - 1)]
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
