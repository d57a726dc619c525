"""Ciphers: HE aggregates checked against the plaintext oracle, and bad payloads refused."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import JOB, encrypt_all, round_of, update_for
from hostile import body_of, forge_aggregate, restamp, with_digest

from secagg import keys
from secagg.config import CkksParams
from secagg.crypto import Update
from secagg.crypto.ckks import CkksClient
from secagg.crypto.ckks_server import CkksServer
from secagg.crypto.packing import PACKED
from secagg.crypto.plain import PlainCipher
from secagg.crypto.seal_format import from_wire, to_wire
from secagg.errors import KeyFileError, PayloadError


def _updates(cipher, count: int, size: int, seed: int = 0) -> list[Update]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(count))
    scale = 1.0 if cipher.sum_limit is None else cipher.sum_limit
    return [update_for(cipher, rng.uniform(-w * scale, w * scale, size), float(w)) for w in weights]


# Around the ciphertext boundaries: 4,096 slots hold 12,288 packed values, less the tally and
# the tail (3 clients: one slot of tally; three ledger slots and two of the integrity tag).
@pytest.mark.parametrize("size", [1, 12_267, 12_268, 12_270, 40_000])
def test_aggregate_is_the_sum_of_the_updates(cipher_pair, size: int) -> None:
    client, server = cipher_pair
    updates = _updates(client, 3, size, seed=size)
    for update, clipped in zip(updates, (1, 2, 4), strict=True):
        update.clipped = clipped
    stamp = round_of(3, roster=3)
    total = client.decrypt(server.sum(encrypt_all(client, updates, stamp), stamp), stamp)
    exact = np.sum([u.values for u in updates], axis=0)
    assert total.values.shape == (size,)
    # The packed codec is exact; plaintext travels as float32.
    tolerance = 0.0 if client.sum_limit is not None else 1e-6
    assert np.max(np.abs(total.values - exact)) <= tolerance
    assert total.weight == pytest.approx(1.0, abs=1e-6)
    assert total.clipped == 7
    assert total.contributors == (0, 1, 2)


def test_he_aggregate_equals_the_plaintext_aggregate_exactly(ckks_pair) -> None:
    """Eight clients' quantized updates: HE and plaintext FedAvg sum to the same integers."""
    he_client, he_server = ckks_pair
    plain = PlainCipher()
    updates = _updates(he_client, 8, 30_000, seed=7)
    stamp = round_of(2)
    he = he_client.decrypt(he_server.sum(encrypt_all(he_client, updates, stamp), stamp), stamp)
    oracle = plain.decrypt(plain.sum(encrypt_all(plain, updates, stamp), stamp), stamp)
    assert np.array_equal(he.values, oracle.values)
    assert he.weight == pytest.approx(oracle.weight, abs=1e-7)


def test_published_values_carry_no_key_dependent_noise(ckks_pair) -> None:
    """The same updates encrypted twice (fresh noise each time) decrypt to identical integers,
    equal to the exact sum: nothing of the secret key's noise reaches what a client publishes."""
    client, server = ckks_pair
    updates = _updates(client, 4, 20_000, seed=3)
    stamp = round_of(1, roster=4)
    first = client.decrypt(server.sum(encrypt_all(client, updates, stamp), stamp), stamp)
    again = client.decrypt(server.sum(encrypt_all(client, updates, stamp), stamp), stamp)
    assert np.array_equal(first.values, again.values)
    assert np.array_equal(first.values, np.sum([u.values for u in updates], axis=0))
    assert np.array_equal(first.values, np.rint(first.values))


def test_server_sums_a_stream_without_holding_it(cipher_pair, monkeypatch) -> None:
    """The server takes each payload as it arrives: it has checked and added payload k before
    payload k + 1 exists (a sum that first collected the stream would see them all at once)."""
    client, server = cipher_pair
    stamp = round_of(1, roster=3)
    events: list[str] = []
    real_check = server._check  # what the sum does with a payload nobody checked on arrival

    def check(payload, round_stamp, values=None):  # type: ignore[no-untyped-def]
        opened = real_check(payload, round_stamp, values)
        events.append(f"added {opened.stamp.sender}")
        return opened

    monkeypatch.setattr(server, "_check", check)

    def arrivals():  # type: ignore[no-untyped-def]
        for sender, value in enumerate((1.0, 2.0, 3.0)):
            events.append(f"sent {sender}")
            yield client.encrypt(Update(np.full(10, value), 0.25), stamp.for_sender(sender))

    total = client.decrypt(server.sum(arrivals(), stamp), stamp)
    assert events == ["sent 0", "added 0", "sent 1", "added 1", "sent 2", "added 2"]
    assert np.allclose(total.values, 6.0, atol=1e-6)
    assert total.weight == pytest.approx(0.75, abs=1e-6)


