"""A malicious server: what it can add to an aggregate, and that every client refuses it.

The server holds no key, but it needs none to make a *trivial* ciphertext (``c1 = 0``, ``c0``
the public encoding of any integers: ``hostile.trivial_ciphertext``), and adding one to the
aggregate adds its values to what every client decrypts. The ledger alone cannot see that; the
integrity tag (``secagg.crypto.integrity``) must. The honest path must never trip it: a
thousand honest rounds of the exact-integer check pass, none refused.
"""

from __future__ import annotations

import random
import struct

import numpy as np
import oracles
import pytest
from conftest import JOB, encrypt_all, round_of, update_for
from hostile import add_trivial, forge_aggregate, restamp_job, trivial_ciphertext, with_digest

from secagg import quantize
from secagg.crypto import Stamp, Update, envelope, integrity, ledger, seeded
from secagg.crypto.ckks import first_index
from secagg.crypto.ckks_server import TAIL
from secagg.crypto.envelope import AGGREGATE, SCALES, SERVER
from secagg.crypto.packing import PACKED, PACKINGS
from secagg.crypto.seal_format import from_wire, to_wire
from secagg.errors import PayloadError

ROSTER = 3
SIZE = 2_000
OTHER_JOB = bytes(range(100, 116))


def _updates(cipher, size: int = SIZE, seed: int = 5) -> list[Update]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    weights = (0.5, 0.3, 0.2)
    bound = cipher.sum_limit or 1.0
    return [update_for(cipher, rng.uniform(-w * bound, w * bound, size), w) for w in weights]


