"""The payload wire format: a checked envelope around a codec's ciphertexts.

Every payload a cipher makes or accepts is an envelope. The receiver checks all of it (its
structure, the key fingerprint, job, round, sender, codec and codec settings, sizes and the
digest) before a codec looks at a single ciphertext, and the codec then checks every
ciphertext's structure before any byte could reach the crypto library. Anything wrong is a
``PayloadError`` whose ``reason`` names it.

Layout (big-endian)::

    magic "SAGG" | version u8 | kind u8 | codec u8 | phase u8 | key fingerprint 16B
    | job 16B | round u32 | sender u32 | roster u32 | values u64 | codec settings 4B
    | blob count u32 | blob size u64 | contributor count u32 | seed size u16 | seed count u32
    | contributor ids (count x u32, ascending) | seeds (count x size bytes)
    | blobs (count x size bytes)
    | sha256 of everything before (32B)

``kind`` tells a client's update (``sender`` is its index in the round's roster) from the
server's aggregate (``sender`` is ``SERVER``, and the contributor ids say whose updates were
added). A codec whose ciphertexts carry their random half as a seed (``seed size`` > 0, see
``secagg.crypto.seeded``) puts the sender's seed in an update, and the seeds of every update
it added in an aggregate: as many as contributors from an honest server, ascending by
contributor, though a client reads them as a set (it adds what they expand to) and leaves
who was summed to the ledger. ``phase`` tells a round's scale exchange (``SCALES``, see
``secagg.quantize``) from its model update (``UPDATE_PHASE``). The digest catches corruption
in transit; it is no signature: who sent a payload is established by the transport (mutual TLS
in a deployment), and what the aggregate holds is checked by the clients after decrypting
(``secagg.crypto.ledger``).
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from secagg.errors import PayloadError

MAGIC = b"SAGG"
VERSION = 5
UPDATE, AGGREGATE = 1, 2
UPDATE_PHASE, SCALES = 0, 1
#: the sites' encrypted evaluations of a round's new global model (``report``)
EVALUATION = 2
SERVER = 0xFFFFFFFF
_HEAD = struct.Struct(">4sBBBB16s16sIIIQ4sIQIHI")
HEADER_SIZE = _HEAD.size
_DIGEST = 32
_CODEC_NAMES = {
    0: "plaintext",
    2: "packed CKKS in slots (HE, an earlier secagg: upgrade every party)",
    3: "packed CKKS (HE)",
}
#: Largest roster a payload may name (the packed codec itself allows fewer clients).
MAX_ROSTER = 1 << 16


@dataclass(frozen=True)
class Stamp:
    """Which job, round and party a payload belongs to; every field is checked on receipt.

    ``roster`` is the number of clients the round's plan names; clients are numbered
    ``0 .. roster - 1`` and ``sender`` is one of them, or ``SERVER`` for an aggregate.
    """

    job: bytes
    round_num: int
    sender: int
    roster: int
    phase: int = UPDATE_PHASE
    #: the round's attempt (masked rounds: the nonce the server drew for this try of the
    #: round). Not in the envelope: it is bound into what the payload encrypts (the ledger's
    #: round tag, the integrity tag's key), so an aggregate that mixes attempts is refused
    attempt: bytes = b""

    def __post_init__(self) -> None:
        if len(self.job) != 16:
            raise ValueError("job id must be 16 bytes")
        if not 1 <= self.roster <= MAX_ROSTER:
            raise ValueError(f"roster must be 1..{MAX_ROSTER}")
        if self.sender != SERVER and not 0 <= self.sender < self.roster:
            raise ValueError("sender must be a roster index or SERVER")

        if self.phase not in (UPDATE_PHASE, SCALES, EVALUATION):
            raise ValueError("phase must be UPDATE_PHASE, SCALES or EVALUATION")
        if len(self.attempt) > 64:
            raise ValueError("an attempt nonce is at most 64 bytes")

    def for_sender(self, sender: int) -> Stamp:
        return Stamp(self.job, self.round_num, sender, self.roster, self.phase, self.attempt)

    def scales(self) -> Stamp:
        """The same round's scale exchange."""
        return Stamp(self.job, self.round_num, self.sender, self.roster, SCALES, self.attempt)

    def at(self, phase: int) -> Stamp:
        """The same round's ``phase``."""
        return Stamp(self.job, self.round_num, self.sender, self.roster, phase, self.attempt)

    def evaluation(self, roster: int) -> Stamp:
        """The same round's evaluation by ``roster`` sites (a simulation's evaluator may
        evaluate besides the round's clients)."""
        return Stamp(self.job, self.round_num, self.sender, roster, EVALUATION, self.attempt)

    def label(self) -> bytes:
        """Job, round, phase and attempt as bytes, for what binds a payload's contents to
        them (the ledger's round tag, the integrity tag's key)."""
        head = self.job + struct.pack(">IB", self.round_num, self.phase)
        return head + (struct.pack(">B", len(self.attempt)) + self.attempt if self.attempt else b"")