def test_an_update_checked_on_arrival_is_added_without_a_second_check(
    cipher_pair, monkeypatch
) -> None:
    """The network server checks each upload as it arrives (``check``); the round's sum then
    only adds it. Another object with the same bytes, or the same payload summed for another
    round or length, is checked again, and a payload that fails its check is never added."""
    client, server = cipher_pair
    stamp = round_of(3, roster=2)
    ups = [Update(np.full(100, 1.0), 0.5), Update(np.full(100, 2.0), 0.5)]
    first, second = encrypt_all(client, ups, stamp)
    opened = server.check(first, stamp.for_sender(0), 100)  # as the upload handler does
    assert server.check(first, stamp.for_sender(0), 100) is opened  # once
    checks: list[int] = []
    real_check = server._check
    monkeypatch.setattr(server, "_check", lambda p, s, v: checks.append(1) or real_check(p, s, v))
    total = client.decrypt(server.sum([first, second], stamp, values=100), stamp)
    assert np.allclose(total.values, 3.0, atol=1e-6) and len(checks) == 1  # only `second`
    server.check(first, stamp, 100)
    server.sum([bytes(bytearray(first)), second], stamp, values=100)  # equal bytes, new object
    assert len(checks) == 4
    server.check(first, stamp, 100)
    with pytest.raises(PayloadError):
        server.sum([first], stamp, values=99)  # checked for another length: checked again
    damaged = first[:-1] + bytes([first[-1] ^ 1])
    with pytest.raises(PayloadError):
        server.check(damaged, stamp, 100)
    with pytest.raises(PayloadError):
        server.sum([damaged], stamp, values=100)


def test_payload_from_other_keys_is_refused(ckks_pair, tmp_path) -> None:
    client, server = ckks_pair
    keys.generate(tmp_path, CkksParams())
    stranger = CkksClient(keys.load_for_client(tmp_path))
    stamp = round_of(1, roster=2)
    theirs = stranger.encrypt(Update(np.ones(10), 0.5), stamp.for_sender(1))
    ours = client.encrypt(Update(np.ones(10), 0.5), stamp.for_sender(0))
    with pytest.raises(PayloadError, match="other keys") as caught:
        server.sum([ours, theirs], stamp)
    assert caught.value.reason == "wrong-key"
    with pytest.raises(PayloadError, match="other keys"):
        client.decrypt(theirs, stamp)


def test_aggregate_of_other_keys_with_a_forged_fingerprint_is_refused(ckks_pair, tmp_path) -> None:
    """A foreign key's ciphertexts decrypt to noise; the codec refuses them, not garbage."""
    client, _ = ckks_pair
    keys.generate(tmp_path, CkksParams())
    stranger = CkksClient(keys.load_for_client(tmp_path))
    stranger_server = CkksServer(keys.load_for_server(tmp_path))
    stamp = round_of(1, roster=2)
    ups = [Update(np.full(100, 5.0), 0.5), Update(np.full(100, 7.0), 0.5)]
    theirs = stranger_server.sum(encrypt_all(stranger, ups, stamp), stamp)
    ours_fp = client.codec.fingerprint
    forged = bytearray(theirs[:-32])
    forged[8:24] = ours_fp
    from hostile import with_digest

    with pytest.raises(PayloadError, match="does not decrypt to integers"):
        client.decrypt(with_digest(forged), stamp)


