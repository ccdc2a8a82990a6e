"""The relay's own token issuer: an RS256 key in its state directory, tokens with the seed's claims.

Signing needs no JOSE library (a JWT is two base64url JSON documents and a PKCS#1 v1.5
signature); validating one is the auth plugin's job, with all its hardening.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

AUDIENCE = "cloudbridge"

#: every permission the relay checks, and what it allows (relay/server.py, relay/mesh.py,
#: relay/console)
PERMISSIONS = {
    "relay:connect": "open a session with the relay (every client needs it)",
    "tunnel:create": "forward ports through the relay (cloudbridge tunnel)",
    "p2p:mesh": "join the tenant's mesh and reach its peers (cloudbridge p2p)",
    "relay:admin": "log in to the relay's web console for the tenant (server.console)",
}


def unknown_permissions(permissions: Iterable[str]) -> list[str]:
    """The ones among ``permissions`` that the relay checks nowhere (a typo grants nothing)."""
    return [permission for permission in permissions if permission not in PERMISSIONS]


class TokenLifetimeTooLong(ValueError):
    """A lifetime above ``server.max_token_ttl``."""

    def __init__(self, ttl: float, max_ttl: float) -> None:
        super().__init__(f"a lifetime of {ttl:g}s exceeds server.max_token_ttl ({max_ttl:g}s)")
        self.ttl = ttl
        self.max_ttl = max_ttl


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def generate_signing_key() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _private(pem: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the relay signing key must be an RSA key")
    return key


def public_pem(private_pem: bytes) -> bytes:
    return (
        _private(private_pem)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def key_id(private_pem: bytes) -> str:
    der = (
        _private(private_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return hashlib.sha256(der).hexdigest()[:16]


def jwks(private_pem: bytes) -> dict[str, Any]:
    """The public JWKS document for ``/.well-known/jwks.json``."""
    numbers = _private(private_pem).public_key().public_numbers()

    def encode(value: int) -> str:
        return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))

    key = {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": key_id(private_pem)}
    return {"keys": [{**key, "n": encode(numbers.n), "e": encode(numbers.e)}]}


def issue_token(
    private_pem: bytes,
    *,
    issuer: str,
    tenant: str,
    subject: str,
    permissions: Iterable[str],
    ttl: float,
    max_ttl: float | None = None,
    audience: str = AUDIENCE,
    extra: dict[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """A signed token; :class:`TokenLifetimeTooLong` when ``ttl`` exceeds ``max_ttl``
    (``server.max_token_ttl``: every command passes it; tests may leave it out)."""
    if max_ttl is not None and ttl > max_ttl:
        raise TokenLifetimeTooLong(ttl, max_ttl)
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl),
        "jti": uuid.uuid4().hex,
        "custom:tenant_id": tenant,
        "custom:permissions": sorted(set(permissions)),
        **(extra or {}),
    }
    header = {"alg": "RS256", "typ": "JWT", "kid": key_id(private_pem)}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = _private(private_pem).sign(
        signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    return f"{signing_input}.{_b64(signature)}"
