"""Ciphers: HE results checked against the plaintext oracle, and bad payloads refused."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import update_for

from secagg import keys
from secagg.config import CkksParams
from secagg.crypto import Update
from secagg.crypto.ckks import PACKED, CkksClient, CkksServer
from secagg.crypto.plain import PlainCipher
from secagg.errors import KeyFileError, PayloadError


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 12_289, 20_000])
def test_decrypt_of_encrypt_round_trips(cipher_pair, size: int) -> None:
    client, _, tolerance = cipher_pair
    rng = np.random.default_rng(size)
    scale = 1.0 if client.value_bound is None else client.value_bound / 3
    update = update_for(client, rng.normal(0, scale, size), weight=0.25)
    update.clipped = 7
    back = client.decrypt(client.encrypt(update, round_num=3), round_num=3)
    assert back.values.shape == (size,)
    assert np.max(np.abs(back.values - update.values)) <= tolerance
    assert back.weight == pytest.approx(0.25, abs=1e-6)
    assert back.clipped == 7


def test_float_he_aggregate_equals_plaintext_aggregate(ckks_ciphers) -> None:
    """Eight clients' weighted updates: the HE sum matches the plaintext sum within CKKS error."""
    he_client, he_server = ckks_ciphers["float"]
    plain = PlainCipher()
    rng = np.random.default_rng(7)
    updates = [Update(rng.normal(0, 0.05, 10_000) / 8, 1 / 8) for _ in range(8)]
    he_sum = he_client.decrypt(he_server.sum(he_client.encrypt(u, 1) for u in updates), 1)
    plain_sum = plain.decrypt(plain.sum(plain.encrypt(u, 1) for u in updates), 1)
    exact = np.sum([u.values for u in updates], axis=0)
    assert np.max(np.abs(plain_sum.values - exact)) < 1e-6
    assert np.max(np.abs(he_sum.values - plain_sum.values)) < CKKS_FLOAT_SUM_ERROR
    assert he_sum.weight == pytest.approx(1.0, abs=1e-6)


# Eight fresh symmetric ciphertexts at scale 2**30: noise about sqrt(8) * 2**8 / 2**30.
CKKS_FLOAT_SUM_ERROR = 1e-5


def test_packed_aggregate_is_the_exact_integer_sum(ckks_ciphers) -> None:
    client, server = ckks_ciphers["packed"]
    bound = client.value_bound
    rng = np.random.default_rng(11)
    weights = rng.dirichlet(np.ones(8))
    updates = [
        Update(np.rint(rng.uniform(-w * bound, w * bound, 30_000)), float(w), clipped=i)
        for i, w in enumerate(weights)
    ]
    total = client.decrypt(server.sum(client.encrypt(u, 2) for u in updates), 2)
    assert np.array_equal(total.values, np.sum([u.values for u in updates], axis=0))
    assert total.weight == pytest.approx(1.0, abs=1e-8)
    assert total.clipped == sum(range(8))


def test_server_sums_a_stream_without_holding_it(cipher_pair) -> None:
    """The server accepts a one-shot generator: it adds payloads as they arrive."""
    client, server, _ = cipher_pair
    produced = []

    def arrivals():
        for value in (1.0, 2.0, 3.0):
            produced.append(value)
            yield client.encrypt(Update(np.full(10, value), 0.25), 0)

    total = client.decrypt(server.sum(arrivals()), 0)
    assert produced == [1.0, 2.0, 3.0]
    assert np.allclose(total.values, 6.0, atol=1e-4)
    assert total.weight == pytest.approx(0.75, abs=1e-6)


@pytest.mark.parametrize("codec", ["float", "packed"])
def test_payload_from_other_keys_is_refused(ckks_ciphers, tmp_path, codec: str) -> None:
    client, server = ckks_ciphers[codec]
    keys.generate(tmp_path, CkksParams())
    stranger = CkksClient(keys.load_for_client(tmp_path), codec)
    payload = stranger.encrypt(Update(np.ones(10), 0.5), 0)
    with pytest.raises(PayloadError, match="other keys"):
        server.sum([client.encrypt(Update(np.ones(10), 0.5), 0), payload])
    with pytest.raises(PayloadError, match="other keys"):
        client.decrypt(payload)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage", "pad"])
