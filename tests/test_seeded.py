"""Seeded ciphertexts: c1 travels as a seed, and what the clients build SEAL decrypts exactly.

``secagg.crypto.seeded`` swaps the uniformly random half of every SEAL ciphertext for one
expanded from a seed. These tests check it against SEAL itself (its raw ``Decryptor``, through
TenSEAL's SEAL bindings), against Python's integers, and against a dishonest server that
forges, swaps, drops or adds seeds.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
from conftest import encrypt_all, round_of
from hostile import forge_aggregate, seeds_of, with_seeds

from secagg import keys
from secagg.crypto import Update, seeded
from secagg.crypto.ckks import load_context
from secagg.crypto.packing import PACKED
from secagg.crypto.seal_format import from_tenseal, shape_of_context, to_tenseal
from secagg.errors import PayloadError

SCALE = 2.0**PACKED.scale_bits


@pytest.fixture(scope="module")
def sealed(session_keys):  # type: ignore[no-untyped-def]
    """(TenSEAL context, ciphertext shape, secret key) of the session's client keys."""
    context = keys.load_for_client(session_keys).context
    shape = shape_of_context(context)
    return load_context(context), shape, seeded.SecretKey(context, shape)


def _plaintext_words(context: ts.Context, words: np.ndarray, shape) -> np.ndarray:  # type: ignore[no-untyped-def]
    """SEAL's raw decryption of a (2, N) ciphertext: c0 + c1 s, the plaintext in NTT form."""
    vector = ts.ckks_vector_from(
        context, to_tenseal(words, shape.poly_modulus_degree // 2, SCALE, shape)
    )
    plain = sealapi.Plaintext()
    context.decryptor().data.decrypt(vector.ciphertext()[0], plain)
    assert plain.is_ntt_form()
    return np.array([plain.data(i) for i in range(plain.coeff_count())], dtype=np.uint64)


def test_seal_decrypts_a_reseeded_ciphertext_to_the_same_plaintext(sealed) -> None:
    """(c0', a') from SEAL, re-randomised to (c0, a): SEAL's Decryptor gives c0 for
    (c0', a' - a), the same plaintext polynomial for (c0, a) as for (c0', a'), and the slots
    decrypt to the packed integers exactly."""
    context, shape, secret = sealed
    q = shape.modulus
    values = np.random.default_rng(1).integers(-(2**40), 2**40, shape.poly_modulus_degree // 2)
    fresh = from_tenseal(ts.ckks_vector(context, values.astype(float), SCALE).serialize(), shape)[0]
    seed = seeded.fresh_seed()
    c0 = secret.reseed(fresh, seed, 5)
    a = seeded.expand(seed, 5, shape.poly_modulus_degree, q)
    difference = (fresh[1] + (np.uint64(q) - a)) % np.uint64(q)
    assert np.array_equal(_plaintext_words(context, np.stack([fresh[0], difference]), shape), c0)
    plain = _plaintext_words(context, np.stack([c0, a]), shape)
    assert np.array_equal(plain, _plaintext_words(context, fresh, shape))
    vector = ts.ckks_vector_from(context, to_tenseal(np.stack([c0, a]), values.size, SCALE, shape))
    assert np.array_equal(np.rint(vector.decrypt()), values)
    assert not np.array_equal(a, fresh[1])  # c1 really was replaced


def test_multiplication_mod_q_matches_python_integers(sealed) -> None:
    _, shape, secret = sealed
    q, n = shape.modulus, shape.poly_modulus_degree
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    x[:4] = [0, 1, q - 1, 2**64 - 1]  # the edges
    words = secret._words.tolist()
    expected = [(int(a) * b) % q for a, b in zip(x.tolist(), words, strict=True)]
    assert secret.multiply(x).tolist() == expected


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
    bodies = [p[-32 - 3 * 8 * n : -32] for p in payloads]
    assert len(set(bodies)) == 3


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
