"""What the console changes (invites, revocations) and who may: a token with
``relay:admin``, for its own tenant. The pages and the JSON API call the same actions."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cloudbridge_core.durations import format_duration, parse_duration
from cloudbridge_core.errors import InvalidToken, TokenExpired
from cloudbridge_core.log import get_logger
from cloudbridge_core.providers import BrowserLogin, Claims
from cloudbridge_core.relay.cluster.store import INVITE_ID_LENGTH, Invite, Revocation
from cloudbridge_core.relay.console.data import utc
from cloudbridge_core.relay.invites import InviteLink, new_code
from cloudbridge_core.relay.server import Relay
from cloudbridge_core.relay.state import RelayState

log = get_logger("relay.console")

ADMIN = "relay:admin"
#: what an invite made in the console may grant (never relay:admin: an admin is made on
#: purpose, with ``relay token issue``)
INVITE_PERMISSIONS = ("relay:connect", "tunnel:create", "p2p:mesh")
MAX_INVITE_USES = 100
#: a revocation outlives every token it covers by this much (as ``relay token revoke``)
REVOCATION_MARGIN = 3600.0
#: the longest subject or token id a revocation names
MAX_NAME_LENGTH = 256


class BadInput(ValueError):
    """A field of a form or JSON request that is wrong, named."""


@dataclass
class ConsoleContext:
    """What the console reads and changes: the relay, its state (CA, for invite URLs),
    where clients reach it, the longest token it issues, and how people log in besides
    pasting a token."""

    relay: Relay
    state: RelayState
    public_host: str
    tls_port: int
    max_token_ttl: float
    #: the auth provider's browser login (OIDC), when it offers one
    browser_login: BrowserLogin | None = None


class ConsoleActions:
    def __init__(self, context: ConsoleContext) -> None:
        self._context = context
        self._relay = context.relay

    async def admin(self, token: str) -> Claims:
        """The claims of a valid, unrevoked, unexpired token with ``relay:admin``."""
        if not token:
            raise InvalidToken("paste a token with the relay:admin permission")
        claims = await self._relay.auth.validate(token)
        if claims.expires_at <= time.time():
            raise TokenExpired("the token has expired")
        self._relay.revocations.check(claims)
        if ADMIN not in claims.permissions:
            raise InvalidToken(f"the token lacks the {ADMIN} permission")
        return claims

    async def create_invite(self, tenant_id: str, form: dict[str, Any]) -> dict[str, Any]:
        ttl = _field_duration(form, "ttl", self._context.max_token_ttl)
        uses = _field_uses(form)
        asked = form.get("permissions")
        granted = list(asked) if isinstance(asked, list) else list(INVITE_PERMISSIONS)
        unknown = [p for p in granted if p not in INVITE_PERMISSIONS]
        if unknown or not granted:
            raise BadInput(f"permissions: choose among {', '.join(INVITE_PERMISSIONS)}")
        code, key = new_code()
        invite = Invite(tenant_id, granted, time.time() + ttl, uses)
        await self._relay.cluster.add_invite(key, invite)
        link = InviteLink(
            self._context.public_host,
            self._context.tls_port,
            code,
            self._context.state.ca.certificate,
        )
        url = link.url()
        log.info("console_invite_created", tenant_id=tenant_id, uses=uses, ttl=format_duration(ttl))
        return {
            "url": url,
            "invite_id": key[:INVITE_ID_LENGTH],
            "expires_at": utc(invite.expires_at),
            "uses_left": uses,
            "permissions": granted,
        }

    async def revoke_invite(self, tenant_id: str, invite_id: str) -> bool:
        revoked = await self._relay.cluster.revoke_invite(tenant_id, invite_id)
        log.info("console_invite_revoked", tenant_id=tenant_id, found=revoked)
        return revoked

    async def revoke_token(self, tenant_id: str, form: dict[str, Any]) -> str:
        subject = str(form.get("subject") or "").strip() or None
        token_id = str(form.get("token_id") or "").strip() or None
        if (subject is None) == (token_id is None):
            raise BadInput("give a subject or a token id (one of them)")
        for name, value in (("subject", subject), ("token_id", token_id)):
            if value is not None and len(value) > MAX_NAME_LENGTH:
                raise BadInput(f"{name}: at most {MAX_NAME_LENGTH} characters")
        now = time.time()
        revocation = Revocation(
            tenant_id,
            now,
            now + self._context.max_token_ttl + REVOCATION_MARGIN,
            token_id=token_id,
            subject=subject,
        )
        await self._relay.cluster.revoke(revocation)
        await self._relay.on_revoked(revocation)  # this relay at once, whatever the backend
        log.info("console_token_revoked", tenant_id=tenant_id)
        return f"token {token_id}" if token_id else f"every token of {subject} issued so far"


def _field_duration(form: dict[str, Any], name: str, maximum: float) -> float:
    value = str(form.get(name) or "24h").strip()
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise BadInput(f"{name}: {value!r} is not a duration (30m, 24h, 7d)") from None
    if not 0 < seconds <= maximum:
        raise BadInput(f"{name}: between 1s and {format_duration(maximum)} (server.max_token_ttl)")
    return seconds


def _field_uses(form: dict[str, Any]) -> int:
    value = form.get("uses", 1)
    try:
        uses = int(value)
    except (TypeError, ValueError):
        raise BadInput(f"uses: {str(value)[:32]!r} is not a whole number") from None
    if not 1 <= uses <= MAX_INVITE_USES:
        raise BadInput(f"uses: from 1 to {MAX_INVITE_USES}")
    return uses
