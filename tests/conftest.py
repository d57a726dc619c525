"""Shared fixtures: one CKKS key set per test session (keygen takes ~0.5 s), and helpers.

The suite's jobs train tiny models: one torch thread each (here and in every process a test
starts) is several times faster than two threads spinning for two cores that the CKKS worker
processes and the other processes of a test also want.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from secagg import keys
from secagg.config import CkksParams
from secagg.crypto import SERVER, ClientCipher, Stamp, Update
from secagg.crypto.ckks import CkksClient
from secagg.crypto.ckks_server import CkksServer

torch.set_num_threads(1)

JOB = bytes(range(16))


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
    """(client, server) CKKS ciphers, built from the keys each role may load."""
    return (
        CkksClient(keys.load_for_client(session_keys)),
        CkksServer(keys.load_for_server(session_keys)),
    )


@pytest.fixture(params=["plain", "packed"])
def cipher_pair(request: pytest.FixtureRequest, ckks_pair):  # type: ignore[no-untyped-def]
    """(client cipher, server cipher) for each codec; plain is the oracle."""
    if request.param == "plain":
        from secagg.crypto.plain import PlainCipher

        return PlainCipher(), PlainCipher()
    return ckks_pair


def round_of(round_num: int = 1, roster: int = 8, job: bytes = JOB) -> Stamp:
    """A round's stamp, as the server stamps its aggregate."""
    return Stamp(job, round_num, SERVER, roster)


def update_for(cipher: ClientCipher, values: np.ndarray, weight: float = 1.0) -> Update:
    """An update the cipher accepts: integer codecs get the values rounded into their bound."""
    values = np.asarray(values, dtype=np.float64)
    if cipher.sum_limit is not None:
        limit = np.floor(weight * cipher.sum_limit)
        values = np.clip(np.rint(values), -limit, limit)
    return Update(values, weight)


def encrypt_all(
    cipher: ClientCipher,
    updates: list[Update],
    round_stamp: Stamp,
    senders: list[int] | None = None,
) -> list[bytes]:
    """Each update encrypted by its client (roster index ``senders[i]``, default ``i``)."""
    senders = list(range(len(updates))) if senders is None else senders
    return [
        cipher.encrypt(u, round_stamp.for_sender(s)) for u, s in zip(updates, senders, strict=True)
    ]