def _slots(values: int, roster: int = ROSTER) -> int:
    """Slots of the packed digits (update values, then the tally): the tail starts here."""
    return -(-(values + roster) // PACKED.values_per_slot)


def _digit_delta(index: int, amount: float, values: int, roster: int = ROSTER) -> np.ndarray:
    """A slot vector that adds ``amount`` to packed digit ``index`` (a value or a tally)."""
    delta = np.zeros(_slots(values, roster) + TAIL)
    slot, position = divmod(index, PACKED.values_per_slot)
    delta[slot] = amount * 2.0 ** (PACKED.digit_bits * position)
    return delta


def _decrypt_unchecked(client, aggregate: bytes, stamp: Stamp):  # type: ignore[no-untyped-def]
    """What the aggregate decrypts to, with no ledger or tag check: the attack landed."""
    opened = client._format.open(aggregate, stamp, AGGREGATE)
    c0 = from_wire(opened.body, client._shape.modulus).reshape(opened.blob_count, -1)
    n = opened.values + stamp.roster
    phase = client._secret.decrypt(c0, opened.seeds, first_index(stamp))
    slots = oracles.decode(phase, PACKED.scale_bits, stamp.roster, PACKED.slots_for(n, TAIL))
    return oracles.unpack(PACKED, slots.astype(np.float64), n, TAIL)


@pytest.fixture(scope="module")
def honest(ckks_pair):  # type: ignore[no-untyped-def]
    """One honest round of three clients: (updates, their payloads, the aggregate)."""
    client, server = ckks_pair
    stamp = round_of(4, roster=ROSTER)
    updates = _updates(client)
    payloads = encrypt_all(client, updates, stamp)
    return updates, payloads, server.sum(payloads, stamp)


def test_the_honest_aggregate_passes(ckks_pair, honest) -> None:
    client, _ = ckks_pair
    updates, _, aggregate = honest
    total = client.decrypt(aggregate, round_of(4, roster=ROSTER))
    assert np.array_equal(total.values, np.sum([u.values for u in updates], axis=0))


# --- (a) a keyless ciphertext added to the aggregate ------------------------------------------


def _attacks() -> dict[str, np.ndarray]:
    """Slot vectors a server could add, by what they do to what the clients decrypt."""
    weight_slot = _slots(SIZE)
    shrink = np.zeros(weight_slot + TAIL)
    shrink[weight_slot] = -(2.0**31)  # half the summed weight: every value doubles
    everywhere = np.zeros(weight_slot + TAIL)
    # +3 on every value of the update (the slots that hold values only)
    b = PACKED.digit_bits
    everywhere[: SIZE // PACKED.values_per_slot] = 3 * (1 + 2.0**b + 2.0 ** (2 * b))
    clipped = np.zeros(weight_slot + TAIL)
    clipped[weight_slot + 1] = 5.0
    return {
        # one bias pushed so far that one class wins every prediction
        "one-value": _digit_delta(7, 4_000.0, SIZE),
        "every-value": everywhere,
        # (c) the divisor shrunk: the average of the update is blown up
        "weight": shrink,
        # the clipped count the clients report
        "clipped": clipped,
    }


@pytest.mark.parametrize("attack", ["one-value", "every-value", "weight", "clipped"])
def test_a_keyless_ciphertext_added_to_the_aggregate_is_refused(ckks_pair, honest, attack) -> None:
    client, server = ckks_pair
    _, _, aggregate = honest
    stamp = round_of(4, roster=ROSTER)
    delta = _attacks()[attack]
    forged = add_trivial(server, aggregate, delta)
    # The attack lands: without the tag, the ledger of the forged sum is intact.
    digits, tail = _decrypt_unchecked(client, forged, stamp)
    honest_digits, honest_tail = _decrypt_unchecked(client, aggregate, stamp)
    assert not (np.array_equal(digits, honest_digits) and np.array_equal(tail, honest_tail))
    ledger.settle(digits[:SIZE], digits[SIZE:], tail[: ledger.TAIL], stamp, (0, 1, 2))
    with pytest.raises(PayloadError, match="integrity tag does not match") as caught:
        client.decrypt(forged, stamp)
    assert caught.value.reason == "forged"


def test_a_weight_blown_up_is_refused(ckks_pair, honest) -> None:
    client, server = ckks_pair
    _, _, aggregate = honest
    stamp = round_of(4, roster=ROSTER)
    delta = np.zeros(_slots(SIZE) + TAIL)
    delta[_slots(SIZE)] = 2.0**40  # 256 times the whole weight
    with pytest.raises(PayloadError) as caught:
        client.decrypt(add_trivial(server, aggregate, delta), stamp)
    assert caught.value.reason == "bad-weight"


def test_an_aggregate_made_up_with_an_intact_ledger_is_refused(ckks_pair, honest) -> None:
    """The attack the ledger alone cannot see: the server drops client 2's update and adds, in
    a keyless ciphertext, the ledger entries client 2 would have sent (it knows them all: the
    roster, the sample counts, the round tag's public formula), so the tally, the weight and
    the round tags all add up; then it tries to wipe the whole update out the same way."""
    client, server = ckks_pair
    updates, payloads, _ = honest
    stamp = round_of(4, roster=ROSTER)
    two = forge_aggregate(server, payloads[:2], stamp, (0, 1, 2))
    refill = np.zeros(_slots(SIZE) + TAIL)
    refill += _digit_delta(SIZE + 2, 1.0, SIZE)  # client 2's tally
    units, _, tag = ledger.entries(updates[2], stamp.for_sender(2))[1]
    refill[_slots(SIZE)] = units
    refill[_slots(SIZE) + 2] = tag
    refilled = add_trivial(server, two, refill)
    digits, tail = _decrypt_unchecked(client, refilled, stamp)
    ledger.settle(digits[:SIZE], digits[SIZE:], tail[: ledger.TAIL], stamp, (0, 1, 2))
    with pytest.raises(PayloadError) as caught:
        client.decrypt(refilled, stamp)
    assert caught.value.reason == "forged"

    # A round's update wiped out: a made-up aggregate with zeros and a perfect ledger. A
    # trivial ciphertext needs c1 = 0, but an aggregate's c1 is what its seeds expand to: with
    # the honest seeds listed it decrypts to noise, and with none it is no aggregate.
    entries = [ledger.entries(u, stamp.for_sender(i)) for i, u in enumerate(updates)]
    tally = np.sum([e[0] for e in entries], axis=0)
    tail = np.sum([e[1] for e in entries], axis=0)
    made_up = oracles.pack(PACKED, np.concatenate([np.zeros(SIZE), tally]), np.append(tail, [0, 0]))
    honest_sum = forge_aggregate(server, payloads, stamp, (0, 1, 2))
    wiped = _replace_with_trivial(server, honest_sum, made_up)
    with pytest.raises(PayloadError) as caught:
        client.decrypt(wiped, stamp)
    assert caught.value.reason == "not-integer"
    seedless = bytearray(wiped[:-32])
    struct.pack_into(">I", seedless, envelope.HEADER_SIZE - 4, 0)  # seed count
    start = envelope.HEADER_SIZE + 4 * ROSTER
    del seedless[start : start + 3 * seeded.SEED_BYTES]
    with pytest.raises(PayloadError) as caught:
        client.decrypt(with_digest(seedless), stamp)
    assert caught.value.reason == "malformed"


def _replace_with_trivial(server, aggregate: bytes, slots: np.ndarray) -> bytes:  # type: ignore[no-untyped-def]
    """The aggregate's c0 words replaced by trivial ciphertexts' of ``slots``: no client's
    data (its seeds stay)."""
    shape = server._shape
    per = shape.poly_modulus_degree
    count = -(-slots.size // per)
    words = np.stack(
        [trivial_ciphertext(shape, slots[i * per : (i + 1) * per])[0] for i in range(count)]
    )
    body = to_wire(words)
    start = len(aggregate) - 32 - body.size
    return with_digest(aggregate[:start] + body.tobytes())


# --- (b) the scale exchange -------------------------------------------------------------------


def test_a_changed_histogram_count_in_the_scale_aggregate_is_refused(ckks_pair) -> None:
    """The scale exchange is summed first and sets every quantization step: a server that
    moves one client's count to a larger exponent coarsens a block's step (or to a smaller
    one, and the sum overflows). The moved count keeps the counts non-negative and their
    sum right, so only the tag sees it."""
    client, server = ckks_pair
    stamp = round_of(4, roster=ROSTER).scales()
    sizes = np.array([quantize.BLOCK, 500])
    rng = np.random.default_rng(1)
    updates = [
        Update(quantize.histogram(rng.normal(0, 0.01, sizes.sum()), sizes), w)
        for w in (0.5, 0.3, 0.2)
    ]
    aggregate = server.sum(encrypt_all(client, updates, stamp), stamp)
    summed = client.decrypt(aggregate, stamp)
    quantize.steps(summed.values, 3, PACKED.sum_limit)  # the honest sum passes every check
    bins = summed.values.size
    low = int(np.flatnonzero(summed.values[: quantize.BINS])[0])
    moved = _digit_delta(low, -1.0, bins) + _digit_delta(quantize.BINS - 1, 1.0, bins)
    forged = add_trivial(server, aggregate, moved)
    digits, _ = _decrypt_unchecked(client, forged, stamp)
    quantize.steps(digits[:bins], 3, PACKED.sum_limit)  # consistent counts, wrong step
    with pytest.raises(PayloadError) as caught:
        client.decrypt(forged, stamp)
    assert caught.value.reason == "forged"
    # A negative count is refused by the tag, and by the steps' own check of the counts.
    with pytest.raises(PayloadError) as caught:
        client.decrypt(add_trivial(server, aggregate, _digit_delta(low + 1, -2.0, bins)), stamp)
    assert caught.value.reason == "forged"


@pytest.mark.parametrize(
    "change", [("negative", -1.0, 1.0), ("too-many", 1.0, 0.0), ("too-few", -1.0, 0.0)]
)
def test_steps_refuse_histograms_no_honest_clients_could_sum_to(change) -> None:
    _, first, second = change
    summed = np.zeros(2 * quantize.BINS)
    summed[[3, quantize.BINS + 5]] = 3.0
    steps_before = quantize.steps(summed, 3, PACKED.sum_limit)
    assert np.all(steps_before > 0)
    summed[0] += first  # bin 0 holds no count: -1 makes it negative
    summed[1] += second
    with pytest.raises(PayloadError, match="3 non-negative counts per block") as caught:
        quantize.steps(summed, 3, PACKED.sum_limit)
    assert caught.value.reason == "bad-scales"


# --- (d) a ciphertext replayed from another job, round or phase -------------------------------


def test_a_ciphertext_from_another_job_with_its_envelope_rewritten_is_refused(cipher_pair) -> None:
    """Client 2's update of the same round of *another job* under the same key, its envelope's
    job field rewritten and its digest recomputed: the server cannot tell, the clients can."""
    client, server = cipher_pair
    stamp = round_of(4, roster=ROSTER)
    other = round_of(4, roster=ROSTER, job=OTHER_JOB)
    updates = _updates(client)
    theirs = restamp_job(client.encrypt(updates[2], other.for_sender(2)), JOB)
    payloads = [*encrypt_all(client, updates[:2], stamp), theirs]
    with pytest.raises(PayloadError, match="replayed from another job") as caught:
        client.decrypt(server.sum(payloads, stamp), stamp)
    assert caught.value.reason == "replayed"


def test_a_ciphertext_from_the_other_phase_is_refused(cipher_pair) -> None:
    """A scale-exchange payload of the same size, its phase byte rewritten to an update's: its
    c1 was expanded from the scale exchange's range of its seed, so in the update's sum it
    decrypts to noise; in plaintext, the ledger's round tag, bound to the phase, names it."""
    client, server = cipher_pair
    stamp = round_of(4, roster=ROSTER)
    updates = _updates(client)
    scales = client.encrypt(updates[2], stamp.scales().for_sender(2))
    data = bytearray(scales[:-32])
    data[7] = envelope.UPDATE_PHASE
    payloads = [*encrypt_all(client, updates[:2], stamp), with_digest(data)]
    with pytest.raises(PayloadError) as caught:
        client.decrypt(server.sum(payloads, stamp), stamp)
    assert caught.value.reason == ("not-integer" if server.quantizes else "replayed")


def test_round_tags_bind_job_round_and_phase() -> None:
    base = Stamp(JOB, 4, SERVER, ROSTER)
    tags = {
        ledger.round_tag(s)
        for s in (
            base,
            base.scales(),
            Stamp(JOB, 5, SERVER, ROSTER),
            Stamp(OTHER_JOB, 4, SERVER, ROSTER),
        )
    }
    assert len(tags) == 4
    assert all(1 <= t <= 2**24 for t in tags)  # exact in float32, and x128 in a tail slot


# --- the check itself, with exact integers ----------------------------------------------------

MAC = integrity.MacKey(b"a shared secret context, for the exact-integer tests")


def _honest_round(rng: random.Random, nrng: np.random.Generator):  # type: ignore[no-untyped-def]
    """A random honest round as the clients' integers, in a random packing: each packs its
    digits and ledger and seals them; the sum of the packed slots is what an honest server's
    aggregate decrypts to."""
    packing = rng.choice(PACKINGS)
    clients = rng.choice([1, 2, 3, 8, rng.randint(1, PACKED.max_clients)])
    roster = clients + rng.randint(0, 4)
    values = rng.randint(1, 400)
    job = rng.randbytes(16)
    phase = rng.choice([envelope.UPDATE_PHASE, SCALES])
    stamp = Stamp(job, rng.randint(0, 2**32 - 1), SERVER, roster, phase)
    weights = nrng.dirichlet(np.ones(clients)) * rng.choice([1.0, 0.5])
    senders = sorted(rng.sample(range(roster), clients))
    total = np.zeros(packing.slots_for(values + roster, TAIL), dtype=np.int64)
    exact = np.zeros(values)
    for sender, weight in zip(senders, weights, strict=True):
        limit = int(weight * packing.sum_limit)
        update = Update(nrng.integers(-limit, limit, values, endpoint=True).astype(float), weight)
        update.clipped = rng.randint(0, 3)
        tally, tail = ledger.entries(update, stamp.for_sender(sender))
        digits = np.concatenate([update.values, tally])
        slots = oracles.pack(packing, digits, np.concatenate([tail, np.zeros(integrity.SLOTS)]))
        slots[-integrity.SLOTS :] = MAC.seal(stamp, digits, tail)
        total += slots.astype(np.int64)
        exact += update.values
    return packing, stamp, values, tuple(senders), total.astype(np.float64), exact


def test_a_thousand_honest_rounds_pass_the_exact_check() -> None:
    """False-alarm rate 0: the check is exact integer arithmetic, no tolerance anywhere."""
    rng, nrng = random.Random(11), np.random.default_rng(11)
    for _ in range(1000):
        packing, stamp, values, senders, slots, exact = _honest_round(rng, nrng)
        digits, tail = oracles.unpack(packing, slots, values + stamp.roster, TAIL)
        total = ledger.settle(digits[:values], digits[values:], tail, stamp, senders, mac=MAC)
        assert np.array_equal(total.values, exact)


def test_any_change_to_an_honest_sum_fails_the_check() -> None:
    """One entry moved by one unit, by a multiple of P, or the tag sealed for another job,
    round or phase: refused, by the tag or before it by the unpacker's range."""
    rng, nrng = random.Random(12), np.random.default_rng(12)
    for trial in range(300):
        packing, stamp, values, senders, slots, _ = _honest_round(rng, nrng)
        changed = slots.copy()
        slot = rng.randrange(slots.size)
        b = packing.digit_bits
        step = rng.choice([1, -1, 2**b, -(2 ** (2 * b))]) * (integrity.P if trial % 3 == 0 else 1)
        changed[slot] += step
        with pytest.raises(PayloadError) as caught:
            digits, tail = oracles.unpack(packing, changed, values + stamp.roster, TAIL)
            ledger.settle(digits[:values], digits[values:], tail, stamp, senders, mac=MAC)
        assert caught.value.reason not in {"", "invalid"}
    # The same honest entries, checked as another job's, round's or phase's: other r.
    packing, stamp, values, senders, slots, _ = _honest_round(rng, nrng)
    digits, tail = oracles.unpack(packing, slots, values + stamp.roster, TAIL)
    for other in (
        Stamp(OTHER_JOB, stamp.round_num, SERVER, stamp.roster, stamp.phase),
        Stamp(stamp.job, stamp.round_num ^ 1, SERVER, stamp.roster, stamp.phase),
        Stamp(stamp.job, stamp.round_num, SERVER, stamp.roster, 1 - stamp.phase),
    ):
        with pytest.raises(PayloadError) as caught:
            MAC.verify(other, digits, tail[: ledger.TAIL], tail[ledger.TAIL :])
        assert caught.value.reason == "forged"


@pytest.mark.parametrize("packing", PACKINGS, ids=["standard", "fine", "wide"])
def test_the_tag_fits_the_tail_and_the_prime_exceeds_every_entry(packing) -> None:
    # Two 31-bit limbs of a tag below P, summed over the most clients, fit a tail slot.
    assert packing.max_clients * (2**31 - 1) < packing.tail_limit
    # Every entry the unpacker accepts is below 2 x tail_limit in magnitude: two such entries
    # differ by less than P, so entries congruent mod P are equal.
    assert 4 * packing.tail_limit < integrity.P


def test_the_tag_is_exact_for_the_widest_digits() -> None:
    """The tag's int64 arithmetic, against Python's unbounded integers, with every digit at
    the edge of the widest packing's range (where a too-long block would overflow)."""
    from secagg.crypto.packing import FINE

    edge = FINE.digit_limit
    # Long runs of one sign: the partial sums grow as fast as they can.
    digits = np.repeat([edge - 1.0, -edge], 5_000)
    whole = np.array([2.0**45 - 1, -(2.0**45) + 1, 7.0])
    stamp = Stamp(OTHER_JOB, 3, SERVER, 4)
    r = MAC.vector(stamp, digits.size + whole.size)
    entries = [int(v) for v in digits] + [int(v) for v in whole]
    expected = sum(int(w) * v for w, v in zip(r.tolist(), entries, strict=True)) % integrity.P
    limbs = MAC.seal(stamp, digits, whole)
    assert sum(int(v) << (21 * i) for i, v in enumerate(limbs)) == expected


@pytest.mark.parametrize("bad", [2.0**23, -(2.0**23), float("nan"), float("inf")])
def test_a_digit_beyond_the_tags_exact_range_is_refused(bad) -> None:
    """A digit whose products could overflow the tag's int64 blocks (or is no number) is
    refused by name, wherever it sits, never tagged as garbage."""
    stamp = Stamp(OTHER_JOB, 3, SERVER, 4)
    for at in (0, 700, 9_999):
        digits = np.ones(10_000)
        digits[at] = bad
        with pytest.raises(PayloadError, match="out of range") as caught:
            MAC.seal(stamp, digits, np.array([1.0, 0.0, 7.0]))
        assert caught.value.reason == "malformed"
    # just inside the range, the tag is made
    assert MAC.seal(stamp, np.full(10, 2.0**23 - 1), np.array([1.0, 0.0, 7.0])).shape == (3,)


def test_the_integrity_key_comes_from_the_secret_context(session_keys) -> None:
    """Two clients derive one key from client.ctx; the server's context (public parameters)
    or the published key fingerprint give another."""
    from secagg import keys

    secret = keys.load_for_client(session_keys)
    public = keys.load_for_server(session_keys)
    stamp = round_of(4, roster=ROSTER)
    ours = integrity.MacKey(secret.context).vector(stamp, 64)
    assert np.array_equal(ours, integrity.MacKey(bytes(secret.context)).vector(stamp, 64))
    for other in (public.context, secret.fingerprint, public.fingerprint):
        assert not np.array_equal(ours, integrity.MacKey(other).vector(stamp, 64))


def test_r_is_the_key_stream_mod_p_in_exact_halves() -> None:
    """r's words, reduced mod P = 2**61 - 1 and split in 31-bit halves in one compiled pass,
    are Python's ``word % P``, at the reduction's edges too."""
    from secagg.crypto import ring

    words = np.random.default_rng(3).integers(0, 2**64 - 1, 20_000, np.uint64, endpoint=True)
    words[:5] = [2**64 - 1, integrity.P, integrity.P - 1, 2 * integrity.P, 2 * integrity.P + 1]
    low, high = np.empty(words.size, np.int32), np.empty(words.size, np.int32)
    ring.split_halves(words, 61, 31, low, high)
    assert low.dtype == high.dtype == np.int32
    assert [int(lo) + (int(hi) << 31) for lo, hi in zip(low, high, strict=True)] == [
        int(w) % integrity.P for w in words
    ]