def test_fine_precision_carries_two_values_per_coefficient_and_needs_a_matching_server(
    session_keys,
) -> None:
    """``fine`` packs two 23-bit values per coefficient where ``standard`` packs three 15-bit
    ones: 1.5 times the ciphertexts for a large update, and a sum as exact. A server of the
    other precision refuses the payloads by name, never decodes them wrongly."""
    fine = CkksClient(keys.load_for_client(session_keys), precision="fine")
    fine_server = CkksServer(keys.load_for_server(session_keys), precision="fine")
    standard = CkksClient(keys.load_for_client(session_keys))
    server = CkksServer(keys.load_for_server(session_keys))
    assert (fine.sum_limit, standard.sum_limit) == (2**22 - 1, 2**14 - 1)
    stamp = round_of(1, roster=2)
    rng = np.random.default_rng(2)
    sizes = {}
    for name, client, summer in (("fine", fine, fine_server), ("standard", standard, server)):
        values = np.rint(rng.uniform(-1, 1, 500_000) * (client.sum_limit // 2))
        ups = [Update(values, 0.5), Update(-np.rint(values / 2), 0.5)]
        payloads = encrypt_all(client, ups, stamp)
        sizes[name] = len(payloads[0])
        total = client.decrypt(summer.sum(payloads, stamp), stamp)
        assert np.array_equal(total.values, ups[0].values + ups[1].values)
    assert 1.45 < sizes["fine"] / sizes["standard"] < 1.55
    with pytest.raises(PayloadError, match=r"codec settings .* he_precision") as err:
        server.sum(encrypt_all(fine, ups, stamp), stamp)
    assert err.value.reason == "wrong-codec"


def test_clients_of_one_key_in_one_process_decrypt_alike_and_others_stay_apart(
    ckks_pair, session_keys, tmp_path
) -> None:
    """Clients of one key in one process share the expensive half of decrypting (c1 s): a
    second client decrypts the same aggregate to the same sum, and a client of another key,
    given that aggregate with its fingerprint forged, still decrypts noise, not the sum."""
    client, server = ckks_pair
    twin = CkksClient(keys.load_for_client(session_keys))
    stamp = round_of(1, roster=2)
    ups = [Update(np.full(5000, 5.0), 0.5), Update(np.arange(5000.0), 0.5)]
    aggregate = server.sum(encrypt_all(client, ups, stamp), stamp)
    first, second = client.decrypt(aggregate, stamp), twin.decrypt(aggregate, stamp)
    assert np.array_equal(first.values, ups[0].values + ups[1].values)
    assert np.array_equal(second.values, first.values)
    keys.generate(tmp_path, CkksParams())
    stranger = CkksClient(keys.load_for_client(tmp_path))
    forged = bytearray(aggregate[:-32])
    forged[8:24] = stranger.codec.fingerprint
    from hostile import with_digest

    with pytest.raises(PayloadError, match="does not decrypt to integers"):
        stranger.decrypt(with_digest(forged), stamp)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage", "pad"])
def test_corrupt_payload_is_refused(cipher_pair, damage: str) -> None:
    client, server = cipher_pair
    stamp = round_of(1, roster=2)
    good = client.encrypt(update_for(client, np.arange(5000.0) % 100, 0.5), stamp.for_sender(0))
    other = client.encrypt(update_for(client, np.arange(5000.0) % 7, 0.5), stamp.for_sender(1))
    bad = {
        "truncate": other[: len(other) // 2],
        "flip": other[:200] + bytes([other[200] ^ 0x10]) + other[201:],
        "empty": b"",
        "garbage": b"\x00" * 500,
        "pad": other + b"\x00",
    }[damage]
    with pytest.raises(PayloadError) as on_server:
        server.sum([good, bad], stamp)
    assert on_server.value.reason in {"truncated", "bad-digest", "bad-magic", "malformed"}
    # The same damage to an aggregate: the undamaged one decrypts, the damaged one is refused.
    aggregate = server.sum([good, other], stamp)
    client.decrypt(aggregate, stamp)
    damaged = {
        "truncate": aggregate[: len(aggregate) // 2],
        "flip": aggregate[:200] + bytes([aggregate[200] ^ 0x10]) + aggregate[201:],
        "empty": b"",
        "garbage": b"\x00" * 500,
        "pad": aggregate + b"\x00",
    }[damage]
    with pytest.raises(PayloadError) as on_client:
        client.decrypt(damaged, stamp)
    assert on_client.value.reason in {"truncated", "bad-digest", "bad-magic", "malformed"}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"round_num": 4}, "wrong-round"),
        ({"job": bytes(16)}, "wrong-job"),
        ({"roster": 3}, "wrong-roster"),
    ],
)
def test_payload_of_another_round_job_or_roster_is_refused(cipher_pair, change, reason) -> None:
    client, server = cipher_pair
    stamp = round_of(5, roster=2)
    other = {"round_num": 5, "roster": 2, "job": JOB, **change}
    foreign = round_of(other["round_num"], other["roster"], other["job"])
    ones = update_for(client, np.ones(3), 0.5)
    with pytest.raises(PayloadError) as caught:
        server.sum(
            [
                client.encrypt(ones, stamp.for_sender(0)),
                client.encrypt(ones, foreign.for_sender(1)),
            ],
            stamp,
        )
    assert caught.value.reason == reason


