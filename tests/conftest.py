"""Shared fixtures: one CKKS key set per test session (keygen takes ~0.5 s)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from secagg import keys
from secagg.config import CkksParams
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
def ckks_pair(session_keys: Path) -> tuple[CkksClient, CkksServer]:
    client_keys = keys.load_for_client(session_keys)
    server_keys = keys.load_for_server(session_keys)
    return (
        CkksClient(client_keys.context, client_keys.fingerprint, client_keys.params),
        CkksServer(server_keys.context, server_keys.fingerprint, server_keys.params),
    )


@pytest.fixture(params=["plain", "ckks"])
def cipher_pair(request: pytest.FixtureRequest, ckks_pair):  # type: ignore[no-untyped-def]
    """(client cipher, server cipher, tolerance) for each cipher; plain is the oracle."""
    if request.param == "plain":
        from secagg.crypto.plain import PlainCipher

        return PlainCipher(), PlainCipher(), PLAIN_TOLERANCE
    client, server = ckks_pair
    return client, server, CKKS_TOLERANCE


# float32 on the wire: relative error 2**-24 on values of magnitude <= ~10.
PLAIN_TOLERANCE = 1e-5
# CKKS at scale 2**30 with one 60-bit data prime: each fresh ciphertext carries encoding and
# encryption noise of about 2**-16 per slot (measured max 1.8e-5 over 300k slots); noise of a
# sum of k ciphertexts grows like sqrt(k). 1e-4 per value covers sums of up to 16 clients with
# margin. Relative to model weights of ~0.1 this is ~1e-3, far below what changes accuracy.
CKKS_TOLERANCE = 1e-4
