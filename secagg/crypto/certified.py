"""A deployment's site identities: what signs and checks the clients' mask keys.

Each site signs its per-job mask key (``masking``) with the ECDSA key of its site certificate,
the one its kit holds (``secagg provision``). The server relays every site's certificate with
its signed key; a site takes a peer's certificate only if the project's CA (which every kit
holds) signed it, it is a client certificate in date, and it names the site at that position of
the roster. A server that swaps a key, or a certificate for one it made itself, is caught
before any mask is used, and the error names the site.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from secagg.crypto.masking import SignedKey, verify
from secagg.errors import PayloadError

#: What ``secagg provision`` writes in a site certificate's organizational unit.
CLIENT_UNIT = "client"


class CertifiedIdentities:
    """One site's signing key, and the peers' certificate keys, checked against the CA."""

    def __init__(
        self, roster: Sequence[str], own: int, private_key: bytes, ca_certificate: bytes
    ) -> None:
        self.roster = tuple(roster)
        self.own = own
        key = serialization.load_pem_private_key(private_key, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PayloadError("this site's certificate key is not an ECDSA key", "bad-key")
        self._key = key
        self._ca_pem = ca_certificate
        self._ca = x509.load_pem_x509_certificate(ca_certificate)
        #: checked peer keys by position, with the certificate they came from
        self._peers: dict[int, tuple[bytes, ec.EllipticCurvePublicKey]] = {}

    def __getstate__(self) -> dict[str, object]:
        """The roster, the CA and the peers' certificates it took; its signing key as the
        object itself, which pickles only where the pickler stands it in for a reference
        (``secagg.flower``: a node's state never holds its key)."""
        peers = {site: certificate for site, (certificate, _) in self._peers.items()}
        return {
            "roster": self.roster,
            "own": self.own,
            "ca": self._ca_pem,
            "peers": peers,
            "key": self._key,
        }

    def __setstate__(self, state: dict[str, object]) -> None:
        self.roster, self.own = state["roster"], state["own"]  # type: ignore[assignment]
        self._key = state["key"]  # type: ignore[assignment]
        self._ca_pem = state["ca"]  # type: ignore[assignment]
        self._ca = x509.load_pem_x509_certificate(self._ca_pem)
        self._peers = {}
        for site, certificate in state["peers"].items():  # type: ignore[attr-defined]
            self.learn(site, certificate)

    def name(self, site: int) -> str:
        """The site's name in the roster."""
        return self.roster[site] if 0 <= site < len(self.roster) else f"site {site}"

    def signer(self, site: int) -> ec.EllipticCurvePrivateKey:
        """This site's certificate key; a site signs for no other."""
        if site != self.own:
            raise PayloadError(
                f"this site is {self.name(self.own)}; it cannot sign for {self.name(site)}",
                "bad-plan",
            )
        return self._key

    def verifier(self, site: int) -> ec.EllipticCurvePublicKey:
        """The key of ``site``'s certificate, once ``learn`` has checked it."""
        if site == self.own:
            return self._key.public_key()
        if site not in self._peers:
            raise PayloadError(
                f"no certificate was relayed with {self.name(site)}'s mask key", "bad-key"
            )
        return self._peers[site][1]

    def learn(self, site: int, certificate: bytes) -> None:
        """Take ``certificate`` as ``site``'s, refused (``bad-key``, naming the site) unless
        the project's CA signed it for that site, as a client, and it is in date."""
        if not 0 <= site < len(self.roster):
            raise PayloadError(
                f"a mask key was relayed for site {site}, not in the roster", "bad-key"
            )
        known = self._peers.get(site)
        if known is not None and known[0] == certificate:
            return
        public = certificate_key(self._ca, self.name(site), certificate)
        self._peers[site] = (certificate, public)


def certificate_key(
    ca: x509.Certificate, name: str, certificate: bytes, whose: str = "relayed "
) -> ec.EllipticCurvePublicKey:
    """The ECDSA key of site ``name``'s ``certificate``, refused (``bad-key``, naming the site)
    unless the project's CA signed it for that site, as a client, and it is in date."""
    try:
        cert = x509.load_pem_x509_certificate(certificate)
    except ValueError as err:
        raise PayloadError(f"{name}'s {whose}certificate is not a certificate", "bad-key") from err
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise PayloadError(
            f"{name}'s {whose}certificate is not signed by this project's CA: it was "
            "substituted on the way (the server or the network); this site will not use it",
            "bad-key",
        ) from err
    problem = _problem(cert, name)
    if problem is not None:
        raise PayloadError(f"{name}'s {whose}certificate {problem}", "bad-key")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise PayloadError(f"{name}'s {whose}certificate holds no ECDSA key", "bad-key")
    return public


def check_joining_key(
    ca_certificate: bytes, name: str, signed: SignedKey, certificate: bytes, job: bytes
) -> None:
    """The server's check of a joining site's mask key, before it relays it to anyone: signed
    for ``job`` by the site's own CA-signed certificate. A site whose key fails is refused at
    the door (``bad-key``, naming it), so one site's bad key never reaches, and stops, the
    honest sites; a key that fails at a site after this check was altered on the way."""
    ca = x509.load_pem_x509_certificate(ca_certificate)
    public = certificate_key(ca, name, certificate, whose="")
    verify(job, signed, public, name)


def _problem(cert: x509.Certificate, name: str) -> str | None:
    """What is wrong with a CA-signed certificate for site ``name``, in words; None if nothing."""
    common = _attribute(cert, NameOID.COMMON_NAME)
    if common != name:
        return f"names '{common}': it is another party's, relayed in {name}'s place"
    if _attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) != CLIENT_UNIT:
        return "is not a site (client) certificate"
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return "is out of date"
    return None


def _attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""