def test_duplicate_contribution_in_a_round_is_refused(cipher_pair) -> None:
    client, server = cipher_pair
    stamp = round_of(1, roster=3)
    payload = client.encrypt(update_for(client, np.ones(10), 0.3), stamp.for_sender(1))
    with pytest.raises(PayloadError, match="already contributed") as caught:
        server.sum([payload, payload], stamp)
    assert caught.value.reason == "duplicate"


def test_an_update_is_not_an_aggregate(cipher_pair) -> None:
    client, _ = cipher_pair
    stamp = round_of(1, roster=1)
    update = client.encrypt(update_for(client, np.ones(10), 1.0), stamp.for_sender(0))
    with pytest.raises(PayloadError, match="client update, expected an aggregate"):
        client.decrypt(update, stamp)


def test_payload_of_another_codec_is_refused(ckks_pair) -> None:
    he_client, he_server = ckks_pair
    plain = PlainCipher()
    stamp = round_of(1, roster=1)
    with pytest.raises(PayloadError, match="plaintext, this party expects packed CKKS") as caught:
        he_server.sum([plain.encrypt(Update(np.ones(10), 0.5), stamp.for_sender(0))], stamp)
    assert caught.value.reason == "wrong-codec"
    with pytest.raises(PayloadError, match="run every party with the same --he setting"):
        plain.sum([he_client.encrypt(Update(np.ones(10), 0.5), stamp.for_sender(0))], stamp)


def test_mismatched_lengths_are_refused(cipher_pair) -> None:
    client, server = cipher_pair
    stamp = round_of(1, roster=2)
    payloads = [
        client.encrypt(update_for(client, np.ones(10), 0.5), stamp.for_sender(0)),
        client.encrypt(update_for(client, np.ones(11), 0.5), stamp.for_sender(1)),
    ]
    with pytest.raises(PayloadError, match="values") as caught:
        server.sum(payloads, stamp)
    assert caught.value.reason == "wrong-length"


def test_the_rounds_length_comes_from_the_job_not_the_first_payload(cipher_pair) -> None:
    """A wrong payload that arrives first is the one refused; the honest ones are summed."""
    client, server = cipher_pair
    stamp = round_of(1, roster=3)
    wrong = client.encrypt(update_for(client, np.ones(11), 0.3), stamp.for_sender(0))
    honest = [
        client.encrypt(update_for(client, np.ones(10), 0.3), stamp.for_sender(i)) for i in (1, 2)
    ]
    with pytest.raises(PayloadError, match="has 11 values, the round has 10") as caught:
        server.check(wrong, stamp, 10)
    assert caught.value.reason == "wrong-length"
    summed = server.sum(honest, stamp, frozenset({1, 2}), values=10)
    assert client.decrypt(summed, stamp).contributors == (1, 2)
    with pytest.raises(PayloadError, match="the round has 10") as caught:
        server.sum([wrong, *honest], stamp, values=10)


# --- the ledger: what a client detects after decrypting ---------------------------------------


def _three(client, stamp):  # type: ignore[no-untyped-def]
    return encrypt_all(client, _updates(client, 3, 2000, seed=5), stamp)


def test_a_dropped_contribution_is_detected(cipher_pair) -> None:
    """The server lists three contributors but added only two updates."""
    client, server = cipher_pair
    stamp = round_of(2, roster=3)
    payloads = _three(client, stamp)
    forged = forge_aggregate(server, payloads[:2], stamp, (0, 1, 2))
    with pytest.raises(PayloadError, match="lacks the update of client") as caught:
        client.decrypt(forged, stamp)
    assert caught.value.reason == "dropped"