@dataclass(frozen=True)
class Codec:
    """What a receiver expects of a codec's payloads; ``settings`` are its parameters."""

    codec_id: int
    fingerprint: bytes
    settings: bytes
    #: bytes of the seed each update carries (and an aggregate per contributor); 0: none
    seed_size: int = 0


@dataclass(frozen=True)
class Envelope:
    """One parsed payload. ``body`` is a view into the payload, not a copy."""

    kind: int
    stamp: Stamp
    values: int
    blob_count: int
    blob_size: int
    contributors: tuple[int, ...]
    body: memoryview
    #: the update's seed, or the seeds of the updates an aggregate adds (codecs with seeds)
    seeds: tuple[bytes, ...] = ()

    def blob(self, index: int) -> memoryview:
        return self.body[index * self.blob_size : (index + 1) * self.blob_size]


def to_bytes(
    codec: Codec,
    kind: int,
    stamp: Stamp,
    values: int,
    blob_count: int,
    blob_size: int,
    body: list[bytes | memoryview | np.ndarray],
    contributors: tuple[int, ...] = (),
    seeds: tuple[bytes, ...] = (),
) -> bytes:
    """Serialize a payload, digest last. ``body`` holds the blobs back to back, in pieces;
    ``seeds`` the update's seed or the seeds of the updates an aggregate adds."""
    parts = [(p.data if isinstance(p, np.ndarray) else memoryview(p)).cast("B") for p in body]
    if sum(len(part) for part in parts) != blob_count * blob_size:
        raise ValueError("payload body does not hold blob_count x blob_size bytes")
    seeded = bool(codec.seed_size)
    if bool(seeds) != seeded or any(len(seed) != codec.seed_size for seed in seeds):
        raise ValueError("a codec with seeds needs seeds of its size, one without none")
    head = _HEAD.pack(
        MAGIC,
        VERSION,
        kind,
        codec.codec_id,
        stamp.phase,
        codec.fingerprint,
        stamp.job,
        stamp.round_num,
        stamp.sender,
        stamp.roster,
        values,
        codec.settings,
        blob_count,
        blob_size,
        len(contributors),
        codec.seed_size,
        len(seeds),
    )
    ids = struct.pack(f">{len(contributors)}I", *contributors) + b"".join(seeds)
    digest = hashlib.sha256(head)
    digest.update(ids)
    for part in parts:
        digest.update(part)
    return b"".join((head, ids, *parts, digest.digest()))


