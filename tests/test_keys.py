"""Keys on disk: modes, manifest, refusal to overwrite or weaken, and role checks."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import stat
from pathlib import Path

import pytest

from secagg import keys
from secagg.config import CkksParams
from secagg.crypto.ckks_server import CkksServer
from secagg.errors import KeyFileError, WeakParametersError
from secagg.server import Server


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_writes_secret_and_public_contexts_0600(tmp_path: Path) -> None:
    manifest = keys.generate(tmp_path, CkksParams())
    assert _mode(tmp_path / "client.ctx") == 0o600
    assert _mode(tmp_path / "server.ctx") == 0o600
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["fingerprint"] == manifest["fingerprint"]
    assert on_disk["params"]["poly_modulus_degree"] == 8192
    # The fingerprint identifies the secret key; the server's file is checked by its hash.
    assert (
        keys.fingerprint_of((tmp_path / "client.ctx").read_bytes()).hex() == on_disk["fingerprint"]
    )
    assert (
        hashlib.sha256((tmp_path / "server.ctx").read_bytes()).hexdigest()
        == on_disk["server_sha256"]
    )
    assert not list(tmp_path.glob("*.tmp")), "no temp files left behind"


def test_keygen_refuses_to_overwrite_and_leaves_keys_untouched(keys_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in keys_dir.iterdir()}
    with pytest.raises(KeyFileError, match="--force"):
        keys.generate(keys_dir, CkksParams())
    assert {p.name: p.read_bytes() for p in keys_dir.iterdir()} == before
    keys.generate(keys_dir, CkksParams(), force=True)
    assert (keys_dir / "client.ctx").read_bytes() != before["client.ctx"]


@pytest.mark.parametrize(
    ("degree", "bits", "limit"),
    [(8192, (60, 60, 60, 60), 218), (4096, (60, 50), 109), (2048, (30, 30), 54)],
)
def test_keygen_refuses_parameters_below_128_bit_security(
    tmp_path: Path, degree: int, bits: tuple[int, ...], limit: int
) -> None:
    with pytest.raises(WeakParametersError, match=f"limit {limit} bits"):
        keys.generate(tmp_path, CkksParams(degree, bits))
    assert not any(tmp_path.iterdir())


def test_server_loader_refuses_a_secret_context(keys_dir: Path) -> None:
    # A user copies the client's file over the server's: its hash no longer matches,
    # and even with a matching manifest the secret key is refused.
    (keys_dir / "server.ctx").write_bytes((keys_dir / "client.ctx").read_bytes())
    with pytest.raises(KeyFileError):
        keys.load_for_server(keys_dir)
    manifest = json.loads((keys_dir / "manifest.json").read_text())
    manifest["server_sha256"] = hashlib.sha256((keys_dir / "server.ctx").read_bytes()).hexdigest()
    (keys_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KeyFileError, match="must never have it"):
        keys.load_for_server(keys_dir)


def test_client_loader_refuses_a_public_context(keys_dir: Path) -> None:
    (keys_dir / "client.ctx").write_bytes((keys_dir / "server.ctx").read_bytes())
    os.chmod(keys_dir / "client.ctx", 0o600)
    with pytest.raises(KeyFileError, match="no secret key"):
        keys.load_for_client(keys_dir)


def test_client_loader_refuses_a_secret_readable_by_others(keys_dir: Path) -> None:
    os.chmod(keys_dir / "client.ctx", 0o644)
    with pytest.raises(KeyFileError, match=r"chmod 600 .*client\.ctx"):
        keys.load_for_client(keys_dir)


def test_missing_keys_say_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="secagg keygen"):
        keys.load_for_server(tmp_path)


def test_server_never_reads_the_secret_key(keys_dir: Path, monkeypatch) -> None:
    """Loading keys for and building the server opens no file holding a secret key."""
    opened: list[str] = []
    real_open = builtins.open
    real_io_open = io.open

    def spy(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    server_keys = keys.load_for_server(keys_dir)
    Server(CkksServer(server_keys))
    monkeypatch.setattr(builtins, "open", real_open)
    monkeypatch.setattr(io, "open", real_io_open)
    assert any(name.endswith("server.ctx") for name in opened)
    assert not any(name.endswith("client.ctx") for name in opened)
    # And the server works with the secret file gone altogether.
    (keys_dir / "client.ctx").unlink()
    assert keys.load_for_server(keys_dir).fingerprint == server_keys.fingerprint


def test_client_loader_refuses_a_secret_key_from_another_keygen(keys_dir: Path, tmp_path) -> None:
    """A client.ctx from another 'secagg keygen' would decrypt to garbage: refuse it by name."""
    other = tmp_path / "other"
    keys.generate(other, CkksParams())
    (keys_dir / "client.ctx").write_bytes((other / "client.ctx").read_bytes())
    with pytest.raises(KeyFileError, match=r"not the key in manifest\.json"):
        keys.load_for_client(keys_dir)


def test_server_context_holds_no_key_material(keys_dir: Path) -> None:
    """server.ctx is the parameters alone: no secret key, and tiny next to the client's."""
    from secagg.crypto import ckks

    server_ctx = (keys_dir / "server.ctx").read_bytes()
    assert not ckks.load_context(server_ctx).is_private()
    assert len(server_ctx) < 1024 < len((keys_dir / "client.ctx").read_bytes())


def test_keys_from_an_older_secagg_are_refused_with_the_fix(keys_dir: Path) -> None:
    manifest = json.loads((keys_dir / "manifest.json").read_text())
    del manifest["format"]
    (keys_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KeyFileError, match="older secagg; run 'secagg keygen --force'"):
        keys.load_for_client(keys_dir)
