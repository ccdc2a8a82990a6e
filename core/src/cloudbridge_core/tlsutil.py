"""TLS material: a private CA, certificates it signs, and the SSL contexts that use them.

The relay generates its own CA on first start when no certificate is configured; clients
pin that CA. Tests use the same code for throwaway certificates on loopback.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ALPN = "cloudbridge/1"
#: the extended key usage that makes a certificate a cluster member's, on relay-to-relay
#: links: an OID of the UUID arc (ITU-T X.667), so nobody else's certificates carry it
CLUSTER_MEMBER_USAGE = x509.ObjectIdentifier("2.25.87267593560864207671908721115459478754")
#: the one name a member certificate holds: members are reached at any address, and the
#: link checks the marking above, never a host name
MEMBER_SAN = "cloudbridge-relay-member"


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key (the key is a secret: never log it)."""

    certificate: bytes
    key: bytes

    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, as colon-separated hex (what users pin)."""
        der = x509.load_pem_x509_certificate(self.certificate).public_bytes(
            serialization.Encoding.DER
        )
        digest = hashlib.sha256(der).hexdigest().upper()
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_ca(common_name: str, *, days: int = 3650) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .sign(key, hashes.SHA256())
    )
    return KeyPair(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_server_certificate(
    ca: KeyPair, hostnames: list[str], *, days: int = 825, client_auth: bool = False
) -> KeyPair:
    """A server certificate for ``hostnames`` (names or IP addresses), signed by ``ca``;
    with ``client_auth`` it may also authenticate a TLS client (a peer dialing a peer)."""
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    return _issue(ca, hostnames[0], names, usages, days)


def issue_member_certificate(ca: KeyPair, member: str, *, days: int = 365) -> KeyPair:
    """The certificate a relay of a cluster presents on its relay-to-relay links, as
    server and as client: named ``member``, signed by the cluster's ``ca``, and marked
    with :data:`CLUSTER_MEMBER_USAGE`, which no other certificate of ours carries."""
    usages = [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        CLUSTER_MEMBER_USAGE,
    ]
    return _issue(ca, member, [x509.DNSName(MEMBER_SAN)], usages, days)


def member_name(der: bytes) -> str | None:
    """The member the DER certificate ``der`` names, or None unless it is marked as a
    cluster member's (the TLS handshake checks who signed it; this, what for)."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    if CLUSTER_MEMBER_USAGE not in usages:
        return None
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _issue(
    ca: KeyPair,
    common_name: str,
    names: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    days: int,
) -> KeyPair:
    ca_certificate = x509.load_pem_x509_certificate(ca.certificate)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def server_context(pair: KeyPair) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN])
    load_key_pair(context, pair)
    return context


def load_key_pair(context: ssl.SSLContext, pair: KeyPair) -> None:
    """Make ``context`` present ``pair`` (as a server, or as a client asked for one)."""
    # the ssl module loads keys only from files; the directory is private and short-lived
    with tempfile.TemporaryDirectory() as directory:
        certificate, key = Path(directory, "cert.pem"), Path(directory, "key.pem")
        certificate.write_bytes(pair.certificate)
        key.touch(mode=0o600)
        key.write_bytes(pair.key)
        context.load_cert_chain(certificate, key)


def client_context(ca_certificate: bytes | None = None) -> ssl.SSLContext:
    """Verify the server against ``ca_certificate`` (PEM), or the system store when None."""
    context = ssl.create_default_context(cadata=ca_certificate.decode() if ca_certificate else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN])
    return context
