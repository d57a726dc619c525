"""Provisioning: a certificate authority, one certificate per party, and a startup kit each.

``secagg provision`` makes everything a deployment needs to trust its parties:

- ``ca/``: the project's certificate authority (``ca.key`` stays with whoever provisions;
  nothing else holds it);
- ``server/``: the server's certificate and key, the public CKKS context (no secret key) and the
  key manifest;
- ``<site>/`` for every client: its certificate and key, the secret CKKS context, the manifest;
- ``admin/``: a certificate for ``secagg status`` and ``secagg abort``.

Every kit also holds the CA certificate and ``kit.json`` (its role, its name, the server's
address and the roster of sites, in order: a site's position is its index in every round).
Parties authenticate each other with mutual TLS: the server accepts only certificates its CA
signed, and a site is known by its certificate's common name. Files are written 0600 in
folders of 0700, through a temp file and a rename, and an existing kit is never overwritten
without ``force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from secagg import keys
from secagg.crypto.params import CkksParams
from secagg.crypto.policy import RoundPolicy
from secagg.errors import ConfigError, KeyFileError
from secagg.files import atomic_write

if TYPE_CHECKING:  # cryptography is imported where it is used: only provisioning needs it
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey as PrivateKey
    from cryptography.x509 import Certificate, Name

KIT_FILE = "kit.json"
KIT_FORMAT = 1
CA_CERT = "ca.pem"
ROLES = ("server", "client", "admin")
ADMIN = "admin"
SERVER = "server"
DEFAULT_PORT = 8443
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_VALID_DAYS = 3650


@dataclass(frozen=True)
class Kit:
    """One party's startup kit, loaded and checked."""

    folder: Path
    role: str
    name: str
    server: str
    roster: tuple[str, ...]
    project: str

    @property
    def ca(self) -> bytes:
        return (self.folder / CA_CERT).read_bytes()

    @property
    def certificate(self) -> bytes:
        return (self.folder / f"{self.role}.pem").read_bytes()

    @property
    def private_key(self) -> bytes:
        return _read_secret(self.folder / f"{self.role}.key")

    @property
    def index(self) -> int:
        """A site's position in the roster (its index in every round)."""
        return self.roster.index(self.name)

    @property
    def host(self) -> str:
        return self.server.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.server.rsplit(":", 1)[1])

    def policy(self) -> RoundPolicy:
        """The round policy in this kit, refused unless the project's CA signed it."""
        from cryptography import x509

        return RoundPolicy.load(self.folder, x509.load_pem_x509_certificate(self.ca))


