"""Ciphers: HE results checked against the plaintext oracle, and bad payloads refused."""

from __future__ import annotations

import numpy as np
import pytest

from secagg import keys
from secagg.config import CkksParams
from secagg.crypto.ckks import CkksClient, CkksServer
from secagg.crypto.plain import PlainCipher
from secagg.errors import KeyFileError, PayloadError


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 20_000])
def test_decrypt_of_encrypt_round_trips(cipher_pair, size: int) -> None:
    client, _, tolerance = cipher_pair
    x = np.random.default_rng(size).normal(0, 1, size)
    y = client.decrypt(client.encrypt(x, round_num=3), round_num=3)
    assert y.shape == x.shape
    assert np.max(np.abs(y - x)) < tolerance


def test_he_aggregate_equals_plaintext_aggregate(ckks_pair) -> None:
    """Eight clients' random updates: the HE sum matches the plaintext sum within CKKS error."""
    he_client, he_server = ckks_pair
    plain = PlainCipher()
    rng = np.random.default_rng(7)
    updates = [rng.normal(0, 1, 10_000) * rng.integers(50, 500) for _ in range(8)]
    he_sum = he_client.decrypt(he_server.sum(he_client.encrypt(u, 1) for u in updates), 1)
    plain_sum = plain.decrypt(plain.sum(plain.encrypt(u, 1) for u in updates), 1)
    exact = np.sum(updates, axis=0)
    assert np.max(np.abs(plain_sum - exact)) < 1e-3 * np.max(np.abs(exact))
    # Values here reach ~4000; float32 on the plaintext path and CKKS noise both stay < 2e-3.
    assert np.max(np.abs(he_sum - plain_sum)) < 2e-3


def test_server_sums_a_stream_without_holding_it(ckks_pair) -> None:
    """The server accepts a one-shot generator: it adds payloads as they arrive."""
    client, server = ckks_pair
    produced = []

    def arrivals():
        for value in (1.0, 2.0, 3.0):
            produced.append(value)
            yield client.encrypt(np.full(10, value), 0)

    total = client.decrypt(server.sum(arrivals()), 0)
    assert produced == [1.0, 2.0, 3.0]
    assert np.allclose(total, 6.0, atol=1e-4)


def test_payload_from_other_keys_is_refused(ckks_pair, tmp_path) -> None:
    client, server = ckks_pair
    keys.generate(tmp_path, CkksParams())
    other = keys.load_for_client(tmp_path)
    stranger = CkksClient(other.context, other.fingerprint, other.params)
    payload = stranger.encrypt(np.ones(10), 0)
    with pytest.raises(PayloadError, match="other keys"):
        server.sum([client.encrypt(np.ones(10), 0), payload])
    with pytest.raises(PayloadError, match="other keys"):
        client.decrypt(payload)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage", "pad"])
def test_corrupt_payload_is_refused(cipher_pair, damage: str) -> None:
    client, server, _ = cipher_pair
    good = client.encrypt(np.arange(5000, dtype=float), 1)
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
    with pytest.raises(PayloadError, match="round 4, expected round 5"):
        client.decrypt(client.encrypt(np.ones(3), 4), round_num=5)
    with pytest.raises(PayloadError, match="round"):
        server.sum([client.encrypt(np.ones(3), 5), client.encrypt(np.ones(3), 4)])


def test_plaintext_payload_is_not_read_as_ciphertext(ckks_pair) -> None:
    _, server = ckks_pair
    with pytest.raises(PayloadError):
        server.sum([PlainCipher().encrypt(np.ones(10), 0)])


def test_mismatched_lengths_are_refused(cipher_pair) -> None:
    client, server, _ = cipher_pair
    with pytest.raises(PayloadError, match="values"):
        server.sum([client.encrypt(np.ones(10), 0), client.encrypt(np.ones(11), 0)])


def test_update_outside_ckks_range_is_refused(ckks_pair) -> None:
    client, _ = ckks_pair
    with pytest.raises(PayloadError, match="exceeds the CKKS range"):
        client.encrypt(np.array([1e12]), 0)
    with pytest.raises(PayloadError, match="NaN"):
        client.encrypt(np.array([np.nan]), 0)


def test_server_refuses_secret_context(session_keys) -> None:
    secret = keys.load_for_client(session_keys)
    with pytest.raises(KeyFileError, match="secret key"):
        CkksServer(secret.context, secret.fingerprint, secret.params)


def test_client_refuses_public_context(session_keys) -> None:
    public = keys.load_for_server(session_keys)
    with pytest.raises(KeyFileError, match="needs the secret context"):
        CkksClient(public.context, public.fingerprint, public.params)
