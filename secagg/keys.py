"""CKKS keys on disk: generate, save, and load them for the role that may hold them.

``keys/client.ctx`` holds the secret key and goes to clients only; ``keys/server.ctx`` holds
the encryption parameters and no key at all, and is all the server ever reads;
``keys/manifest.json`` records the parameters, the key's fingerprint (a one-way hash of the
secret context, so a client can check its client.ctx is the deployment's key) and a hash of
server.ctx (so the server can check its file). Key files
are written 0600 through a temp file and a rename, and never overwritten without ``force``.
"""

from __future__ import annotations

import hashlib
import json
import stat
import time
from dataclasses import asdict
from pathlib import Path

from secagg.crypto.params import CkksParams, Keys
from secagg.errors import KeyFileError, WeakParametersError
from secagg.files import atomic_write, atomic_write_json

CLIENT_FILE = "client.ctx"
SERVER_FILE = "server.ctx"
MANIFEST_FILE = "manifest.json"

# HomomorphicEncryption.org security standard (2018), classical 128-bit security, ternary
# secret: the largest total coefficient-modulus size (bits) for each polynomial degree.
MAX_MODULUS_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def check_params(params: CkksParams) -> None:
    """Refuse parameters below 128-bit security or that TenSEAL cannot use."""
    n = params.poly_modulus_degree
    if n not in MAX_MODULUS_BITS_128:
        raise KeyFileError(
            f"poly modulus degree {n} is not supported; use one of "
            f"{', '.join(map(str, MAX_MODULUS_BITS_128))}"
        )
    total = sum(params.coeff_mod_bit_sizes)
    limit = MAX_MODULUS_BITS_128[n]
    if total > limit:
        raise WeakParametersError(
            f"coefficient modulus of {total} bits is below 128-bit security for N={n} "
            f"(limit {limit} bits); use fewer or smaller primes or a larger --poly-degree"
        )
    if len(params.coeff_mod_bit_sizes) < 2 or any(
        not 20 <= bits <= 60 for bits in params.coeff_mod_bit_sizes
    ):
        raise KeyFileError(
            "coefficient modulus needs at least two primes (data + special) of 20 to 60 bits"
        )


MANIFEST_FORMAT = 3


def fingerprint_of(secret_context: bytes) -> bytes:
    """16-byte identity of a key: a domain-separated one-way hash of the secret context.

    The secret key has thousands of bits of entropy, so the hash reveals nothing about it; the
    server's context holds only parameters, so it cannot identify a key by itself.
    """
    return hashlib.sha256(b"secagg key id\0" + secret_context).digest()[:16]


def check_can_generate(out_dir: str | Path, params: CkksParams, force: bool = False) -> None:
    """Refuse, before any work, parameters below 128-bit security and keys already in
    ``out_dir`` (unless ``force``)."""
    out = Path(out_dir)
    check_params(params)
    existing = [name for name in (CLIENT_FILE, SERVER_FILE, MANIFEST_FILE) if (out / name).exists()]
    if existing and not force:
        raise KeyFileError(
            f"{out}/ already holds keys ({', '.join(existing)}); pass --force to replace them "
            "(every client then needs the new client.ctx)"
        )


def generate(out_dir: str | Path, params: CkksParams, force: bool = False) -> dict[str, object]:
    """Make a key pair and write it to ``out_dir``; return the manifest."""
    from secagg.crypto import ckks

    out = Path(out_dir)
    check_can_generate(out, params, force)
    secret, public = ckks.make_contexts(params)
    manifest: dict[str, object] = {
        "scheme": "CKKS",
        "params": asdict(params),
        "format": MANIFEST_FORMAT,
        "fingerprint": fingerprint_of(secret).hex(),
        "server_sha256": hashlib.sha256(public).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {"client": CLIENT_FILE, "server": SERVER_FILE},
        "security_bits": 128,
    }
    # The manifest goes last: its presence marks a complete key set.
    atomic_write(out / CLIENT_FILE, secret, mode=0o600)
    atomic_write(out / SERVER_FILE, public, mode=0o600)
    atomic_write_json(out / MANIFEST_FILE, manifest, mode=0o644)
    return manifest


def read_manifest(keys_dir: str | Path) -> dict[str, object]:
    """Parameters and fingerprint of the key set in ``keys_dir``."""
    path = Path(keys_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        manifest["params"]["coeff_mod_bit_sizes"] = tuple(manifest["params"]["coeff_mod_bit_sizes"])
        manifest["params_obj"] = CkksParams(**manifest["params"])
        bytes.fromhex(manifest["fingerprint"])
        if manifest.get("format") != MANIFEST_FORMAT:
            raise KeyFileError(
                f"{path} was made by an older secagg; run 'secagg keygen --force' and give "
                "every party the new files"
            )
    except FileNotFoundError as err:
        raise KeyFileError(f"no keys in {keys_dir}/; run 'secagg keygen --out {keys_dir}'") from err
    except (ValueError, KeyError, TypeError) as err:
        raise KeyFileError(
            f"{path} is not a secagg key manifest ({err}); run 'secagg keygen --force'"
        ) from err
    return manifest


def load_for_server(keys_dir: str | Path) -> Keys:
    """The server's keys: the public context only. Never opens the client's secret file, and
    never imports TenSEAL: the context is read as bytes (``seal_format``)."""
    from secagg.crypto import seal_format

    manifest = read_manifest(keys_dir)
    data = _read(Path(keys_dir) / SERVER_FILE)
    if hashlib.sha256(data).hexdigest() != manifest["server_sha256"]:
        raise KeyFileError(
            f"{keys_dir}/{SERVER_FILE} does not match {MANIFEST_FILE}; copy both from one "
            "'secagg keygen'"
        )
    if seal_format.context_has_secret_key(data):
        raise KeyFileError(
            f"{keys_dir}/{SERVER_FILE} holds a secret key; the server must never have it. "
            "Give the server only the server.ctx made by 'secagg keygen'"
        )
    return Keys(data, bytes.fromhex(str(manifest["fingerprint"])), manifest["params_obj"])  # type: ignore[arg-type]


def load_for_client(keys_dir: str | Path) -> Keys:
    """A client's keys: the secret context, refused if others can read the file."""
    from secagg.crypto import seal_format

    manifest = read_manifest(keys_dir)
    path = Path(keys_dir) / CLIENT_FILE
    data = _read(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path} holds the secret key but is readable by others (mode {mode:o}); "
            f"run 'chmod 600 {path}'"
        )
    if not seal_format.context_has_secret_key(data):
        raise KeyFileError(
            f"{path} is a public context with no secret key; clients need the client.ctx "
            "made by 'secagg keygen'"
        )
    if fingerprint_of(data).hex() != manifest["fingerprint"]:
        raise KeyFileError(
            f"{path} is not the key in {MANIFEST_FILE} (fingerprint differs); copy client.ctx "
            "and manifest.json from one 'secagg keygen'"
        )
    return Keys(data, bytes.fromhex(str(manifest["fingerprint"])), manifest["params_obj"])  # type: ignore[arg-type]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise KeyFileError(f"{path} is missing; run 'secagg keygen --out {path.parent}'") from err
    except PermissionError as err:
        raise KeyFileError(f"cannot read {path}: permission denied") from err