def test_a_duplicated_contribution_is_detected(cipher_pair) -> None:
    """Updates of weight 1/4 each, so that four of them (one twice) stay inside the codec's
    range whatever the encryption noise: the ledger, not an overflow, must catch it."""
    client, server = cipher_pair
    stamp = round_of(2, roster=3)
    rng = np.random.default_rng(5)
    limit = 1.0 if client.sum_limit is None else client.sum_limit
    updates = [update_for(client, rng.uniform(-limit / 4, limit / 4, 2000), 0.25) for _ in "abc"]
    payloads = encrypt_all(client, updates, stamp)
    forged = forge_aggregate(server, [*payloads[:2], payloads[1]], stamp, (0, 1))
    with pytest.raises(PayloadError, match="more than once") as caught:
        client.decrypt(forged, stamp)
    assert caught.value.reason == "duplicate"


def test_a_contribution_replayed_from_another_round_is_detected(cipher_pair) -> None:
    """Client 2's update of round 1, its envelope rewritten to round 2 with a valid digest, gets
    past the server; its encrypted round tag does not get past the clients."""
    client, server = cipher_pair
    old = round_of(1, roster=3)
    new = round_of(2, roster=3)
    replayed = restamp(_three(client, old)[2], round_num=2)
    payloads = [*_three(client, new)[:2], replayed]
    aggregate = server.sum(payloads, new)
    with pytest.raises(PayloadError, match="replayed from another job, round") as caught:
        client.decrypt(aggregate, new)
    assert caught.value.reason == "replayed"


def test_a_dropout_leaves_a_correct_average(cipher_pair) -> None:
    """One of three clients never sends: the sum of the others' weights is the divisor."""
    client, server = cipher_pair
    stamp = round_of(1, roster=3)
    updates = _updates(client, 3, 500, seed=9)
    payloads = encrypt_all(client, updates, stamp)
    total = client.decrypt(server.sum([payloads[0], payloads[2]], stamp), stamp)
    assert total.contributors == (0, 2)
    assert total.weight == pytest.approx(updates[0].weight + updates[2].weight, abs=1e-6)
    expected = updates[0].values + updates[2].values
    assert np.allclose(total.values, expected, atol=1e-5)


# --- limits of the packed codec ---------------------------------------------------------------


def test_packed_codec_refuses_what_it_cannot_carry_exactly(ckks_pair) -> None:
    client, _ = ckks_pair
    stamp = round_of(1, roster=1).for_sender(0)
    with pytest.raises(PayloadError, match="integers"):
        client.encrypt(Update(np.array([0.5]), 1.0), stamp)
    with pytest.raises(PayloadError, match="packable range"):
        client.encrypt(Update(np.array([float(PACKED.digit_limit)]), 1.0), stamp)
    with pytest.raises(PayloadError, match="NaN"):
        client.encrypt(Update(np.array([np.nan]), 1.0), stamp)


def test_server_refuses_more_clients_than_the_packed_headroom(ckks_pair) -> None:
    """Rounds above 128 clients use the wider packing, up to 1,024; more are refused."""
    from secagg.crypto.packing import WIDE

    client, server = ckks_pair
    roster = WIDE.max_clients + 1
    stamp = round_of(1, roster=roster)
    payloads = (
        client.encrypt(Update(np.zeros(3), 1 / 2000), stamp.for_sender(i)) for i in range(roster)
    )
    with pytest.raises(PayloadError, match=f"at most {WIDE.max_clients} clients"):
        server.sum(payloads, stamp)


def test_server_refuses_secret_context(session_keys) -> None:
    with pytest.raises(KeyFileError, match="secret key"):
        CkksServer(keys.load_for_client(session_keys))


def test_client_refuses_public_context(session_keys) -> None:
    with pytest.raises(KeyFileError, match="needs the secret context"):
        CkksClient(keys.load_for_server(session_keys))


