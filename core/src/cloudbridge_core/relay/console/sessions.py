"""Console logins: a random session id in an ``HttpOnly``, ``SameSite=Strict`` cookie, and a
CSRF token every change must carry. Sessions live in the relay's memory only: a restart
logs everyone out, and a stolen cookie dies with its token (expiry or revocation)."""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from cloudbridge_core.providers import Claims

#: logins held at once; the oldest gives way (a security limit: logins cost no more memory)
MAX_SESSIONS = 1024
COOKIE = "cloudbridge_console"
#: over TLS the ``__Host-`` prefix binds the cookie to this origin (Secure, Path=/, no Domain)
SECURE_COOKIE = "__Host-cloudbridge_console"


@dataclass(frozen=True)
class ConsoleSession:
    claims: Claims
    csrf: str
    expires_at: float

    @property
    def tenant_id(self) -> str:
        return self.claims.tenant_id

    def csrf_matches(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered, self.csrf)


class ConsoleSessions:
    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._held: OrderedDict[str, ConsoleSession] = OrderedDict()

    def open(self, claims: Claims) -> tuple[str, ConsoleSession]:
        """A new login for ``claims``; it ends with its token at the latest."""
        session_id = secrets.token_urlsafe(32)
        session = ConsoleSession(
            claims, secrets.token_urlsafe(32), min(time.time() + self._ttl, claims.expires_at)
        )
        self._held[session_id] = session
        while len(self._held) > MAX_SESSIONS:
            self._held.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id:
            return None
        session = self._held.get(session_id)
        if session is not None and session.expires_at <= time.time():
            del self._held[session_id]
            return None
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._held.pop(session_id, None)


def cookie_name(secure: bool) -> str:
    return SECURE_COOKIE if secure else COOKIE


def session_cookie(session_id: str, *, secure: bool, max_age: int) -> str:
    attributes = [
        f"{cookie_name(secure)}={session_id}",
        "Path=/",
        "HttpOnly",
        "SameSite=Strict",
        f"Max-Age={max(max_age, 0)}",
    ]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)


#: browser logins under way at once (each a random state and PKCE verifier; a security limit)
MAX_PENDING_LOGINS = 256
#: how long a browser may take at the provider
PENDING_LOGIN_TTL = 600.0
#: binds a login under way to the browser that began it; ``Lax``, as the provider sends the
#: browser back with a cross-site navigation, which a ``Strict`` cookie would not ride on
LOGIN_COOKIE = "cloudbridge_console_login"


@dataclass(frozen=True)
class PendingLogin:
    code_verifier: str
    redirect_uri: str
    began_at: float


class PendingLogins:
    """Browser logins sent to the provider and not back yet, by their ``state``."""

    def __init__(self) -> None:
        self._pending: OrderedDict[str, PendingLogin] = OrderedDict()

    def begin(self, redirect_uri: str) -> tuple[str, PendingLogin]:
        state = secrets.token_urlsafe(24)
        pending = PendingLogin(secrets.token_urlsafe(48), redirect_uri, time.time())
        self._pending[state] = pending
        while len(self._pending) > MAX_PENDING_LOGINS:
            self._pending.popitem(last=False)
        return state, pending

    def finish(self, state: str | None, cookie: str | None) -> PendingLogin | None:
        """The login ``state`` names, once, if this browser began it and it is recent."""
        if not state or not cookie or not hmac.compare_digest(state, cookie):
            return None
        pending = self._pending.pop(state, None)
        if pending is None or time.time() - pending.began_at > PENDING_LOGIN_TTL:
            return None
        return pending


def login_cookie(state: str, *, secure: bool) -> str:
    attributes = [
        f"{LOGIN_COOKIE}={state}",
        "Path=/console/login",
        "HttpOnly",
        "SameSite=Lax",
        f"Max-Age={int(PENDING_LOGIN_TTL) if state else 0}",
    ]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)
