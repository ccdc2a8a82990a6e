"""The backend of a relay alone (``server.cluster.backend: memory``): nothing to run.

Devices and sessions live in this process. Invites and revocations live in the state
directory, because ``relay invite create`` and ``relay token revoke`` are other processes:
the relay reads revocations again when the file changes (checked every
:data:`REVOCATIONS_POLL` seconds), so a revocation reaches open sessions within seconds.
Overlay leases live in ``ipam.json`` there, read once (when the relay starts, so a damaged
file stops it there) and written at each change, for ``relay ipam list`` to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

from cloudbridge_core.log import get_logger
from cloudbridge_core.relay.cluster.store import (
    ClusterEvent,
    Device,
    Handlers,
    Invite,
    InviteEntry,
    RelayRecord,
    Revocation,
)
from cloudbridge_core.relay.invites import InviteFile
from cloudbridge_core.relay.ipam import (
    Lease,
    Leases,
    one_lease_per_address,
    read_leases,
    write_leases,
)
from cloudbridge_core.relay.state import INVITES_FILE, IPAM_FILE, REVOCATIONS_FILE
from cloudbridge_core.secretfile import write_secret

log = get_logger("relay.cluster")

_T = TypeVar("_T")

#: how often the relay looks for revocations written by ``relay token revoke``
REVOCATIONS_POLL = 1.0


class MemoryStore:
    def __init__(self, state_dir: Path, member: str = "relay") -> None:
        self.member = member
        self._invites = InviteFile(state_dir / INVITES_FILE)
        self._revocations_file = state_dir.absolute() / REVOCATIONS_FILE
        self._ipam_file = state_dir.absolute() / IPAM_FILE
        self._leases: Leases | None = None
        self._devices: dict[str, dict[str, Device]] = {}
        self._sessions: dict[str, set[str]] = {}
        self._record = RelayRecord("", "")
        self._watcher: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return True

    async def start(self, handlers: Handlers, record: RelayRecord) -> None:
        self._record = record
        self._tenant_leases()
        # what is in force now is known: only what is written after this is news (by key,
        # whole: a subject revoked again later is news too)
        known = {r.key: r for r in self._read_revocations()}
        self._watcher = asyncio.create_task(
            self._watch_revocations(handlers, known, self._changed_at())
        )

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def relays(self) -> dict[str, RelayRecord]:
        return {self.member: self._record}

    async def put_device(self, tenant_id: str, peer_id: str, info: dict[str, str]) -> None:
        self._devices.setdefault(tenant_id, {})[peer_id] = Device(self.member, dict(info))

    async def drop_device(self, tenant_id: str, peer_id: str) -> None:
        devices = self._devices.get(tenant_id, {})
        devices.pop(peer_id, None)
        if not devices:
            self._devices.pop(tenant_id, None)

    async def devices(self, tenant_id: str) -> dict[str, Device]:
        return dict(self._devices.get(tenant_id, {}))

    async def send(self, relay: str, event: ClusterEvent) -> None:
        """There is no other relay: nothing is delivered."""

    async def add_invite(self, digest: str, invite: Invite) -> None:
        self._invites.add(digest, invite)

    async def take_invite(self, digest: str) -> Invite:
        return self._invites.take(digest)

    async def list_invites(self, tenant_id: str | None) -> list[InviteEntry]:
        return self._invites.entries(tenant_id)

    async def revoke_invite(self, tenant_id: str | None, invite_id: str) -> bool:
        return self._invites.revoke(tenant_id, invite_id)

    async def open_session(self, tenant_id: str, session_id: str, limit: int) -> bool:
        sessions = self._sessions.setdefault(tenant_id, set())
        if len(sessions) >= limit:
            return False
        sessions.add(session_id)
        return True

    async def close_session(self, tenant_id: str, session_id: str) -> None:
        sessions = self._sessions.get(tenant_id, set())
        sessions.discard(session_id)
        if not sessions:
            self._sessions.pop(tenant_id, None)

    async def revoke(self, revocation: Revocation) -> None:
        revocations = {r.key: r for r in self._read_revocations()}
        revocations[revocation.key] = revocation
        body = [r.to_dict() for r in revocations.values()]
        write_secret(self._revocations_file, json.dumps(body).encode())

    async def revocations(self) -> list[Revocation]:
        return self._read_revocations()

    async def ipam_update(self, tenant_id: str, change: Callable[[dict[str, Lease]], _T]) -> _T:
        tenants = self._tenant_leases()
        leases = tenants.get(tenant_id, {})
        before = {key: asdict(lease) for key, lease in leases.items()}
        result = change(leases)
        if {key: asdict(lease) for key, lease in leases.items()} != before:
            if leases:
                tenants[tenant_id] = leases
            else:
                tenants.pop(tenant_id, None)
            self._save_leases()
        return result

    async def ipam_leases(self, tenant_id: str) -> dict[str, Lease]:
        leases = self._tenant_leases().get(tenant_id, {})
        return {key: Lease(**asdict(lease)) for key, lease in leases.items()}

    def _tenant_leases(self) -> Leases:
        """Every tenant's leases, read from ``ipam.json`` the first time; raises
        ``CloudBridgeError`` naming the file when it is damaged."""
        if self._leases is None:
            self._leases = read_leases(self._ipam_file)
            dropped = [one_lease_per_address(t, leases) for t, leases in self._leases.items()]
            if any(dropped):
                self._save_leases()
        return self._leases

    def _save_leases(self) -> None:
        try:
            write_leases(self._ipam_file, self._tenant_leases())
        except OSError as exc:  # the leases stand meanwhile; the next save may succeed
            log.error(
                "overlay_leases_not_saved",
                path=str(self._ipam_file),
                reason=exc.strerror or str(exc),
                note="a relay restarted before the next save may move devices to new addresses",
            )

    def _read_revocations(self) -> list[Revocation]:
        try:
            raw = json.loads(self._revocations_file.read_text())
        except FileNotFoundError:
            return []
        now = time.time()
        return [r for r in (Revocation(**item) for item in raw) if r.until > now]

    async def _watch_revocations(
        self, handlers: Handlers, seen: dict[str, Revocation], changed_at: int
    ) -> None:
        while True:
            await asyncio.sleep(REVOCATIONS_POLL)
            if self._changed_at() == changed_at:
                continue
            changed_at = self._changed_at()
            for revocation in self._read_revocations():
                if seen.get(revocation.key) != revocation:
                    seen[revocation.key] = revocation
                    event = ClusterEvent("revoked", revocation.tenant_id, revocation.to_dict())
                    await handlers.event(event)

    def _changed_at(self) -> int:
        try:
            return self._revocations_file.stat().st_mtime_ns
        except FileNotFoundError:
            return 0
