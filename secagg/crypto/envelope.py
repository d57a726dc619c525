"""The payload wire format: a checked envelope around a codec's blobs.

Every payload a cipher produces or accepts is an envelope. The receiver checks its structure,
its key fingerprint, its codec and its digest before any blob reaches the crypto library, so a
truncated, corrupted or foreign payload fails with a named reason instead of garbage.

Layout (big-endian)::

    magic "SAGG" | version u8 | codec u8 | reserved u16 | fingerprint 16B | round u32
    | length u64 (values in the vector) | count u32 (blobs) | count x u64 (blob lengths)
    | blobs | sha256 of everything before (32B)
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from secagg.errors import PayloadError

MAGIC = b"SAGG"
VERSION = 1
_HEAD = struct.Struct(">4sBBH16sIQI")
_DIGEST = 32
MAX_BLOBS = 1 << 20


@dataclass(frozen=True)
class Envelope:
    """One payload: which codec made it, under which keys, for which round, and its blobs."""

    codec: int
    fingerprint: bytes
    round_num: int
    length: int
    blobs: tuple[bytes | memoryview, ...]

    def to_bytes(self) -> bytes:
        """Serialize with a trailing digest."""
        head = _HEAD.pack(
            MAGIC,
            VERSION,
            self.codec,
            0,
            self.fingerprint,
            self.round_num,
            self.length,
            len(self.blobs),
        )
        sizes = struct.pack(f">{len(self.blobs)}Q", *(len(b) for b in self.blobs))
        body = b"".join((head, sizes, *self.blobs))
        return body + hashlib.sha256(body).digest()


def from_bytes(payload: bytes, *, codec: int, fingerprint: bytes, max_blob: int) -> Envelope:
    """Parse and check a payload; raise PayloadError naming the first thing wrong."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
    view = memoryview(payload)
    if len(view) < _HEAD.size + _DIGEST:
        raise PayloadError(f"payload truncated: {len(view)} bytes is shorter than any envelope")
    magic, version, got_codec, _, got_fp, round_num, length, count = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError("not a secagg payload (bad magic bytes)")
    if version != VERSION:
        raise PayloadError(f"payload format version {version} is not supported (need {VERSION})")
    if got_fp != fingerprint:
        raise PayloadError(
            "payload was made with other keys (key fingerprint "
            f"{got_fp.hex()[:12]} != ours {fingerprint.hex()[:12]}); "
            "every party must use the keys from one 'secagg keygen'"
        )
    if got_codec != codec:
        raise PayloadError(f"payload uses codec {got_codec}, this party expects codec {codec}")
    if count > MAX_BLOBS:
        raise PayloadError(f"payload claims {count} blobs, more than the limit {MAX_BLOBS}")
    sizes_end = _HEAD.size + 8 * count
    if len(view) < sizes_end + _DIGEST:
        raise PayloadError("payload truncated inside its blob table")
    sizes = struct.unpack_from(f">{count}Q", view, _HEAD.size)
    if any(size > max_blob for size in sizes):
        raise PayloadError(f"payload has a blob larger than the limit of {max_blob} bytes")
    end = sizes_end + sum(sizes)
    if len(view) != end + _DIGEST:
        raise PayloadError(
            f"payload length {len(view)} does not match its header ({end + _DIGEST}): "
            "truncated or padded"
        )
    if hashlib.sha256(view[:end]).digest() != bytes(view[end:]):
        raise PayloadError("payload digest mismatch: corrupted in transit")
    # Views into the payload, not copies: a consumer copies one blob at a time when it needs to.
    blobs, offset = [], sizes_end
    for size in sizes:
        blobs.append(view[offset : offset + size])
        offset += size
    return Envelope(got_codec, got_fp, round_num, length, tuple(blobs))


def check_round(envelope: Envelope, round_num: int | None) -> None:
    """Refuse a payload from another round (stale or replayed)."""
    if round_num is not None and envelope.round_num != round_num:
        raise PayloadError(f"payload is for round {envelope.round_num}, expected round {round_num}")
