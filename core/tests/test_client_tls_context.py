"""The client's TLS context for its relay: built once per CA and settings, not per
connection attempt, and a CA file replaced on disk applies at the next attempt."""

from __future__ import annotations

import ssl
from pathlib import Path

from cloudbridge_core.client.connection import tls_for
from cloudbridge_core.settings.sections import RelayTlsSettings
from cloudbridge_core.tlsutil import generate_ca


def _subjects(context: ssl.SSLContext) -> list[object]:
    return [certificate["subject"] for certificate in context.get_ca_certs()]


def test_attempts_share_one_context_until_the_ca_file_changes(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(generate_ca("first CA").certificate)
    settings = RelayTlsSettings(min_version="1.3", verify_cert=True, ca_file=str(ca_file))

    first, material = tls_for(settings)
    again, _ = tls_for(settings)
    assert again is first
    assert material.ca == ca_file.read_bytes()
    assert _subjects(first) == [((("commonName", "first CA"),),)]

    ca_file.write_bytes(generate_ca("second CA").certificate)
    rotated, material = tls_for(settings)
    assert _subjects(rotated) == [((("commonName", "second CA"),),)]
    assert material.ca == ca_file.read_bytes()


def test_settings_that_differ_get_contexts_of_their_own(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(generate_ca("a CA").certificate)
    strict = RelayTlsSettings(min_version="1.3", verify_cert=True, ca_file=str(ca_file))
    older = RelayTlsSettings(min_version="1.2", verify_cert=True, ca_file=str(ca_file))
    unverified = RelayTlsSettings(min_version="1.3", verify_cert=False, ca_file=str(ca_file))

    strict_context, _ = tls_for(strict)
    older_context, _ = tls_for(older)
    unverified_context, _ = tls_for(unverified)
    assert strict_context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert older_context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert strict_context.verify_mode is ssl.CERT_REQUIRED
    assert unverified_context.verify_mode is ssl.CERT_NONE
    assert not unverified_context.check_hostname
