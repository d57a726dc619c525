"""Fuzz the receivers of payloads: the server's sum and a client's decrypt.

Run as a script, it prints one JSON line per case as soon as the case is done, so the parent
(``test_fuzz.py``, or a person) sees every outcome, and sees exactly which case killed the
process if one ever does::

    python tests/fuzz_payloads.py KEYS_DIR [--cases 1200] [--seed 0] [--codec packed|plain]

Every case is malformed or hostile: truncated, random, bit-flipped (with the digest kept, or
recomputed as a forger would), oversized or wrong length and count fields, other keys, other
CKKS parameters, another job or round, replays and duplicates, aggregates that drop an update
or leave a contributor unlisted or have a keyless ciphertext added, forged, swapped, dropped or
added seeds (the random half of every HE ciphertext), an update where an aggregate belongs and
back. A case goes to
the server (with two good payloads before it) or to a client (as the aggregate); what the
server accepts is then decrypted by a client, as in a round.

Outcomes: ``rejected`` (a PayloadError with its reason), ``harmless`` (accepted, and the
client's result is exactly the honest one: e.g. a flipped low bit that rounding absorbs),
``garbage`` (accepted with a different result: the failure this hunts), ``error`` (any other
exception: a bug). A crash shows as the process dying.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostile import (
    ROUND_OFFSET,
    SENDER_OFFSET,
    add_trivial,
    forge_aggregate,
    restamp,
    seeds_of,
    with_digest,
    with_seeds,
)

from secagg import keys
from secagg.config import CkksParams
from secagg.crypto import SERVER, Stamp, Update, envelope
from secagg.crypto.ckks_server import TAIL
from secagg.crypto.packing import PACKED
from secagg.errors import PayloadError

JOB = b"fuzz-job-0000000"
ROSTER = 3
VALUES = 2500

# Header fields a forger can rewrite (offset, struct format), after magic and version.
FIELDS = {
    "kind": (5, ">B"),
    "codec": (6, ">B"),
    "fingerprint": (8, ">16s"),
    "job": (24, ">16s"),
    "round": (ROUND_OFFSET, ">I"),
    "sender": (SENDER_OFFSET, ">I"),
    "roster": (SENDER_OFFSET + 4, ">I"),
    "values": (SENDER_OFFSET + 8, ">Q"),
    "settings": (SENDER_OFFSET + 16, ">4s"),
    "blob_count": (SENDER_OFFSET + 20, ">I"),
    "blob_size": (SENDER_OFFSET + 24, ">Q"),
    "contributors": (SENDER_OFFSET + 32, ">I"),
    "seed_size": (SENDER_OFFSET + 36, ">H"),
    "seed_count": (SENDER_OFFSET + 38, ">I"),
}


class Setup:
    """One honest round (three clients) and everything the mutators draw on."""

    def __init__(self, keys_dir: Path, codec: str, scratch: Path) -> None:
        self.client, self.server = _ciphers(keys_dir, codec)
        self.round = Stamp(JOB, 7, SERVER, ROSTER)
        rng = np.random.default_rng(0)
        bound = self.client.sum_limit or 1000
        weights = (0.5, 0.3, 0.2)
        self.updates = [
            Update(np.rint(rng.uniform(-w * bound, w * bound, VALUES)), w) for w in weights
        ]
        self.payloads = [
            self.client.encrypt(u, self.round.for_sender(i)) for i, u in enumerate(self.updates)
        ]
        self.aggregate = self.server.sum(self.payloads, self.round)
        self.honest = self.client.decrypt(self.aggregate, self.round)
        old = Stamp(JOB, 6, SERVER, ROSTER)
        self.old_payload = self.client.encrypt(self.updates[2], old.for_sender(2))
        # The same round under another key, and under other CKKS parameters.
        self.foreign: list[bytes] = []
        for index, params in enumerate((CkksParams(), CkksParams(16384, (60, 60)))):
            if codec == "plain":
                break
            folder = scratch / f"other-{index}"
            keys.generate(folder, params)
            other_client, other_server = _ciphers(folder, codec)
            theirs = [
                other_client.encrypt(u, self.round.for_sender(i))
                for i, u in enumerate(self.updates)
            ]
            self.foreign += [theirs[2], other_server.sum(theirs, self.round)]

    def outcome(self, target: str, payload: bytes) -> tuple[str, str]:
        """Feed ``payload`` to the server (after two honest updates) or to a client."""
        try:
            if target == "server":
                aggregate = self.server.sum([*self.payloads[:2], payload], self.round)
            else:
                aggregate = payload
            result = self.client.decrypt(aggregate, self.round)
        except PayloadError as err:
            return "rejected", err.reason
        except Exception as err:  # a bug: any refusal must be a named PayloadError
            return "error", f"{type(err).__name__}: {err}"
        same = (
            np.array_equal(result.values, self.honest.values)
            and abs(result.weight - self.honest.weight) < 1e-9
            and result.contributors == self.honest.contributors
            and result.clipped == self.honest.clipped
        )
        if target == "server":
            # The server's aggregate of two honest updates and a hostile third.
            expected = np.sum([u.values for u in self.updates], axis=0)
            same = np.array_equal(result.values, expected) and result.contributors == (0, 1, 2)
        return ("harmless" if same else "garbage"), ""


def _ciphers(keys_dir: Path, codec: str):  # type: ignore[no-untyped-def]
    if codec == "plain":
        from secagg.crypto.plain import PlainCipher

        return PlainCipher(), PlainCipher()
    from secagg.crypto.ckks import CkksClient
    from secagg.crypto.ckks_server import CkksServer

    return CkksClient(keys.load_for_client(keys_dir)), CkksServer(keys.load_for_server(keys_dir))


# --- mutators: each returns (name, target, payload) --------------------------------------------

Case = tuple[str, str, bytes]


def _target_and_base(s: Setup, rng: random.Random) -> tuple[str, bytes]:
    if rng.random() < 0.5:
        return "server", s.payloads[2]
    return "client", s.aggregate


def truncated(s: Setup, rng: random.Random) -> Case:
    target, base = _target_and_base(s, rng)
    cut = rng.choice([0, 1, 3, envelope.HEADER_SIZE - 1, envelope.HEADER_SIZE, len(base) - 1])
    cut = cut if rng.random() < 0.3 else rng.randrange(len(base))
    return "truncated", target, base[:cut]


def random_bytes(s: Setup, rng: random.Random) -> Case:
    target, base = _target_and_base(s, rng)
    size = rng.choice([0, 4, 31, 100, envelope.HEADER_SIZE + 32, len(base)])
    data = rng.randbytes(size)
    if rng.random() < 0.5 and size >= 5:  # random bytes behind a valid magic and version
        data = b"SAGG" + bytes([envelope.VERSION]) + data[5:]
    return "random", target, data


def bit_flip(s: Setup, rng: random.Random) -> Case:
    target, base = _target_and_base(s, rng)
    data = bytearray(base)
    for _ in range(rng.choice([1, 1, 2, 8])):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return "bit-flip", target, bytes(data)


def forged_flip(s: Setup, rng: random.Random) -> Case:
    """A flip anywhere but the digest, and the digest recomputed: what a forger sends."""
    target, base = _target_and_base(s, rng)
    data = bytearray(base[:-32])
    position = rng.randrange(len(data))
    if rng.random() < 0.5:  # aim at the body, where the ciphertext coefficients are
        position = rng.randrange(envelope.HEADER_SIZE, len(data))
    data[position] ^= 1 << rng.randrange(8)
    return "forged-flip", target, with_digest(data)


def forged_field(s: Setup, rng: random.Random) -> Case:
    """One header field rewritten to an edge or random value, digest recomputed."""
    target, base = _target_and_base(s, rng)
    name = rng.choice(sorted(FIELDS))
    offset, fmt = FIELDS[name]
    size = struct.calcsize(fmt)
    data = bytearray(base[:-32])
    (current,) = struct.unpack_from(fmt, data, offset)
    if fmt.endswith("s"):
        value = rng.randbytes(size)
    else:
        top = (1 << (8 * size)) - 1
        value = rng.choice([0, 1, top, top - 1, current + 1, max(current - 1, 0), 1 << 31])
        value = min(value, top)
        if value == current:  # a case must change something
            value = current ^ 1
    struct.pack_into(fmt, data, offset, value)
    return f"field-{name}", target, with_digest(data)


def resized(s: Setup, rng: random.Random) -> Case:
    """Whole ciphertexts added or removed, sizes made consistent, digest recomputed."""
    target, base = _target_and_base(s, rng)
    data = bytearray(base[:-32])
    offset, fmt = FIELDS["blob_count"]
    (count,) = struct.unpack_from(fmt, data, offset)
    (size,) = struct.unpack_from(FIELDS["blob_size"][1], data, FIELDS["blob_size"][0])
    if rng.random() < 0.5:
        struct.pack_into(fmt, data, offset, count + 1)
        data += rng.randbytes(size)
    elif count > 1:
        struct.pack_into(fmt, data, offset, count - 1)
        del data[-size:]
    else:
        data += b"\x00" * size
    return "resized", target, with_digest(data)


def foreign(s: Setup, rng: random.Random) -> Case:
    """Other keys or other CKKS parameters; sometimes with our fingerprint forged in."""
    if not s.foreign:
        return replayed(s, rng)
    index = rng.randrange(len(s.foreign))
    payload = s.foreign[index]
    target = "server" if index % 2 == 0 else "client"
    if rng.random() < 0.5:
        data = bytearray(payload[:-32])
        data[8:24] = s.client.codec.fingerprint  # type: ignore[attr-defined]
        payload = with_digest(data)
    return "foreign-key", target, payload


def replayed(s: Setup, rng: random.Random) -> Case:
    """Last round's update, as is, or restamped to this round (the server cannot tell)."""
    if rng.random() < 0.5:
        return "replayed", "server", s.old_payload
    return "replayed-restamped", "server", restamp(s.old_payload, round_num=7)


