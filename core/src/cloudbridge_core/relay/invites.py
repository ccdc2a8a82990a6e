"""Invites: one-time codes a relay exchanges for a token and a client config.

The invite URL carries a random code (not a token: a code is useless once used or
expired, while a JWT in a URL lives on in shell history and proxy logs) and the relay's CA
certificate, so that ``cloudbridge join`` can trust the relay before it shows the code.
The relay keeps only a hash of each code, with its tenant, permissions, expiry and the
uses left: in ``invites.json`` (0600) in its state directory, or in the cluster's Redis
(``relay/cluster``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudbridge_core.errors import InvalidToken, UsageError
from cloudbridge_core.relay.cluster.store import (
    INVITE_ID_LENGTH,
    Invite,
    InviteEntry,
    is_invite_id,
)
from cloudbridge_core.secretfile import write_secret

SCHEME = "cloudbridge"
UNKNOWN_INVITE = "unknown invite (already used, or never issued by this relay)"
EXPIRED_INVITE = "the invite has expired"
#: longest invite URL read (its CA certificate is most of it), a security limit
MAX_INVITE_URL = 8192


@dataclass(frozen=True)
class InviteLink:
    host: str
    port: int
    code: str
    ca: bytes  # PEM

    def url(self) -> str:
        der = x509.load_pem_x509_certificate(self.ca).public_bytes(serialization.Encoding.DER)
        query = urllib.parse.urlencode(
            {"code": self.code, "ca": base64.urlsafe_b64encode(der).decode().rstrip("=")}
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{SCHEME}://{host}:{self.port}/join?{query}"

    @classmethod
    def parse(cls, url: str) -> InviteLink:
        """Read an invite URL; a clear error names what is wrong with it."""
        url = url.strip()
        if len(url) > MAX_INVITE_URL:
            raise UsageError(f"the invite URL is longer than {MAX_INVITE_URL} characters")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != SCHEME or parts.path != "/join":
            raise UsageError(f"not an invite URL (expected {SCHEME}://HOST:PORT/join?...)")
        try:
            port = parts.port
        except ValueError:
            raise UsageError("the invite URL's port is not a port number (1-65535)") from None
        if not parts.hostname or not port:
            raise UsageError("the invite URL names no relay host and port")
        try:
            # an invite has two fields; more is not an invite (and costs nothing to refuse)
            query = urllib.parse.parse_qs(parts.query, max_num_fields=2)
            (code,), (ca,) = query["code"], query["ca"]
            der = base64.urlsafe_b64decode(ca + "=" * (-len(ca) % 4))
            pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        except (KeyError, ValueError):
            raise UsageError(
                "the invite URL is damaged: its code or CA certificate is missing or garbled"
            ) from None
        return cls(parts.hostname, port, code, pem)


def new_code() -> tuple[str, str]:
    """A new invite code and the hash it is kept under (the code is shown once, never kept)."""
    code = secrets.token_urlsafe(24)
    return code, digest(code)


def digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _usable(invites: dict[str, Invite], tenant_id: str | None) -> dict[str, Invite]:
    """Those of ``invites`` still usable, of ``tenant_id`` (of every tenant when None)."""
    now = time.time()
    return {
        key: invite
        for key, invite in invites.items()
        if invite.usable(now) and tenant_id in (None, invite.tenant_id)
    }


class InviteFile:
    """The invites of a relay alone (``invites.json``, 0600, in its state directory), which
    ``relay invite create`` writes and the relay reads, two processes: every change is one
    read and one write of the whole file."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def add(self, key: str, invite: Invite) -> None:
        invites = self._load()
        invites[key] = invite
        self._save(invites)

    def take(self, key: str) -> Invite:
        """Use one of the invite's uses; ``InvalidToken`` when unknown, used up or expired."""
        invites = self._load()
        invite = invites.get(key)
        if invite is None:
            raise InvalidToken(UNKNOWN_INVITE)
        if invite.expires_at <= time.time():
            del invites[key]
            self._save(invites)
            raise InvalidToken(EXPIRED_INVITE)
        invite.uses_left -= 1
        if invite.uses_left <= 0:
            del invites[key]
        self._save(invites)
        return invite

    def entries(self, tenant_id: str | None) -> list[InviteEntry]:
        """The usable invites of ``tenant_id`` (of every tenant when None), soonest to
        expire first."""
        usable = _usable(self._load(), tenant_id)
        return sorted(
            (InviteEntry.of(key, invite) for key, invite in usable.items()),
            key=lambda entry: entry.expires_at,
        )

    def revoke(self, tenant_id: str | None, invite_id: str) -> bool:
        """Remove the usable invite named ``invite_id`` of ``tenant_id`` (any tenant's when
        None); False when there is not exactly one."""
        if not is_invite_id(invite_id):
            return False
        invites = self._load()
        named = [key for key in _usable(invites, tenant_id) if key[:INVITE_ID_LENGTH] == invite_id]
        if len(named) != 1:
            return False
        del invites[named[0]]
        self._save(invites)
        return True

    def _load(self) -> dict[str, Invite]:
        try:
            raw = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        return {key: Invite(**value) for key, value in raw.items()}

    def _save(self, invites: dict[str, Invite]) -> None:
        body = {key: asdict(value) for key, value in invites.items()}
        write_secret(self._path, json.dumps(body).encode())