def provision(
    out: str | Path,
    server: str,
    clients: list[str],
    project: str = "secagg",
    params: CkksParams | None = None,
    force: bool = False,
    threshold: int = 0,
    graph_above: int = 0,
    protection: str = "masked",
    dp_noise: float = 0.0,
    dp_clip: float = 0.0,
) -> dict[str, Path]:
    """Make the CA, certificates, CKKS keys and every party's kit under ``out``; return the
    kit folders by party name (``server``, each site, ``admin``) plus ``ca``.

    Every kit also holds the round policy (``crypto.policy``), signed with the CA's key:
    ``threshold`` is the fewest contributors any sum a site unmasks or decrypts may have
    (0: the default for rounds of all the sites); rounds of more than ``graph_above`` sites
    mask over a neighbour graph (0: the default, 200). ``protection`` (``masked``, ``he`` or
    ``plain``) and ``dp_noise``/``dp_clip`` (DP's least noise multiplier and largest clip; 0:
    DP not required) are the least a job may protect a site's update with: every site
    refuses a job the server sends that protects it less."""
    out = Path(out)
    address = _address(server)
    _check_names(clients)
    policy = replace(
        RoundPolicy.for_round_size(len(clients), threshold, graph_above),
        protection=protection,
        dp_noise=dp_noise,
        dp_clip=dp_clip,
    )
    parties = [SERVER, *clients, ADMIN]
    existing = [name for name in ["ca", *parties] if (out / name).exists()]
    if existing and not force:
        raise KeyFileError(
            f"{out}/ already holds kits ({', '.join(existing)}); pass --force to replace them "
            "(every party then needs its new kit)"
        )
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, project)
    with tempfile.TemporaryDirectory(prefix="secagg-keys-") as scratch:
        keys.generate(scratch, params or CkksParams())
        key_files = {name: (Path(scratch) / name).read_bytes() for name in _KEY_FILES}
    if force:  # the whole old project goes, kits of sites no longer named included
        old = [path for path in out.glob(f"*/{KIT_FILE}")] + [out / "ca" / CA_CERT]
        for path in old:
            if path.parent.exists():
                shutil.rmtree(path.parent)
    folders = {"ca": out / "ca"}
    _write(out / "ca" / "ca.key", _pem_key(ca_key))
    _write(out / "ca" / CA_CERT, _pem_cert(ca_cert))
    for name in parties:
        role = name if name in (SERVER, ADMIN) else "client"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf_certificate(key, ca_key, ca_cert, name, role, project, address[0])
        folder = out / name
        kit = {
            "format": KIT_FORMAT,
            "role": role,
            "name": name,
            "server": f"{address[0]}:{address[1]}",
            "roster": clients,
            "project": project,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _write(folder / KIT_FILE, (json.dumps(kit, indent=2) + "\n").encode())
        _write(folder / CA_CERT, _pem_cert(ca_cert))
        _write(folder / f"{role}.pem", _pem_cert(cert))
        _write(folder / f"{role}.key", _pem_key(key))
        for file in _KIT_KEYS[role]:
            _write(folder / file, key_files[file])
        if role != ADMIN:
            policy.save(folder, ca_key)
        folders[name] = folder
    return folders


def load_kit(folder: str | Path, role: str) -> Kit:
    """A kit of the given role, refused with the fix when it is another role or incomplete."""
    folder = Path(folder)
    try:
        data = json.loads((folder / KIT_FILE).read_text())
    except FileNotFoundError as err:
        raise KeyFileError(
            f"{folder}/ is not a startup kit (no {KIT_FILE}); run 'secagg provision' and "
            "use the folder it made for this party"
        ) from err
    except (OSError, ValueError) as err:
        raise KeyFileError(f"{folder}/{KIT_FILE} is unreadable: {err}") from err
    if data.get("format") != KIT_FORMAT:
        raise KeyFileError(f"{folder}/ was made by another secagg release; provision again")
    if data.get("role") != role:
        raise KeyFileError(
            f"{folder}/ is the {data.get('role')} kit of '{data.get('name')}'; pass the "
            f"{role} kit provisioned for this party"
        )
    kit = Kit(
        folder,
        role,
        str(data["name"]),
        str(data["server"]),
        tuple(data["roster"]),
        str(data["project"]),
    )
    for file in (CA_CERT, f"{role}.pem", f"{role}.key", *_KIT_KEYS[role]):
        if not (folder / file).exists():
            raise KeyFileError(f"{folder}/{file} is missing; provision the kit again")
    kit.private_key  # noqa: B018  (refuses a key others can read)
    return kit


# --- certificates ------------------------------------------------------------------------------

_KEY_FILES = (keys.CLIENT_FILE, keys.SERVER_FILE, keys.MANIFEST_FILE)
# Which CKKS files each role's kit holds: the server never gets the secret context.
_KIT_KEYS = {
    "server": (keys.SERVER_FILE, keys.MANIFEST_FILE),
    "client": (keys.CLIENT_FILE, keys.MANIFEST_FILE),
    "admin": (),
}


def _ca_certificate(ca_key: PrivateKey, project: str) -> Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    name = _subject(f"{project} CA", project, "ca")
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )


def _leaf_certificate(
    key: PrivateKey,
    ca_key: PrivateKey,
    ca_cert: Certificate,
    name: str,
    role: str,
    project: str,
    host: str,
) -> Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    alt_names: list[x509.GeneralName] = [x509.DNSName(name)]
    if role == SERVER:
        alt_names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        if host in ("localhost", "127.0.0.1"):
            host = ""
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if host:
                alt_names.append(x509.DNSName(host))
    return (
        x509.CertificateBuilder()
        .subject_name(_subject(name, project, role))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _subject(common_name: str, project: str, role: str) -> Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, project),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _pem_cert(cert: Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


# --- files and names ---------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, data, mode=0o600)


def _read_secret(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path} is a private key readable by others (mode {mode:o}); run 'chmod 600 {path}'"
        )
    return path.read_bytes()


def _address(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":") if ":" in server else (server, "", "")
    if not host:
        raise ConfigError(f"--server {server!r} needs a host name or address, e.g. fl.example.org")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError as err:
        raise ConfigError(f"--server {server!r}: the port must be a number") from err
    if not 0 < number < 65536:
        raise ConfigError(f"--server {server!r}: the port must be 1 to 65535")
    return host, number


def _check_names(clients: list[str]) -> None:
    if not clients:
        raise ConfigError("--clients needs at least one site name, e.g. site-1,site-2")
    for name in clients:
        if not _NAME.match(name) or name in (SERVER, ADMIN, "ca"):
            raise ConfigError(
                f"site name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                "(not 'server', 'admin' or 'ca')"
            )
    if len(set(clients)) != len(clients):
        raise ConfigError("site names must be unique")