def duplicate(s: Setup, rng: random.Random) -> Case:
    """Client 0's or 1's update again, as is or claiming to be client 2."""
    payload = s.payloads[rng.randrange(2)]
    if rng.random() < 0.5:
        return "duplicate", "server", payload
    return "duplicate-restamped", "server", restamp(payload, sender=2)


def dropped(s: Setup, rng: random.Random) -> Case:
    """A server that leaves one update out of the sum but lists every contributor."""
    left_out = rng.randrange(ROSTER)
    kept = [p for i, p in enumerate(s.payloads) if i != left_out]
    return "dropped", "client", forge_aggregate(s.server, kept, s.round, (0, 1, 2))


def unlisted(s: Setup, rng: random.Random) -> Case:
    """A server that adds every update but lists one contributor fewer."""
    listed = tuple(sorted(rng.sample(range(ROSTER), ROSTER - 1)))
    return "unlisted", "client", forge_aggregate(s.server, s.payloads, s.round, listed)


def keyless(s: Setup, rng: random.Random) -> Case:
    """A server that adds a keyless (trivial) ciphertext of a few small integers to the
    aggregate: it decrypts cleanly, the ledger may stay intact, only the integrity tag sees it."""
    if s.client.sum_limit is None:  # plaintext: the server writes the numbers it likes anyway
        return dropped(s, rng)
    slots = PACKED.slots_for(VALUES + ROSTER, TAIL)
    delta = np.zeros(slots)
    for _ in range(rng.choice([1, 1, 3])):
        delta[rng.randrange(slots)] += rng.choice([-2, -1, 1, 2])
    return "keyless", "client", add_trivial(s.server, s.aggregate, delta)


