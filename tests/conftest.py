"""Shared fixtures: one CKKS key set per test session (keygen takes ~0.5 s)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from secagg import keys
from secagg.config import CkksParams
from secagg.crypto import ClientCipher, Update
from secagg.crypto.ckks import CkksClient, CkksServer


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    keys.generate(out, CkksParams())
    return out


@pytest.fixture
def keys_dir(session_keys: Path, tmp_path: Path) -> Path:
    """A private copy of the session keys that a test may damage."""
    out = tmp_path / "keys"
    shutil.copytree(session_keys, out)
    return out


@pytest.fixture(scope="session")
def ckks_ciphers(session_keys: Path) -> dict[str, tuple[CkksClient, CkksServer]]:
    """(client, server) CKKS ciphers per codec, built from the keys each role may load."""
    client_keys = keys.load_for_client(session_keys)
    server_keys = keys.load_for_server(session_keys)
    return {
        codec: (CkksClient(client_keys, codec), CkksServer(server_keys, codec))
        for codec in ("float", "packed")
    }


@pytest.fixture(params=["plain", "float", "packed"])
def cipher_pair(request: pytest.FixtureRequest, ckks_ciphers):  # type: ignore[no-untyped-def]
    """(client cipher, server cipher, tolerance) for each codec; plain is the oracle."""
    if request.param == "plain":
        from secagg.crypto.plain import PlainCipher

        return PlainCipher(), PlainCipher(), PLAIN_TOLERANCE
    client, server = ckks_ciphers[request.param]
    return client, server, CKKS_TOLERANCE if request.param == "float" else 0.0


def update_for(cipher: ClientCipher, values: np.ndarray, weight: float = 1.0) -> Update:
    """An update the cipher accepts: integer codecs get the values rounded into their bound."""
    values = np.asarray(values, dtype=np.float64)
    if cipher.value_bound is not None:
        limit = np.floor(weight * cipher.value_bound)
        values = np.clip(np.rint(values), -limit, limit)
    return Update(values, weight)


# float32 on the wire: relative error 2**-24 on values of magnitude <= ~10.
PLAIN_TOLERANCE = 1e-5
# CKKS at scale 2**30 with one 60-bit data prime, symmetric encryption: a fresh ciphertext
# carries about 2**8 / 2**30 = 2e-7 of noise per slot (encoding plus encryption), a sum of k
# ciphertexts sqrt(k) times that. 1e-4 per value is a wide margin for sums of up to 16
# clients. (The packed codec is exact: tolerance 0.)
CKKS_TOLERANCE = 1e-4
