"""No secret-key material ever reaches the server: not in what it receives, nor in its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from secagg.config import RunConfig
from secagg.crypto import seal_format
from secagg.job import run_job
from secagg.server import Server


def secret_key_windows(client_ctx: bytes, count: int = 64, width: int = 24) -> list[bytes]:
    """Byte windows spread over the secret key: its coefficients, and the key as it is stored
    in client.ctx (the rest of client.ctx, the public parameters, is in server.ctx too).

    Any copy of the key, whole or in part, raw or as TenSEAL serialized it, contains them.
    """
    fields = dict(seal_format._protobuf(client_ctx))
    secret = dict(seal_format._protobuf(fields[3]))[1]
    coefficients = seal_format._seal_object(secret, "secret key")[-131072:]
    windows = []
    for blob in (coefficients, secret):
        step = (len(blob) - width) // count
        windows += [blob[i * step : i * step + width] for i in range(count)]
    return windows


def test_windows_find_the_key_where_it_is(session_keys: Path) -> None:
    """The scan is not blind: it finds the key in client.ctx, and a copy of it anywhere."""
    client_ctx = (session_keys / "client.ctx").read_bytes()
    windows = secret_key_windows(client_ctx)
    assert all(w in client_ctx for w in windows[64:])
    server_ctx = (session_keys / "server.ctx").read_bytes()
    assert not any(w in server_ctx for w in windows)
    assert any(w in b"noise" + client_ctx + b"noise" for w in windows)
    coefficients = seal_format._seal_object(
        dict(seal_format._protobuf(dict(seal_format._protobuf(client_ctx))[3]))[1], "key"
    )
    assert all(w in coefficients for w in windows[:64])


@pytest.mark.slow
def test_server_receives_and_stores_no_secret_key_material(
    tmp_path: Path, session_keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[bytes] = []
    real_sum = Server.sum

    def recording_sum(self, payloads, round_stamp, values, allowed=None):  # type: ignore[no-untyped-def]
        def tap():  # type: ignore[no-untyped-def]
            for payload in payloads:
                received.append(bytes(payload))
                yield payload

        summed = real_sum(self, tap(), round_stamp, values, allowed)
        received.append(summed.payload)
        return summed

    monkeypatch.setattr(Server, "sum", recording_sum)
    out = tmp_path / "run"
    config = RunConfig(
        he=True,
        clients=3,
        rounds=2,
        keys_dir=str(session_keys),
        tracking=False,
        output_dir=str(out),
    )
    run_job(config)
    # Per round: three scale payloads and their sum, three updates and their sum, three
    # evaluations and their sum.
    assert len(received) == 2 * (3 + 1 + 3 + 1 + 3 + 1)

    windows = secret_key_windows((session_keys / "client.ctx").read_bytes())
    stored = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.name.endswith(".enc") for path in stored)
    for name, blob in [
        *(("payload", p) for p in received),
        *((p.name, p.read_bytes()) for p in stored),
    ]:
        assert not any(w in blob for w in windows), f"secret key material in {name}"
