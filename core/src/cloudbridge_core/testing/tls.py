"""Throwaway TLS for tests on loopback."""

from __future__ import annotations

import ssl
from functools import cache

from cloudbridge_core.providers import TlsMaterial
from cloudbridge_core.tlsutil import (
    KeyPair,
    client_context,
    generate_ca,
    issue_server_certificate,
    server_context,
)


@cache
def _loopback_pair() -> tuple[KeyPair, KeyPair]:
    ca = generate_ca("CloudBridge test CA")
    return ca, issue_server_certificate(ca, ["localhost", "127.0.0.1", "::1"])


def loopback_tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for a server on 127.0.0.1 / localhost."""
    ca, server = _loopback_pair()
    return server_context(server), client_context(ca.certificate)


def loopback_material() -> tuple[TlsMaterial, TlsMaterial]:
    """The PEM behind :func:`loopback_tls`: (server material, client material)."""
    ca, server = _loopback_pair()
    return TlsMaterial(certificate=server.certificate, key=server.key), TlsMaterial(
        ca=ca.certificate
    )