def test_corrupt_payload_is_refused(cipher_pair, damage: str) -> None:
    client, server, _ = cipher_pair
    good = client.encrypt(update_for(client, np.arange(5000, dtype=float) % 100), 1)
    bad = {
        "truncate": good[: len(good) // 2],
        "flip": good[:200] + bytes([good[200] ^ 0x10]) + good[201:],
        "empty": b"",
        "garbage": b"\x00" * 500,
        "pad": good + b"\x00",
    }[damage]
    with pytest.raises(PayloadError):
        client.decrypt(bad)
    with pytest.raises(PayloadError):
        server.sum([good, bad])


def test_payload_of_another_round_is_refused(cipher_pair) -> None:
    client, server, _ = cipher_pair
    ones = update_for(client, np.ones(3), 0.5)
    with pytest.raises(PayloadError, match="round 4, expected round 5"):
        client.decrypt(client.encrypt(ones, 4), round_num=5)
    with pytest.raises(PayloadError, match="round"):
        server.sum([client.encrypt(ones, 5), client.encrypt(ones, 4)])


def test_payload_of_another_codec_is_refused(ckks_ciphers) -> None:
    float_client, float_server = ckks_ciphers["float"]
    packed_client, packed_server = ckks_ciphers["packed"]
    with pytest.raises(PayloadError, match="codec"):
        packed_server.sum([float_client.encrypt(Update(np.ones(10), 0.5), 0)])
    with pytest.raises(PayloadError, match="codec"):
        float_client.decrypt(packed_client.encrypt(Update(np.ones(10), 0.5), 0))
    with pytest.raises(PayloadError):
        float_server.sum([PlainCipher().encrypt(Update(np.ones(10), 0.5), 0)])


def test_mismatched_lengths_are_refused(cipher_pair) -> None:
    client, server, _ = cipher_pair
    with pytest.raises(PayloadError, match="values"):
        server.sum(
            [
                client.encrypt(update_for(client, np.ones(10), 0.5), 0),
                client.encrypt(update_for(client, np.ones(11), 0.5), 0),
            ]
        )


def test_update_outside_float_range_is_refused(ckks_ciphers) -> None:
    client, _ = ckks_ciphers["float"]
    with pytest.raises(PayloadError, match="exceeds the CKKS range"):
        client.encrypt(Update(np.array([1e12]), 1.0), 0)
    with pytest.raises(PayloadError, match="NaN"):
        client.encrypt(Update(np.array([np.nan]), 1.0), 0)


def test_packed_codec_refuses_what_it_cannot_carry_exactly(ckks_ciphers) -> None:
    client, _ = ckks_ciphers["packed"]
    with pytest.raises(PayloadError, match="integers"):
        client.encrypt(Update(np.array([0.5]), 1.0), 0)
    with pytest.raises(PayloadError, match="packable range"):
        client.encrypt(Update(np.array([float(PACKED.digit_limit)]), 1.0), 0)
    with pytest.raises(PayloadError, match="NaN"):
        client.encrypt(Update(np.array([np.nan]), 1.0), 0)


def test_server_refuses_more_clients_than_the_packed_headroom(ckks_ciphers) -> None:
    client, server = ckks_ciphers["packed"]
    one = client.encrypt(Update(np.zeros(3), 1 / 1000), 0)
    with pytest.raises(PayloadError, match=f"at most {PACKED.max_clients} clients"):
        server.sum(one for _ in range(PACKED.max_clients + 1))


@pytest.mark.parametrize("codec", ["float", "packed"])
def test_server_refuses_secret_context(session_keys, codec: str) -> None:
    with pytest.raises(KeyFileError, match="secret key"):
        CkksServer(keys.load_for_client(session_keys), codec)


@pytest.mark.parametrize("codec", ["float", "packed"])
def test_client_refuses_public_context(session_keys, codec: str) -> None:
    with pytest.raises(KeyFileError, match="needs the secret context"):
        CkksClient(keys.load_for_server(session_keys), codec)
