"""Seeded ciphertexts: c1 travels as a seed, and what the clients build SEAL decrypts exactly.

The clients build SEAL ciphertexts in numpy (``secagg.crypto.rlwe``, integers in the plaintext's
coefficients), their uniformly random half expanded from a seed (``secagg.crypto.seeded``).
These tests check them against SEAL itself (its raw ``Decryptor``, through
TenSEAL's SEAL bindings), against Python's integers, and against a dishonest server that
forges, swaps, drops or adds seeds.
"""

from __future__ import annotations

import os

import numpy as np
import oracles
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
from conftest import encrypt_all, round_of
from hostile import body_of, forge_aggregate, seeds_of, with_seeds

from secagg import keys
from secagg.crypto import Stamp, Update, rlwe, seeded
from secagg.crypto.ckks import CkksClient, load_context
from secagg.crypto.ckks_server import CkksServer
from secagg.crypto.envelope import SERVER
from secagg.crypto.ntt import shoup, transform
from secagg.crypto.packing import PACKED
from secagg.crypto.params import CkksParams
from secagg.crypto.seal_format import add_mod, from_wire, shape_of_context, to_tenseal
from secagg.errors import PayloadError

SCALE = 2.0**PACKED.scale_bits


@pytest.fixture(scope="module")
def sealed(session_keys):  # type: ignore[no-untyped-def]
    """(TenSEAL context, ciphertext shape, secret key) of the session's client keys."""
    context = keys.load_for_client(session_keys).context
    shape = shape_of_context(context)
    return load_context(context), shape, rlwe.SecretKey(context, shape)