def read_header(payload: bytes | memoryview, codec: Codec, expect: Stamp, kind: int) -> Envelope:
    """Check everything the fixed header says against what this receiver expects.

    Works on the header alone (the first ``HEADER_SIZE`` bytes), so a network receiver can
    refuse a payload before reading its body; ``from_bytes`` then checks the rest.
    """
    view = memoryview(payload).cast("B")
    if len(view) < _HEAD.size:
        raise PayloadError(
            f"payload truncated: {len(view)} bytes is shorter than any envelope", "truncated"
        )
    (
        magic,
        version,
        got_kind,
        codec_id,
        phase,
        fingerprint,
        job,
        round_num,
        sender,
        roster,
        values,
        settings,
        blob_count,
        blob_size,
        count,
        seed_size,
        seed_count,
    ) = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError("not a secagg payload (bad magic bytes)", "bad-magic")
    if version != VERSION:
        raise PayloadError(
            f"payload format version {version} is not supported (need {VERSION}); "
            "every party must run the same secagg release",
            "bad-version",
        )
    if codec_id != codec.codec_id:
        raise PayloadError(
            f"payload is {_CODEC_NAMES.get(codec_id, f'codec {codec_id}')}, this party expects "
            f"{_CODEC_NAMES.get(codec.codec_id, f'codec {codec.codec_id}')}: run every party "
            "with the same --he setting",
            "wrong-codec",
        )
    if settings != codec.settings:
        raise PayloadError(
            f"payload's codec settings {settings.hex()} differ from this party's "
            f"{codec.settings.hex()} (packing or key size); run one secagg release, one key "
            "set and one he_precision everywhere",
            "wrong-codec",
        )
    if seed_size != codec.seed_size:
        raise PayloadError(
            f"payload carries seeds of {seed_size} bytes, this party's codec {codec.seed_size}; "
            "run one secagg release everywhere",
            "wrong-codec",
        )
    if fingerprint != codec.fingerprint:
        raise PayloadError(
            f"payload was made with other keys (key fingerprint {fingerprint.hex()[:12]} != "
            f"ours {codec.fingerprint.hex()[:12]}); every party must use the keys from one "
            "'secagg keygen'",
            "wrong-key",
        )
    if got_kind != kind:
        names = {UPDATE: "a client update", AGGREGATE: "an aggregate"}
        raise PayloadError(
            f"payload is {names.get(got_kind, f'of kind {got_kind}')}, expected {names[kind]}",
            "wrong-kind",
        )
    if job != expect.job:
        raise PayloadError(
            f"payload belongs to job {job.hex()[:12]}, not this job ({expect.job.hex()[:12]})",
            "wrong-job",
        )
    if phase != expect.phase:
        names = {
            UPDATE_PHASE: "a model update",
            SCALES: "a scale exchange",
            EVALUATION: "an evaluation",
        }
        raise PayloadError(
            f"payload is {names.get(phase, f'of phase {phase}')}, expected {names[expect.phase]}",
            "wrong-phase",
        )
    if round_num != expect.round_num:
        raise PayloadError(
            f"payload is for round {round_num}, expected round {expect.round_num}: stale or "
            "replayed",
            "wrong-round",
        )
    if roster != expect.roster:
        raise PayloadError(
            f"payload names a roster of {roster} clients, the round has {expect.roster}",
            "wrong-roster",
        )
    if kind == AGGREGATE and sender != SERVER:
        raise PayloadError("aggregate does not come from the server", "wrong-sender")
    from_client = kind == UPDATE
    if from_client and not sender < roster:
        raise PayloadError(f"sender {sender} is not in the round's roster", "wrong-sender")
    if from_client and expect.sender != SERVER and sender != expect.sender:
        raise PayloadError(
            f"payload claims to come from client {sender}, but was sent by client {expect.sender}",
            "wrong-sender",
        )
    if count > roster or (kind == UPDATE and count):
        raise PayloadError(f"payload lists {count} contributors", "malformed")
    seeds_ok = seed_count == 1 if kind == UPDATE else 1 <= seed_count <= roster
    if seed_size and not seeds_ok:
        raise PayloadError(f"payload carries {seed_count} seeds", "malformed")
    if not seed_size and seed_count:
        raise PayloadError(f"payload carries {seed_count} seeds of no size", "malformed")
    stamp = Stamp(job, round_num, sender, roster, phase)
    return Envelope(kind, stamp, values, blob_count, blob_size, (), memoryview(b""))