def test_the_server_side_runs_without_tenseal(session_keys, tmp_path) -> None:
    """The server's key loading and sum work in a process where TenSEAL cannot be imported:
    it parses no ciphertext with TenSEAL, and could not decrypt one if it wanted to."""
    client = CkksClient(keys.load_for_client(session_keys))
    stamp = round_of(1, roster=2)
    ups = [Update(np.full(50, 3.0), 0.5), Update(np.full(50, -1.0), 0.5)]
    for i, payload in enumerate(encrypt_all(client, ups, stamp)):
        (tmp_path / f"p{i}").write_bytes(payload)
    script = f"""
import sys
sys.modules["tenseal"] = None  # any import of TenSEAL now fails
from pathlib import Path
from secagg import keys
from secagg.crypto import SERVER, Stamp
from secagg.crypto.ckks_server import CkksServer
server = CkksServer(keys.load_for_server({str(session_keys)!r}))
stamp = Stamp({JOB!r}, 1, SERVER, 2)
folder = Path({str(tmp_path)!r})
out = server.sum(((folder / f"p{{i}}").read_bytes() for i in range(2)), stamp)
(folder / "sum").write_bytes(out)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": root},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    total = client.decrypt((tmp_path / "sum").read_bytes(), stamp)
    assert np.array_equal(total.values, np.full(50, 2.0))


# --- coefficients on the wire -----------------------------------------------------------------


def test_coefficients_travel_in_60_bits_and_read_back_exactly(ckks_pair) -> None:
    """Two coefficients in 15 bytes: an update of the 3.5M-parameter size sends 7.5 bytes per
    coefficient where raw words took 8, and every word below q (the extremes included) reads
    back as itself."""
    client, server = ckks_pair
    q, n = server._shape.modulus, server._shape.poly_modulus_degree
    rng = np.random.default_rng(5)
    words = rng.integers(0, q, 4 * n, dtype=np.uint64)
    words[:4] = [0, q - 1, q - 1, 0]
    wire = to_wire(words)
    assert wire.size == words.size * 15 // 2
    assert np.array_equal(from_wire(wire.tobytes(), q), words)
    stamp = round_of(2, roster=3).for_sender(1)
    payload = client.encrypt(update_for(client, rng.integers(-50, 50, 100_000)), stamp)
    _, _, count, size, body = body_of(payload)
    assert size == n * 15 // 2 and len(body) == count * size
    assert len(payload) == server.size(100_000, stamp)


@pytest.mark.parametrize("forged", ["q", "top"])
def test_a_coefficient_not_below_q_on_the_wire_is_refused(ckks_pair, forged: str) -> None:
    """60 bits hold numbers from q up to 2**60 - 1 that no honest party sends: the server
    refuses such an update, and a client such an aggregate, as ``bad-ciphertext``."""
    client, server = ckks_pair
    q = server._shape.modulus
    stamp = round_of(3, roster=2)
    payloads = encrypt_all(client, [update_for(client, np.arange(10.0))] * 2, stamp)
    bad = q if forged == "q" else (1 << 60) - 1

    def with_word(payload: bytes) -> bytes:
        _, _, _, _, body = body_of(payload)
        words = from_wire(body, q)
        words[7] = bad
        start = len(payload) - 32 - len(body)
        return with_digest(payload[:start] + to_wire(words).tobytes())

    with pytest.raises(PayloadError) as caught:
        server.check(with_word(payloads[0]), stamp.for_sender(0))
    assert caught.value.reason == "bad-ciphertext"
    aggregate = server.sum(payloads, stamp)
    with pytest.raises(PayloadError) as caught:
        client.decrypt(with_word(aggregate), stamp)
    assert caught.value.reason == "bad-ciphertext"


def test_a_keys_caches_are_shared_by_its_holders_and_end_with_it(tmp_path) -> None:
    """The values a key derives and keeps (``c1 s`` products, the tag's vectors) belong to the
    loaded key: the clients built from it share them, and they are gone once nothing holds
    the key, never kept for the life of the process. (A key of its own: no other test holds
    it.)"""
    import gc
    import weakref

    from secagg.crypto import caches
    from secagg.crypto.params import CkksParams

    keys.generate(tmp_path, CkksParams())
    session_keys = tmp_path
    loaded = keys.load_for_client(session_keys)
    first, second = CkksClient(loaded), CkksClient(loaded)
    shared = first._secret.caches
    assert shared is second._secret.caches is first._mac.caches is caches.of(loaded)
    stamp = round_of(9, roster=2)
    values = np.arange(100, dtype=np.float64)
    payloads = [first.encrypt(Update(values, 0.5), stamp.for_sender(p)) for p in (0, 1)]
    server = CkksServer(keys.load_for_server(session_keys))
    summed = server.sum(payloads, stamp)
    assert np.array_equal(second.decrypt(summed, stamp).values, 2 * values)
    assert shared.vectors  # the round's tag vector, kept for the key's other holders
    owned = weakref.ref(shared)
    del first, second, shared, loaded
    gc.collect()
    assert owned() is None
