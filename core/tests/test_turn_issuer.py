"""The relay's TURN credential issuer as ``server.turn`` configures it."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.config import load_config
from cloudbridge_core.errors import ConfigError
from cloudbridge_core.protocol import messages
from cloudbridge_core.relay.turn import TurnIssuer


def issuer_of(section: dict[str, Any]) -> TurnIssuer | None:
    config = load_config(None, environ={}, overrides={"server.turn": (section, "test")})
    return TurnIssuer.from_settings(config.settings.server.turn)


def test_no_secret_no_credentials() -> None:
    assert issuer_of({}) is None


def test_credentials_per_tenant_expire_after_the_ttl(tmp_path: Path) -> None:
    (tmp_path / "turn.secret").write_text("s3cret\n")
    issuer = issuer_of(
        {
            "secret_file": str(tmp_path / "turn.secret"),
            "urls": ["turn:turn.example.com:3478"],
            "credential_ttl": "10m",
        }
    )
    assert issuer is not None
    acme, globex = issuer.issue("acme", now=1000.0), issuer.issue("globex", now=1000.0)
    assert (acme.username, acme.expires_at) == ("1600:acme", 1600.0)
    assert acme.credential != globex.credential
    digest = hmac.new(b"s3cret", b"1600:acme", hashlib.sha1).digest()
    assert acme.credential == base64.b64encode(digest).decode()
    # what the relay sends passes the protocol schema, and keeps the secret out of repr
    assert messages.decode_body(messages.encode(acme)[4:]) == acme
    assert "s3cret" not in repr(issuer)
    assert acme.credential not in repr(acme)


@pytest.mark.parametrize(
    ("content", "section", "message"),
    [
        ("", {"urls": ["turn:t.example.com"]}, "empty"),
        ("s3cret", {}, "needs the TURN URLs"),
    ],
)
def test_unusable_settings_are_config_errors(
    tmp_path: Path, content: str, section: dict[str, Any], message: str
) -> None:
    (tmp_path / "turn.secret").write_text(content)
    with pytest.raises(ConfigError, match=message):
        issuer_of({"secret_file": str(tmp_path / "turn.secret"), **section})


def test_a_ttl_under_a_minute_is_refused() -> None:
    with pytest.raises(ConfigError, match="credential_ttl"):
        issuer_of({"credential_ttl": "30s"})