def seed(s: Setup, rng: random.Random) -> Case:
    """A seed that is not the one the ciphertexts were made with, where the digest and the
    counts still add up: forged (random), swapped (an update sent with another client's seed,
    or an aggregate listing one seed twice), dropped or added (an aggregate listing one fewer
    or one more than it added)."""
    if not s.client.codec.seed_size:  # type: ignore[attr-defined]
        return forged_flip(s, rng)
    choice = rng.randrange(6)
    honest = list(seeds_of(s.aggregate))
    if choice == 0:
        return "seed-forged", "server", with_seeds(s.payloads[2], (rng.randbytes(32),))
    if choice == 1:
        honest[rng.randrange(ROSTER)] = rng.randbytes(32)
        return "seed-forged", "client", with_seeds(s.aggregate, tuple(honest))
    if choice == 2:
        other = seeds_of(s.payloads[rng.randrange(2)])
        return "seed-swapped", "server", with_seeds(s.payloads[2], other)
    if choice == 3:
        a, b = rng.sample(range(ROSTER), 2)
        honest[a] = honest[b]
        return "seed-swapped", "client", with_seeds(s.aggregate, tuple(honest))
    if choice == 4:
        del honest[rng.randrange(ROSTER)]
        return "seed-dropped", "client", with_seeds(s.aggregate, tuple(honest))
    extra = seeds_of(s.old_payload) if rng.random() < 0.5 else (rng.randbytes(32),)
    return "seed-added", "client", with_seeds(s.aggregate, (*honest, *extra))


def wrong_kind(s: Setup, rng: random.Random) -> Case:
    if rng.random() < 0.5:
        return "update-as-aggregate", "client", s.payloads[0]
    return "aggregate-as-update", "server", s.aggregate


MUTATORS: list[Callable[[Setup, random.Random], Case]] = [
    truncated,
    random_bytes,
    bit_flip,
    forged_flip,
    forged_field,
    forged_field,
    resized,
    foreign,
    replayed,
    duplicate,
    dropped,
    unlisted,
    keyless,
    seed,
    wrong_kind,
]


def cases(s: Setup, count: int, seed: int) -> Iterator[Case]:
    rng = random.Random(seed)
    for index in range(count):
        yield MUTATORS[index % len(MUTATORS)](s, rng)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("keys_dir", type=Path)
    parser.add_argument("--cases", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec", choices=("packed", "plain"), default="packed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="secagg-fuzz-") as scratch:
        setup = Setup(args.keys_dir, args.codec, Path(scratch))
        for index, (name, target, payload) in enumerate(cases(setup, args.cases, args.seed)):
            outcome, reason = setup.outcome(target, payload)
            digest = hashlib.sha256(payload).hexdigest()[:12]
            line = {"case": index, "kind": name, "target": target, "outcome": outcome}
            print(json.dumps({**line, "reason": reason, "payload": digest}), flush=True)
    print(json.dumps({"done": args.cases}), flush=True)


if __name__ == "__main__":
    main()
