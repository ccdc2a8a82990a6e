"""TURN credentials the relay issues per tenant, short-lived: the TURN REST API scheme
that coturn checks with ``use-auth-secret`` and ``static-auth-secret``.

The username is ``"<expiry>:<tenant>"`` (Unix seconds) and the credential
``base64(HMAC-SHA1(secret, username))``: the TURN server needs only the shared secret,
refuses the credentials after the expiry, and a tenant cannot forge another's. The secret
never leaves this object (not in ``repr``, logs or errors).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path

from cloudbridge_core.errors import ConfigError, ConfigIssue
from cloudbridge_core.protocol.messages import TurnCredentials
from cloudbridge_core.settings import TurnSettings


def turn_password(secret: bytes, username: str) -> str:
    """The TURN REST API credential for ``username``."""
    digest = hmac.new(secret, username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class TurnIssuer:
    secret: bytes = field(repr=False)
    urls: tuple[str, ...]
    #: how long issued credentials work (``server.turn.credential_ttl``)
    ttl: float

    @classmethod
    def from_settings(cls, section: TurnSettings) -> TurnIssuer | None:
        """The issuer of ``server.turn``, or None when no secret is configured; raises
        :class:`ConfigError` when the secret file is unreadable or empty, or there are no
        URLs to hand out."""
        if section.secret_file is None:
            return None
        where = "server.turn.secret_file"
        try:
            secret = Path(section.secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(
                [ConfigIssue(where, f"cannot read the TURN secret: {reason}")]
            ) from None
        if not secret:
            raise ConfigError([ConfigIssue(where, "the TURN secret file is empty")])
        if not section.urls:
            raise ConfigError(
                [ConfigIssue("server.turn.urls", "a TURN secret needs the TURN URLs to hand out")]
            )
        return cls(secret.encode(), section.urls, section.credential_ttl)

    def issue(self, tenant: str, now: float | None = None) -> TurnCredentials:
        """Credentials for ``tenant`` that expire ``ttl`` after ``now`` (default: the clock)."""
        expires = int((time.time() if now is None else now) + self.ttl)
        username = f"{expires}:{tenant}"
        return TurnCredentials(
            urls=list(self.urls),
            username=username,
            credential=turn_password(self.secret, username),
            expires_at=float(expires),
        )
