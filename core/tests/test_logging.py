"""Structured logs: fields, formats, rotation, and secrets never written."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudbridge_core.log import configure_logging, get_logger

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyMTIzIn0.c2lnbmF0dXJlLXNlY3JldA"
PASSWORD = "hunter2-very-secret"
PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
SECRETS = [JWT, PASSWORD, "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "s3cr3t-bearer-value", "urlpass"]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    configure_logging()


def log_everything_secret() -> None:
    log = get_logger("relay.client")
    log.info("connected", relay_host="relay.example.com", token=JWT, latency_ms=42.5)
    log.warning("login", user={"name": "ann", "password": PASSWORD})
    log.error("bad_header", header="Authorization: Bearer s3cr3t-bearer-value")
    log.info("key_loaded", detail=f"read {PEM}")
    log.info("proxy", url="https://ann:urlpass@proxy.example.com/")
    try:
        raise ValueError(f"token {JWT} rejected")
    except ValueError:
        log.exception("validation_failed")
    logging.getLogger("some.library").warning("library saw %s", JWT)


def test_json_logs_have_fields_and_no_secrets(tmp_path: Path) -> None:
    target = tmp_path / "cloudbridge.log"
    configure_logging(level="debug", fmt="json", output=str(target))
    log_everything_secret()
    text = target.read_text()
    for secret in SECRETS:
        assert secret not in text
    events = [json.loads(line) for line in text.splitlines()]
    first = events[0]
    assert first["event"] == "connected"
    assert first["component"] == "relay.client"
    assert first["level"] == "info"
    assert first["token"] == "<redacted>"
    assert first["latency_ms"] == 42.5
    assert first["timestamp"].endswith("Z")
    assert events[1]["user"] == {"name": "ann", "password": "<redacted>"}
    assert "<redacted>" in events[5]["exception"]
    assert events[-1]["component"] == "some.library"


def test_text_logs_have_no_secrets(tmp_path: Path) -> None:
    target = tmp_path / "text.log"
    configure_logging(level="info", fmt="text", output=str(target))
    log_everything_secret()
    text = target.read_text()
    assert "connected" in text
    for secret in SECRETS:
        assert secret not in text


def test_level_filters_and_file_rotates(tmp_path: Path) -> None:
    target = tmp_path / "rotating.log"
    configure_logging(
        level="warning", fmt="json", output=str(target), max_bytes=2000, backup_count=2
    )
    log = get_logger("test")
    log.info("hidden")
    for index in range(50):
        log.warning("shown", index=index)
    assert "hidden" not in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rotating.log",
        "rotating.log.1",
        "rotating.log.2",
    ]


HOSTILE = "\x1b[31mmallory\n2026-01-01 [info     ] forged\r\u202egnp.exe\x00"


def log_hostile_strings() -> None:
    log = get_logger("relay.mesh")
    log.info("peer_joined", tenant_id="acme\x07", name=HOSTILE, peers=[HOSTILE])
    log.warning("tunnel_rejected", **{"target\x1b": HOSTILE}, code="egress_denied")
    logging.getLogger("some.library").warning("peer said %s", HOSTILE)
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        log.exception("handshake_failed")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_untrusted_strings_are_escaped_in_every_format(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / f"hostile.{fmt}.log"
    configure_logging(fmt=fmt, output=str(target), color=False)
    log_hostile_strings()
    text = target.read_text()
    for raw in ("\x1b", "\r", "\x00", "\x07", "\u202e"):
        assert raw not in text
    assert not [line for line in text.splitlines() if line.startswith("2026-01-01")]  # forged
    if fmt == "text":
        assert "tenant_id=acme\\x07" in text
        assert "ValueError: \\x1b[31mmallory\\n" not in text  # the traceback keeps its lines
        assert "ValueError: \\x1b[31mmallory\n  2026-01-01 [info     ] forged\\r" in text
    else:
        events = [json.loads(line) for line in text.splitlines()]
        shown = "\\x1b[31mmallory\\n2026-01-01 [info     ] forged\\r\\u202egnp.exe\\x00"
        assert events[0]["name"] == shown
        assert events[0]["peers"] == [shown]
        assert events[2]["event"] == f"peer said {shown}"
        assert events[0]["tenant_id"] == "acme\\x07"
        assert "target\\x1b" in events[1]
        assert len(events) == 4