def from_bytes(
    payload: bytes | memoryview,
    codec: Codec,
    expect: Stamp,
    kind: int,
    *,
    blobs_for: Callable[[int], tuple[int, int]],
    max_values: int,
) -> Envelope:
    """Parse and check a whole payload; raise PayloadError naming the first thing wrong.

    ``blobs_for(values)`` is the codec's (blob count, blob size) for a number of values;
    ``max_values`` bounds the model size this receiver accepts. The body is not looked into:
    the codec checks each blob's structure next.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}", "malformed")
    head = read_header(payload, codec, expect, kind)
    view = memoryview(payload).cast("B")
    if not 0 < head.values <= max_values:
        raise PayloadError(
            f"payload declares {head.values} values; this party accepts 1 to {max_values}",
            "oversize",
        )
    blob_count, blob_size = blobs_for(head.values)
    if (head.blob_count, head.blob_size) != (blob_count, blob_size):
        raise PayloadError(
            f"payload has {head.blob_count} ciphertexts of {head.blob_size} bytes for "
            f"{head.values} values; the codec makes {blob_count} of {blob_size}",
            "malformed",
        )
    count, seed_count = _counts(view)
    ids_end = _HEAD.size + 4 * count
    seeds_end = ids_end + codec.seed_size * seed_count
    end = seeds_end + blob_count * blob_size
    if len(view) != end + _DIGEST:
        short = len(view) < end + _DIGEST
        raise PayloadError(
            f"payload length {len(view)} does not match its header ({end + _DIGEST}): "
            f"{'truncated' if short else 'padded'}",
            "truncated" if short else "malformed",
        )
    if hashlib.sha256(view[:end]).digest() != bytes(view[end:]):
        raise PayloadError("payload digest mismatch: corrupted in transit", "bad-digest")
    contributors = struct.unpack_from(f">{(ids_end - _HEAD.size) // 4}I", view, _HEAD.size)
    ascending = all(a < b for a, b in itertools.pairwise(contributors))
    if not ascending or any(c >= head.stamp.roster for c in contributors):
        raise PayloadError("aggregate's contributor list is not ascending roster ids", "malformed")
    if kind == AGGREGATE and not contributors:
        raise PayloadError("aggregate names no contributors", "malformed")
    size = codec.seed_size
    seeds = tuple(bytes(view[at : at + size]) for at in range(ids_end, seeds_end, size or 1))
    return Envelope(
        kind,
        head.stamp,
        head.values,
        blob_count,
        blob_size,
        contributors,
        view[seeds_end:end],
        seeds,
    )


def declared_size(head: bytes | bytearray | memoryview) -> int:
    """The whole length a payload's (already checked) fixed header declares, so a receiver
    that streams can refuse an oversized payload before reading it."""
    *_, blob_count, blob_size, count, seed_size, seed_count = _HEAD.unpack_from(head)
    seeds = seed_size * seed_count
    return int(_HEAD.size + 4 * count + seeds + blob_count * blob_size + _DIGEST)


def update_size(blob_count: int, blob_size: int, seed_size: int = 0) -> int:
    """The byte length of an update (no contributor list, one seed of ``seed_size`` bytes
    when the codec seeds its ciphertexts) of ``blob_count`` blobs."""
    return _HEAD.size + seed_size + blob_count * blob_size + _DIGEST


def _counts(view: memoryview) -> tuple[int, int]:
    """(contributor count, seed count) from a checked header."""
    count, _, seeds = struct.unpack_from(">IHI", view, _HEAD.size - 10)
    return int(count), int(seeds)


def contributors(payload: bytes) -> tuple[int, ...]:
    """The contributor ids an aggregate lists (unchecked: for the party that made it)."""
    view = memoryview(payload).cast("B")
    count, _ = _counts(view)
    return tuple(struct.unpack_from(f">{count}I", view, _HEAD.size))