def _seal_plaintext(context: ts.Context, words: np.ndarray, shape) -> np.ndarray:  # type: ignore[no-untyped-def]
    """SEAL's raw decryption of a (2, N) ciphertext in NTT form: c0 + c1 s, in NTT form."""
    vector = ts.ckks_vector_from(
        context, to_tenseal(words, shape.poly_modulus_degree // 2, SCALE, shape)
    )
    plain = sealapi.Plaintext()
    context.decryptor().data.decrypt(vector.ciphertext()[0], plain)
    assert plain.is_ntt_form()
    return np.array([plain.data(i) for i in range(plain.coeff_count())], dtype=np.uint64)


def test_seal_decrypts_what_the_clients_build(sealed) -> None:
    """A ciphertext of N integers built in numpy (``rlwe``), its c0 put in NTT form: SEAL's own
    Decryptor computes the very plaintext the clients decrypt, word for word, and SEAL's CKKS
    decoder reads it as the canonical embedding of those integers (SEAL's slot order)."""
    context, shape, secret = sealed
    n, q = shape.poly_modulus_degree, shape.modulus
    values = np.random.default_rng(1).integers(-(2**40), 2**40, n)
    seed = seeded.fresh_seed()
    c0 = secret.encrypt_zero(seed, 6)
    message = oracles.encode(values, 1, n, PACKED.scale_bits, q)
    add_mod(c0[5], message[0], q)
    phase = secret.decrypt(c0[5:], (seed,), start=5)
    assert np.array_equal(oracles.decode(phase, PACKED.scale_bits, 1, n), values)
    a = seeded.expand(seed, 5, n, q)
    in_ntt = transform(n, q).forward(c0[5:].copy())[0]
    ours = transform(n, q).forward((phase % q).astype(np.uint64))[0]
    assert np.array_equal(_seal_plaintext(context, np.stack([in_ntt, a]), shape), ours)
    vector = ts.ckks_vector_from(context, to_tenseal(np.stack([in_ntt, a]), n // 2, SCALE, shape))
    slots = np.asarray(vector.decrypt()[:32])
    roots = np.array([pow(3, i, 2 * n) for i in range(32)])  # SEAL's slot i: X = zeta^(3^i)
    powers = np.exp(1j * np.pi * np.outer(roots, np.arange(n)) / n)
    assert np.allclose(slots, (powers @ values).real, rtol=0, atol=1e-3 * 2**40)


def test_seal_decrypts_a_payload_read_off_the_wire(sealed, ckks_pair) -> None:
    """A real update, as its bytes travel (60-bit words, a seed): each ciphertext's ``c0``
    read from the wire with ``c1`` expanded from the payload's seed is a ciphertext SEAL's own
    Decryptor opens to the plaintext the clients compute."""
    context, shape, secret = sealed
    client, _ = ckks_pair
    n, q = shape.poly_modulus_degree, shape.modulus
    stamp = round_of(4, roster=2).for_sender(1)
    values = np.random.default_rng(2).integers(-1000, 1000, 3 * n).astype(np.float64)
    payload = client.encrypt(Update(values, 1.0), stamp)
    _, _, count, _, body = body_of(payload)
    c0 = from_wire(body, q).reshape(count, n)
    (seed,) = seeds_of(payload)
    for i in (0, count - 1):
        mine = secret.decrypt(c0[i : i + 1], (seed,), start=i)
        a = seeded.expand(seed, i, n, q)
        in_ntt = transform(n, q).forward(c0[i : i + 1].copy())[0]
        ours = transform(n, q).forward((mine % q).astype(np.uint64))[0]
        assert np.array_equal(_seal_plaintext(context, np.stack([in_ntt, a]), shape), ours)
    first = secret.decrypt(c0[:1], (seed,), start=0)
    digits = oracles.decode(first, PACKED.scale_bits, 1, n)
    assert np.any(digits)  # the update's packed digits, not an encryption of zero


def test_tenseal_decrypts_a_real_aggregate_with_client_ctx_alone(session_keys, ckks_pair) -> None:
    """A round's aggregate as the server sends it (three clients' updates, summed by the
    server, which holds no secret key), opened with TenSEAL's own API and nothing of secagg's
    key handling: the context read from ``client.ctx`` with ``ts.context_from``, SEAL's
    Decryptor (``tenseal.sealapi``) on ``(NTT(sum of c0), sum of the seeds' c1)``. SEAL's
    plaintext is the one secagg decrypts, word for word, and it decodes to the packed digits
    whose unpacking is the exact sum of the updates. A user can check secagg's sums with the
    library the project names."""
    client, server = ckks_pair
    raw = (session_keys / "client.ctx").read_bytes()
    context = ts.context_from(raw)
    shape = shape_of_context(raw)
    n, q = shape.poly_modulus_degree, shape.modulus
    stamp = round_of(5, roster=3)
    rng = np.random.default_rng(4)
    updates = [Update(rng.integers(-500, 500, 2 * n).astype(np.float64), 1 / 3) for _ in range(3)]
    aggregate = server.sum(encrypt_all(client, updates, stamp), stamp)
    _, _, count, _, body = body_of(aggregate)
    c0 = from_wire(body, q).reshape(count, n)
    seeds = seeds_of(aggregate)
    assert len(seeds) == 3  # one per contributor: c1 is the sum of their expansions
    secret = rlwe.SecretKey(raw, shape)  # secagg's own reading of the same key, to compare
    for i in range(count):
        c1 = seeded.expand(seeds[0], i, n, q)
        for seed in seeds[1:]:
            add_mod(c1, seeded.expand(seed, i, n, q), q)
        in_ntt = transform(n, q).forward(c0[i : i + 1].copy())[0]
        theirs = _seal_plaintext(context, np.stack([in_ntt, c1]), shape)
        ours = secret.decrypt(c0[i : i + 1], seeds, start=i)
        assert np.array_equal(theirs, transform(n, q).forward((ours % q).astype(np.uint64))[0])
    total = client.decrypt(aggregate, stamp)
    assert np.array_equal(total.values, sum(u.values for u in updates))


def test_the_transform_is_seals_and_multiplies_polynomials(sealed) -> None:
    """SEAL's secret key (in NTT form) transforms back to ternary coefficients; the transform
    inverts; and in NTT form a coefficient-wise product is the negacyclic product mod q."""
    _, shape, secret = sealed
    q, n = shape.modulus, shape.poly_modulus_degree
    key = transform(n, q).inverse(secret._s.copy()[None, :])[0]
    assert set(np.unique(key).tolist()) == {0, 1, q - 1}
    rng = np.random.default_rng(3)
    x = rng.integers(0, q, (3, n), dtype=np.uint64)
    assert np.array_equal(transform(n, q).inverse(transform(n, q).forward(x.copy())), x)
    small_q, small_n = 7681, 16  # 7681 = 1 + 15 * 512: NTT-friendly for N up to 256
    a, b = rng.integers(0, small_q, (2, small_n))
    expected = [0] * small_n
    for i in range(small_n):
        for j in range(small_n):
            sign = 1 if i + j < small_n else -1  # X^N = -1
            expected[(i + j) % small_n] = (
                expected[(i + j) % small_n] + sign * a[i] * b[j]
            ) % small_q
    ring = transform(small_n, small_q)
    fa = ring.forward(a.astype(np.uint64)[None, :].copy())
    fb = ring.forward(b.astype(np.uint64)[None, :].copy())[0]
    product = ring.inverse(ring.multiply(fa, fb, shoup(fb, small_q)))[0]
    assert product.tolist() == expected


def test_multiplication_mod_q_matches_python_integers(sealed) -> None:
    _, shape, secret = sealed
    q, n = shape.modulus, shape.poly_modulus_degree
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    x[:4] = [0, 1, q - 1, 2**64 - 1]  # the edges
    words = secret._s.tolist()
    expected = [(int(a) * b) % q for a, b in zip(x.tolist(), words, strict=True)]
    got = transform(n, q).multiply(x[None, :].copy(), secret._s, secret._s_shoup)[0]
    assert got.tolist() == expected


@pytest.mark.parametrize("modulus", [(1 << 60) - (1 << 18) + 1, (1 << 40) + 15, 97])
def test_expansion_is_uniform_below_q_and_reproducible(modulus: int) -> None:
    """Every word below q, the same for the same seed and index, and uniform: the mean and the
    share of each quarter of [0, q) are where a uniform draw puts them. With q just above a
    power of two about half of the words are rejected and drawn again."""
    n = 8192
    seed = bytes(range(32))
    words = seeded.expand(seed, 0, n, modulus)
    assert words.shape == (n,) and words.dtype == np.uint64
    assert int(words.max()) < modulus
    assert np.array_equal(words, seeded.expand(seed, 0, n, modulus))
    assert not np.array_equal(words, seeded.expand(seed, 1, n, modulus))
    draws = np.concatenate([seeded.expand(os.urandom(32), i, n, modulus) for i in range(8)])
    share = draws.astype(np.float64) / (modulus - 1)  # uniform on [0, 1], mean 1/2
    assert abs(share.mean() - 0.5) < 5 * np.sqrt(1 / 12 / share.size)
    if modulus > 1000:
        quarters = np.bincount(np.minimum((share * 4).astype(int), 3), minlength=4) / share.size
        assert np.all(np.abs(quarters - 0.25) < 0.01)


def test_ciphertexts_never_share_c1(ckks_pair) -> None:
    """Two clients, or one client twice, with the same values: fresh seeds, other c1 and c0;
    and the ciphertexts of one payload expand to different polynomials."""
    client, _ = ckks_pair
    stamp = round_of(1, roster=2)
    update = Update(np.zeros(30_000), 0.5)
    payloads = [
        client.encrypt(update, stamp.for_sender(0)),
        client.encrypt(update, stamp.for_sender(1)),
        client.encrypt(update, stamp.for_sender(1)),
    ]
    seeds = [seeds_of(p)[0] for p in payloads]
    assert len(set(seeds)) == 3
    q, n = client._shape.modulus, client._shape.poly_modulus_degree
    c1 = [seeded.expand(seed, i, n, q).tobytes() for seed in seeds for i in range(3)]
    assert len(set(c1)) == len(c1)
    bodies = [p[-32 - 2 * 8 * n : -32] for p in payloads]
    assert len(set(bodies)) == 3


def test_prepared_encryptions_are_used_once_and_decrypt_exactly(ckks_pair) -> None:
    """Encryptions of zero prepared in the background (``precompute``, as a client does before
    training) serve one payload each: the same phase encrypted twice (a retried upload) gets
    two seeds and two c0's, and both decrypt to the update."""
    client, server = ckks_pair
    stamp = round_of(3, roster=1)
    values = np.rint(np.random.default_rng(8).uniform(-500, 500, 30_000))
    client.precompute(stamp, values.size)
    client.precompute(stamp, values.size)
    first, second = (client.encrypt(Update(values, 1.0), stamp.for_sender(0)) for _ in range(2))
    third = client.encrypt(Update(values, 1.0), stamp.for_sender(0))  # none prepared: made now
    seeds = {seeds_of(p)[0] for p in (first, second, third)}
    assert len(seeds) == 3
    n = client._shape.poly_modulus_degree
    assert len({p[-32 - 2 * 8 * n : -32] for p in (first, second, third)}) == 3
    for payload in (first, second, third):
        total = client.decrypt(server.sum([payload], stamp), stamp)
        assert np.array_equal(total.values, values)


def test_a_rounds_two_phases_share_one_seed_and_its_peers_expand_the_update_early(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client prepares a round's scale exchange and update under one seed, on disjoint
    ranges of its key stream, so whoever reads the summed scales can make the update sum's
    c1 s before that sum arrives: decrypting it then expands no seed. A retried round draws
    a new seed; a sum whose seeds differ (a client dropped between the phases) is decrypted
    from its own seeds."""
    from secagg.crypto import ckks

    keys.generate(tmp_path, CkksParams())
    client = CkksClient(keys.load_for_client(tmp_path))  # the only holder of its key
    server = CkksServer(keys.load_for_server(tmp_path))
    stamp = round_of(6, roster=1).for_sender(0)
    counts, values = np.arange(40.0), np.rint(np.random.default_rng(2).uniform(-99, 99, 30_000))

    def one_round(stamp: Stamp) -> tuple[bytes, bytes]:
        client.precompute(stamp.scales(), counts.size)
        client.precompute(stamp, values.size)
        scales = client.encrypt(Update(counts, 1.0), stamp.scales())
        client.decrypt(server.sum([scales], stamp.scales().for_sender(SERVER)), stamp.scales())
        return scales, client.encrypt(Update(values, 1.0), stamp)

    scales, update = one_round(stamp)
    assert seeds_of(scales) == seeds_of(update)
    first = ckks.first_index(stamp.scales())
    assert first >= 2**62 and ckks.first_index(stamp) == 0  # no ciphertext index in common
    ckks.BACKGROUND.submit(lambda: None).result()  # the prefetch is done
    made: list[int] = []
    product = rlwe.SecretKey._product
    monkeypatch.setattr(
        rlwe.SecretKey, "_product", lambda self, *a: made.append(1) or product(self, *a)
    )
    summed = server.sum([update], stamp.for_sender(SERVER))
    assert np.array_equal(client.decrypt(summed, stamp).values, values)
    assert made == []  # c1 s was ready
    retried_scales, retried = one_round(stamp)  # the same round again
    assert seeds_of(retried) == seeds_of(retried_scales) != seeds_of(update)
    other = client.encrypt(Update(values, 1.0), stamp)  # not prepared: a seed of its own
    assert seeds_of(other) not in (seeds_of(retried), seeds_of(update))
    made.clear()
    total = client.decrypt(server.sum([other], stamp.for_sender(SERVER)), stamp)
    assert np.array_equal(total.values, values) and made == [1]


@pytest.fixture(scope="module")
def three(ckks_pair):  # type: ignore[no-untyped-def]
    client, server = ckks_pair
    stamp = round_of(2, roster=3)
    rng = np.random.default_rng(4)
    updates = [Update(np.rint(rng.uniform(-300, 300, 5000)), w) for w in (0.5, 0.3, 0.2)]
    payloads = encrypt_all(client, updates, stamp)
    return stamp, updates, payloads, server.sum(payloads, stamp)


def test_the_honest_aggregate_lists_each_contributors_seed(ckks_pair, three) -> None:
    client, _ = ckks_pair
    stamp, updates, payloads, aggregate = three
    assert seeds_of(aggregate) == tuple(seeds_of(p)[0] for p in payloads)
    total = client.decrypt(aggregate, stamp)
    assert np.array_equal(total.values, np.sum([u.values for u in updates], axis=0))


@pytest.mark.parametrize("change", ["forged", "duplicated", "another-round"])
def test_a_wrong_seed_in_the_aggregate_decrypts_to_noise_and_is_refused(
    ckks_pair, three, change
) -> None:
    """A seed the contributor did not use adds (a_wrong - a) s to what the clients decrypt:
    noise to anyone without s, refused before the ledger is read."""
    client, _ = ckks_pair
    stamp, updates, _, aggregate = three
    seeds = list(seeds_of(aggregate))
    if change == "forged":
        seeds[1] = os.urandom(seeded.SEED_BYTES)
    elif change == "duplicated":
        seeds[2] = seeds[0]
    else:  # client 1's seed of another round, whose c0 is not in this sum
        other = client.encrypt(updates[1], round_of(1, roster=3).for_sender(1))
        seeds[1] = seeds_of(other)[0]
    with pytest.raises(PayloadError) as caught:
        client.decrypt(with_seeds(aggregate, tuple(seeds)), stamp)
    assert caught.value.reason == "not-integer"


def test_a_dropped_or_added_seed_is_refused(ckks_pair, three) -> None:
    """The server adds all three updates but lists two seeds, or adds two and lists three."""
    client, server = ckks_pair
    stamp, _, payloads, _ = three
    for added, listed in ((payloads, payloads[:2]), (payloads[:2], payloads)):
        forged = forge_aggregate(server, added, stamp, (0, 1, 2))
        forged = with_seeds(forged, tuple(seeds_of(p)[0] for p in listed))
        with pytest.raises(PayloadError) as caught:
            client.decrypt(forged, stamp)
        assert caught.value.reason == "not-integer"


def test_reordered_seeds_are_the_same_aggregate(ckks_pair, three) -> None:
    """Seeds are read as a set: their sum is c1, so listing them in another order changes
    nothing a client decrypts (the ledger, not the seed list, says who was summed)."""
    client, _ = ckks_pair
    stamp, updates, _, aggregate = three
    seeds = seeds_of(aggregate)
    total = client.decrypt(with_seeds(aggregate, seeds[::-1]), stamp)
    assert np.array_equal(total.values, np.sum([u.values for u in updates], axis=0))


def test_an_update_carrying_another_clients_seed_is_refused(ckks_pair, three) -> None:
    """Client 2's ciphertexts sent with client 0's seed: the server cannot tell, the clients
    decrypt noise."""
    client, server = ckks_pair
    stamp, _, payloads, _ = three
    swapped = with_seeds(payloads[2], seeds_of(payloads[0]))
    aggregate = server.sum([*payloads[:2], swapped], stamp)
    with pytest.raises(PayloadError) as caught:
        client.decrypt(aggregate, stamp)
    assert caught.value.reason == "not-integer"


def _ctr_spec(seed: bytes, index: int, n: int, modulus: int) -> np.ndarray:
    """The expansion as ``seeded``'s docstring states it: one AES-256-CTR stream from
    ``index || 0``, 64-bit little-endian words masked to q's bit length, kept below q; drawn
    ``n + 64`` words at a time, then what rejection left plus 64."""
    import struct

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    stream = Cipher(algorithms.AES(seed), modes.CTR(struct.pack(">QQ", index, 0))).encryptor()
    mask = (1 << modulus.bit_length()) - 1
    kept: list[int] = []
    more = n + 64
    while len(kept) < n:
        words = np.frombuffer(stream.update(bytes(8 * more)), dtype="<u8")
        kept += [int(w) & mask for w in words if int(w) & mask < modulus]
        more = n - len(kept) + 64
    return np.array(kept[:n], dtype=np.uint64)


@pytest.mark.parametrize(
    ("n", "modulus"), [(8192, (1 << 60) - (1 << 14) + 1), (64, 97), (64, 65), (7, 3)]
)
def test_expansion_in_batches_is_one_ctr_stream_per_ciphertext(n: int, modulus: int) -> None:
    """Many ciphertexts' words come from one AES call over explicit counter blocks; each row
    is still exactly its own CTR stream, at indexes near the scale exchange's 2**63 too, and
    with a modulus that rejects most words (rows that continue their stream)."""
    seed = os.urandom(32)
    out = np.empty((5, n), dtype=np.uint64)
    seeded.expand_rows(out, seed, 2**63 - 2, modulus)
    for row in range(5):
        assert np.array_equal(out[row], _ctr_spec(seed, 2**63 - 2 + row, n, modulus))
    assert np.array_equal(seeded.expand(seed, 3, n, modulus), _ctr_spec(seed, 3, n, modulus))
    # A sum's c1: every seed's rows, 17 seeds (more than one lazily reduced group of 15)
    seeds = (seed, *(os.urandom(32) for _ in range(16)))
    total = seeded.expand_sum(seeds, 2**63 - 2, 5, n, modulus)
    for row in range(5):
        index = 2**63 - 2 + row
        summed = sum(_ctr_spec(s, index, n, modulus).astype(object) for s in seeds) % modulus
        assert np.array_equal(total[row], summed.astype(np.uint64))
