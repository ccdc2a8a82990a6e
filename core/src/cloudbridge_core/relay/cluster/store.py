"""What relays share, and the interface every backend implements.

A relay keeps serving what it holds whatever its backend does: the sessions, the members of
its own meshes, relaying between its own devices. The backend adds what other relays hold —
their devices (presence and mesh membership), signals and events for them — and what must be
decided once for the whole cluster: an invite's uses, a tenant's sessions, revocations.
A backend that cannot be reached raises ``ServerUnavailable``; callers degrade what
is cross-relay and fail closed where correctness needs it (an invite, a revocation).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from cloudbridge_core.providers import Claims
from cloudbridge_core.relay.ipam import Lease

_T = TypeVar("_T")

#: hex characters of a code's digest that name its invite (``relay invite list``/``revoke``)
INVITE_ID_LENGTH = 12
_INVITE_ID = re.compile(f"[0-9a-f]{{{INVITE_ID_LENGTH}}}")


def is_invite_id(text: str) -> bool:
    return _INVITE_ID.fullmatch(text) is not None


@dataclass
class Invite:
    """An invite code's grant, kept under the hash of its code."""

    tenant_id: str
    permissions: list[str]
    expires_at: float
    uses_left: int

    def usable(self, now: float) -> bool:
        return self.expires_at > now and self.uses_left > 0


@dataclass(frozen=True)
class InviteEntry:
    """An invite as it is listed. ``invite_id`` names it: the start of its code's digest,
    which tells nothing of the code (the relay keeps no code to show)."""

    invite_id: str
    tenant_id: str
    permissions: list[str]
    expires_at: float
    uses_left: int

    @classmethod
    def of(cls, digest: str, invite: Invite) -> InviteEntry:
        return cls(
            digest[:INVITE_ID_LENGTH],
            invite.tenant_id,
            list(invite.permissions),
            invite.expires_at,
            invite.uses_left,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RelayRecord:
    """A live relay of the cluster: where clients reach it (``host``, the name its
    certificate holds) and where the other relays reach its link (``link``, host:port)."""

    host: str
    link: str


@dataclass(frozen=True)
class Device:
    """A device in a tenant's mesh and the relay holding its session (``relay``)."""

    relay: str
    info: dict[str, str]


@dataclass(frozen=True)
class Revocation:
    """Tokens no relay accepts any more: the one with id ``token_id``, or every token of
    ``subject`` issued up to ``revoked_at``; forgotten after ``until`` (when every token it
    covers has expired)."""

    tenant_id: str
    revoked_at: float
    until: float
    token_id: str | None = None
    subject: str | None = None

    @property
    def key(self) -> str:
        return (
            f"{self.tenant_id}/id/{self.token_id}"
            if self.token_id
            else (f"{self.tenant_id}/sub/{self.subject}")
        )

    def covers(self, claims: Claims) -> bool:
        if claims.tenant_id != self.tenant_id:
            return False
        if self.token_id is not None:
            return claims.token_id == self.token_id
        issued = claims.issued_at if claims.issued_at is not None else 0.0
        return claims.subject == self.subject and issued <= self.revoked_at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClusterEvent:
    """A small message between relays: ``kind`` is ``joined`` or ``left`` (a device of
    ``tenant_id`` on the sending relay, ``body`` its info), ``signal`` (``body``: from,
    to, kind, body of a peer signal) or ``revoked`` (``body``: a revocation)."""

    kind: str
    tenant_id: str
    body: dict[str, Any]
    sender: str = ""


@dataclass(frozen=True)
class Handlers:
    """What a backend calls: ``event`` for each ``revoked`` event (this relay's own
    included) and each other event of another relay; ``resynced`` once
    it is reachable again after an outage (the relay then publishes what it holds again);
    ``relays_gone`` with the names of relays whose presence lapsed."""

    event: Callable[[ClusterEvent], Awaitable[None]]
    resynced: Callable[[], Awaitable[None]]
    relays_gone: Callable[[set[str]], Awaitable[None]]


class ClusterStore(Protocol):
    """The relay's shared state. ``member`` names this relay in the cluster."""

    member: str

    @property
    def healthy(self) -> bool:
        """False while the backend cannot be reached."""
        ...

    async def start(self, handlers: Handlers, record: RelayRecord) -> None:
        """Announce this relay (``record``) and deliver the other relays' events to
        ``handlers`` until :meth:`aclose`."""
        ...

    async def aclose(self) -> None:
        """Stop; also for a store never started (a command's one operation)."""
        ...

    async def relays(self) -> dict[str, RelayRecord]:
        """The live relays by name (this one included)."""
        ...

    async def put_device(self, tenant_id: str, peer_id: str, info: dict[str, str]) -> None:
        """Record that this relay holds ``peer_id``'s session, and tell the other relays."""
        ...

    async def drop_device(self, tenant_id: str, peer_id: str) -> None:
        """Forget ``peer_id`` if this relay holds it, and tell the other relays."""
        ...

    async def devices(self, tenant_id: str) -> dict[str, Device]:
        """The tenant's devices on live relays, by peer id (this relay's included)."""
        ...

    async def send(self, relay: str, event: ClusterEvent) -> None:
        """Deliver ``event`` to the relay named ``relay`` (dropped if it is gone)."""
        ...

    async def add_invite(self, digest: str, invite: Invite) -> None: ...

    async def take_invite(self, digest: str) -> Invite:
        """Use one of the invite's uses, atomically across the cluster; ``InvalidToken``
        when it is unknown, used up or expired."""
        ...

    async def list_invites(self, tenant_id: str | None) -> list[InviteEntry]:
        """The invites still usable (neither expired nor used up) of ``tenant_id``, or of
        every tenant when it is None; the soonest to expire first."""
        ...

    async def revoke_invite(self, tenant_id: str | None, invite_id: str) -> bool:
        """Remove the usable invite named ``invite_id`` (as :meth:`list_invites` shows it);
        False when there is none, and when it is not ``tenant_id``'s (unless that is None):
        another tenant's invites are out of sight."""
        ...

    async def open_session(self, tenant_id: str, session_id: str, limit: int) -> bool:
        """Count a session of ``tenant_id`` held here; False (not counted) when the tenant
        holds ``limit`` sessions across the cluster already. ``ServerUnavailable`` while
        the backend cannot be reached: the relay then serves the session on its own count,
        and the backend counts it across the cluster once it is back."""
        ...

    async def close_session(self, tenant_id: str, session_id: str) -> None: ...

    async def revoke(self, revocation: Revocation) -> None:
        """Record ``revocation`` and tell every relay (this one included)."""
        ...

    async def revocations(self) -> list[Revocation]:
        """Every revocation still in force."""
        ...

    async def ipam_update(self, tenant_id: str, change: Callable[[dict[str, Lease]], _T]) -> _T:
        """Apply ``change`` to the tenant's overlay leases (by device key; it changes the
        dict in place) and save the result, atomically across the cluster; ``change``'s
        result. ``change`` may run more than once (again when another relay changed the
        leases meanwhile), so it does nothing but change the dict."""
        ...

    async def ipam_leases(self, tenant_id: str) -> dict[str, Lease]:
        """The tenant's overlay leases by device key."""
        ...
