"""The backend of a relay cluster (``server.cluster.backend: redis``).

Every key starts with the cluster's name (``server.cluster.name``), so clusters may share
a Redis. This relay's presence is a key that expires after ``presence_ttl`` unless it is
refreshed (every third of it); its devices and sessions count only while it is present.
Events travel by pub/sub: a channel every relay reads, and one per relay for ``send``.
What must be decided once for the whole cluster (an invite's uses, a tenant's sessions) is
one Lua script, atomic in Redis. A tenant's overlay leases are one hash (device key ->
lease), changed by an optimistic transaction: WATCH, read, apply the change ipam.py
computes, MULTI/EXEC, and again from the read when another relay changed the hash
meanwhile. Not a Lua script, so the allocation rules stay in one place (Python); not a
lock, so a relay dying mid-change leaves nothing to expire, and a join waits on no one:
conflicts need two joins of one tenant at once, and each retry follows someone's success.

What is read from Redis was written by another relay, or by anyone who can reach that
Redis: each field is checked before use, and what does not fit is dropped (logged at
debug). The URL may hold a password: messages and logs name the host and port only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError
from redis.typing import EncodableT

from cloudbridge_core.errors import ConfigError, ConfigIssue, InvalidToken, ServerUnavailable
from cloudbridge_core.log import get_logger
from cloudbridge_core.relay.cluster.metrics import ClusterMetrics
from cloudbridge_core.relay.cluster.redis_scripts import (
    DROP_DEVICE,
    LIVE_RELAYS,
    OPEN_SESSION,
    REFRESH_SESSIONS,
    TAKE_INVITE,
)
from cloudbridge_core.relay.cluster.store import (
    ClusterEvent,
    Device,
    Handlers,
    Invite,
    InviteEntry,
    RelayRecord,
    Revocation,
    is_invite_id,
)
from cloudbridge_core.relay.cluster.wire import (
    decode_device,
    decode_event,
    decode_record,
    decode_revocation,
)
from cloudbridge_core.relay.invites import EXPIRED_INVITE, UNKNOWN_INVITE
from cloudbridge_core.relay.ipam import Lease, one_lease_per_address
from cloudbridge_core.settings.sections import ClusterSettings

log = get_logger("relay.cluster")

_T = TypeVar("_T")

#: seconds a command may take before Redis counts as unreachable
SOCKET_TIMEOUT = 1.0
#: seconds between attempts to reach Redis again after an outage
RECONNECT_DELAY = 1.0
#: an expired invite is kept this long, so its late user hears "expired", not "unknown"
INVITE_GRACE = 3600
#: changes of one tenant's leases tried before giving up, each lost to another relay's
IPAM_ATTEMPTS = 50
#: longest lease read from Redis (a device's name is short; this is a memory bound)
MAX_LEASE_BYTES = 4096
#: longest permissions field of an invite read from Redis (a memory bound)
MAX_INVITE_PERMISSIONS_BYTES = 4096


def _first_line(path: str) -> str:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        issue = ConfigIssue("server.cluster.redis_password_file", f"cannot read {path}: {error}")
        raise ConfigError([issue]) from None
    return lines[0] if lines else ""


async def _tell(handler: str, call: Awaitable[None]) -> None:
    """Call one of the relay's handlers: its failure is logged, and must not stop this
    store keeping the relay present and delivering its events."""
    try:
        await call
    except Exception:  # the relay's own bug, whatever it is: logged with its traceback
        log.exception("cluster_handler_failed", handler=handler)


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _decode_lease(raw: bytes) -> Lease | None:
    """A lease as a relay wrote it, else ``None`` (anyone who reaches Redis can write)."""
    if len(raw) > MAX_LEASE_BYTES:
        return None
    try:
        fields = json.loads(raw)
        lease = Lease(
            address=str(ipaddress.IPv4Address(fields["address"])),
            device=fields["device"],
            peer_id=fields["peer_id"],
            last_seen=fields["last_seen"],
        )
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None
    texts = isinstance(lease.device, str) and isinstance(lease.peer_id, str)
    number = isinstance(lease.last_seen, int) and not isinstance(lease.last_seen, bool)
    return lease if texts and number else None


def _decode_invite(fields: dict[Any, Any]) -> Invite | None:
    """An invite's hash as a relay wrote it, else ``None`` (anyone who reaches Redis can
    write)."""
    try:
        permissions = fields[b"permissions"]
        if len(permissions) > MAX_INVITE_PERMISSIONS_BYTES:
            return None
        invite = Invite(
            fields[b"tenant_id"].decode(),
            json.loads(permissions),
            float(fields[b"expires_at"]),
            int(fields[b"uses_left"]),
        )
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(invite.permissions, list) or not all(
        isinstance(p, str) for p in invite.permissions
    ):
        return None
    return invite


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))


def _host_port(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


class RedisStore:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        cluster: str,
        member: str,
        presence_ttl: float,
        address: str,
        metrics: ClusterMetrics | None = None,
    ) -> None:
        self.member = member
        self._client = client
        self._prefix = f"{cluster}:"
        self._ttl = presence_ttl
        self._address = address
        self._metrics = metrics
        self._broadcast = f"{self._prefix}events"
        self._healthy = True
        self._record = RelayRecord("", "")
        self._sessions: dict[str, set[str]] = {}
        self._live: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._scripts = {
            name: client.register_script(text)
            for name, text in (
                ("take_invite", TAKE_INVITE),
                ("open_session", OPEN_SESSION),
                ("refresh_sessions", REFRESH_SESSIONS),
                ("drop_device", DROP_DEVICE),
                ("relays", LIVE_RELAYS),
            )
        }

    @classmethod
    def from_settings(
        cls, settings: ClusterSettings, member: str, metrics: ClusterMetrics | None = None
    ) -> RedisStore:
        """A store on ``server.cluster.redis_url``; the first line of
        ``redis_password_file`` overrides a password in the URL, and a ``rediss://``
        server is verified against ``redis_ca_file`` when set (else the system's CAs)."""
        url = settings.redis_url
        if url is None:
            issue = ConfigIssue("server.cluster.redis_url", "backend redis needs a Redis URL")
            raise ConfigError([issue])
        options: dict[str, Any] = {}
        if settings.redis_password_file is not None:
            options["password"] = _first_line(settings.redis_password_file)
            url = _without_password(url)  # redis-py prefers the URL's to the argument
        if url.startswith("rediss://"):
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
            options["ssl_check_hostname"] = True
            if settings.redis_ca_file is not None:
                options["ssl_ca_certs"] = settings.redis_ca_file
        client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            # an outage is noticed at once and handled here, not hidden by retries
            retry=Retry(NoBackoff(), 0),
            **options,
        )
        return cls(
            client,
            cluster=settings.name,
            member=member,
            presence_ttl=settings.presence_ttl,
            address=_host_port(url),
            metrics=metrics,
        )

    @property
    def healthy(self) -> bool:
        return self._healthy

    # ---- lifecycle ----

    async def start(self, handlers: Handlers, record: RelayRecord) -> None:
        """Announce this relay and listen; a Redis that cannot be reached now is tried
        again in the background (``healthy`` is False until then)."""
        self._record = record
        subscribed = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._listen(handlers, subscribed)),
            asyncio.create_task(self._keep_presence(handlers)),
        ]
        await subscribed
        await self._forget_own_devices()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._client.aclose()

    # ---- presence ----

    async def relays(self) -> dict[str, RelayRecord]:
        async with self._operation("relays"):
            raw = await self._scripts["relays"](
                keys=[f"{self._prefix}relays"], args=[f"{self._prefix}relay:"]
            )
        live: dict[str, RelayRecord] = {}
        for name, value in zip(raw[::2], raw[1::2], strict=True):
            record = decode_record(value)
            if record is not None:
                live[_text(name)] = record
        if self._metrics is not None:
            self._metrics.relays.set(len(live))
        return live

    async def _announce(self, *, restore: bool = False) -> None:
        """Refresh this relay's presence and the sessions it holds; ``restore`` (on each
        subscription: Redis may be back without the entries) writes the sessions again."""
        value = json.dumps(asdict(self._record))
        async with self._transaction("presence") as pipe:
            pipe.set(f"{self._prefix}relay:{self.member}", value, px=int(self._ttl * 1000))
            pipe.sadd(f"{self._prefix}relays", self.member)
        mode = "restore" if restore else "refresh"
        async with self._operation("refresh_sessions"):
            for tenant_id, sessions in list(self._sessions.items()):
                await self._scripts["refresh_sessions"](
                    keys=[self._sessions_key(tenant_id)],
                    args=[self._ttl, mode, *(f"{self.member}/{s}" for s in sessions)],
                )

    async def _keep_presence(self, handlers: Handlers) -> None:
        """Refresh this relay's presence and sessions, and notice relays that are gone."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            with contextlib.suppress(ServerUnavailable):  # the listener reconnects
                await self._announce()
                live = set(await self.relays())
                gone = self._live - live
                self._live = live
                if gone:
                    await self._forget_devices(gone)
                    await _tell("relays_gone", handlers.relays_gone(gone))

    async def _forget_devices(self, gone: set[str]) -> list[tuple[str, Device]]:
        """Remove the devices ``gone`` relays held; each, with its tenant."""
        forgotten: list[tuple[str, Device]] = []
        mesh = f"{self._prefix}mesh:"
        async with self._operation("forget_devices"):
            async for key in self._client.scan_iter(match=f"{mesh}*"):
                devices = await self._client.hgetall(key)
                stale = {
                    peer_id: device
                    for peer_id, value in devices.items()
                    if (device := decode_device(value)) is not None and device.relay in gone
                }
                if stale:
                    await self._client.hdel(key, *stale)
                    tenant_id = _text(key).removeprefix(mesh)
                    forgotten += [(tenant_id, device) for device in stale.values()]
        return forgotten

    async def _forget_own_devices(self) -> None:
        """A relay (re)starting holds no device: what its previous run left (a crash, a
        restart quicker than its presence's lapse) leaves the meshes of the others."""
        with contextlib.suppress(ServerUnavailable):  # the devices lapse with its presence
            for tenant_id, device in await self._forget_devices({self.member}):
                event = ClusterEvent("left", tenant_id, dict(device.info))
                async with self._operation("publish"):
                    await self._client.publish(self._broadcast, self._encode(event))

    # ---- devices ----

    def _mesh_key(self, tenant_id: str) -> str:
        return f"{self._prefix}mesh:{tenant_id}"

    async def put_device(self, tenant_id: str, peer_id: str, info: dict[str, str]) -> None:
        device = json.dumps({"relay": self.member, "info": info})
        event = self._encode(ClusterEvent("joined", tenant_id, dict(info)))
        async with self._transaction("put_device") as pipe:
            pipe.hset(self._mesh_key(tenant_id), peer_id, device)
            pipe.publish(self._broadcast, event)

    async def drop_device(self, tenant_id: str, peer_id: str) -> None:
        async with self._operation("drop_device"):
            dropped = await self._scripts["drop_device"](
                keys=[self._mesh_key(tenant_id)], args=[peer_id, self.member]
            )
            device = decode_device(dropped) if dropped else None
            if device is not None:
                event = ClusterEvent("left", tenant_id, dict(device.info))
                await self._client.publish(self._broadcast, self._encode(event))

    async def devices(self, tenant_id: str) -> dict[str, Device]:
        live = await self.relays()
        async with self._operation("devices"):
            raw = await self._client.hgetall(self._mesh_key(tenant_id))
        devices: dict[str, Device] = {}
        for peer_id, value in raw.items():
            device = decode_device(value)
            if device is not None and device.relay in live:
                devices[_text(peer_id)] = device
        return devices

    # ---- events ----

    def _encode(self, event: ClusterEvent) -> str:
        return json.dumps(asdict(replace(event, sender=self.member)))

    async def send(self, relay: str, event: ClusterEvent) -> None:
        async with self._operation("send"):
            await self._client.publish(f"{self._prefix}inbox:{relay}", self._encode(event))

    async def _listen(self, handlers: Handlers, subscribed: asyncio.Future[None]) -> None:
        """Deliver events until cancelled; after an outage, subscribe again, publish the
        presence again and call ``handlers.resynced``."""
        recovering = False
        while True:
            try:
                async with self._subscription() as pubsub:
                    await self._announce(restore=True)
                    if not subscribed.done():  # later, _keep_presence notices who left
                        self._live = set(await self.relays())
                        subscribed.set_result(None)
                    self._set_healthy(True)
                    if recovering:
                        log.info("cluster_backend_back", backend=self._address)
                        await _tell("resynced", handlers.resynced())
                    recovering = False
                    while self._healthy:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=SOCKET_TIMEOUT
                        )
                        if message is not None:
                            await self._deliver(handlers, message["data"])
            except (RedisError, OSError) as error:
                self._lost(error)
            except ServerUnavailable as error:  # an operation above marked it unhealthy
                log.debug("cluster_listener_retrying", reason=error.message)
            if not subscribed.done():
                subscribed.set_result(None)
            recovering = True
            await asyncio.sleep(RECONNECT_DELAY)

    @contextlib.asynccontextmanager
    async def _subscription(self) -> AsyncIterator[PubSub]:
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self._broadcast, f"{self._prefix}inbox:{self.member}")
            yield pubsub
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py

    async def _deliver(self, handlers: Handlers, data: object) -> None:
        event = decode_event(data)
        if event is None:
            log.debug("cluster_event_malformed", backend=self._address)
            return
        if event.sender != self.member or event.kind == "revoked":
            await _tell("event", handlers.event(event))

    # ---- invites ----

    def _invite_key(self, digest: str) -> str:
        return f"{self._prefix}invite:{digest}"

    def _tenant_invites_key(self, tenant_id: str) -> str:
        """The set of the tenant's invites (their digests). A member whose invite lapsed
        (its key expires ``INVITE_GRACE`` after the invite) leaves when invites are listed."""
        return f"{self._prefix}invites:{tenant_id}"

    async def add_invite(self, digest: str, invite: Invite) -> None:
        key = self._invite_key(digest)
        async with self._transaction("add_invite") as pipe:
            pipe.hset(
                key,
                mapping={
                    "tenant_id": invite.tenant_id,
                    "permissions": json.dumps(invite.permissions),
                    "expires_at": repr(invite.expires_at),
                    "uses_left": invite.uses_left,
                },
            )
            pipe.expireat(key, int(invite.expires_at) + INVITE_GRACE)
            pipe.sadd(self._tenant_invites_key(invite.tenant_id), digest)

    async def take_invite(self, digest: str) -> Invite:
        async with self._operation("take_invite"):
            raw = await self._scripts["take_invite"](
                keys=[self._invite_key(digest)], args=[self._tenant_invites_key(""), digest]
            )
        status = raw[0]
        if status == b"expired":
            raise InvalidToken(EXPIRED_INVITE)
        try:
            _, tenant_id, permissions, expires_at, uses_left = raw
            invite = Invite(
                tenant_id.decode(),
                json.loads(permissions),
                float(expires_at),
                int(uses_left),
            )
        except (ValueError, UnicodeDecodeError):  # unknown, or not written by a relay
            raise InvalidToken(UNKNOWN_INVITE) from None
        if not isinstance(invite.permissions, list) or not all(
            isinstance(p, str) for p in invite.permissions
        ):
            raise InvalidToken(UNKNOWN_INVITE)
        return invite

    async def list_invites(self, tenant_id: str | None) -> list[InviteEntry]:
        usable = await self._usable_invites(tenant_id)
        entries = [InviteEntry.of(digest, invite) for digest, invite in usable.items()]
        return sorted(entries, key=lambda entry: entry.expires_at)

    async def revoke_invite(self, tenant_id: str | None, invite_id: str) -> bool:
        if not is_invite_id(invite_id):
            return False
        usable = await self._usable_invites(tenant_id)
        named = [digest for digest in usable if digest.startswith(invite_id)]
        if len(named) != 1:
            return False
        digest = named[0]
        async with (
            self._operation("revoke_invite"),
            self._client.pipeline(transaction=True) as pipe,
        ):
            pipe.delete(self._invite_key(digest))
            pipe.srem(self._tenant_invites_key(usable[digest].tenant_id), digest)
            deleted, _ = await pipe.execute()
        return bool(deleted)  # not when its last use was taken meanwhile

    async def _usable_invites(self, tenant_id: str | None) -> dict[str, Invite]:
        """The usable invites of ``tenant_id`` (of every tenant when None) by digest; the
        members of the tenants' sets whose invites are gone leave them."""
        async with self._operation("list_invites"):
            if tenant_id is None:
                pattern = self._tenant_invites_key("*")
                sets = [_text(key) async for key in self._client.scan_iter(match=pattern)]
            else:
                sets = [self._tenant_invites_key(tenant_id)]
            async with self._client.pipeline(transaction=False) as pipe:
                for key in sets:
                    pipe.smembers(key)
                members = [
                    (key, _text(digest))
                    for key, digests in zip(sets, await pipe.execute(), strict=True)
                    for digest in digests
                ]
                for _, digest in members:
                    pipe.hgetall(self._invite_key(digest))
                hashes = await pipe.execute()
            gone = [member for member, fields in zip(members, hashes, strict=True) if not fields]
            if gone:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, digest in gone:
                        pipe.srem(key, digest)
                    await pipe.execute()
        now = time.time()
        usable: dict[str, Invite] = {}
        for (key, digest), fields in zip(members, hashes, strict=True):
            if not fields:
                continue
            invite = _decode_invite(fields)
            # a tenant's set holds only its own invites, unless someone else wrote there
            if invite is None or key != self._tenant_invites_key(invite.tenant_id):
                log.debug("invite_malformed", backend=self._address)
            elif invite.usable(now):
                usable[digest] = invite
        return usable

    # ---- sessions ----

    def _sessions_key(self, tenant_id: str) -> str:
        return f"{self._prefix}sessions:{tenant_id}"

    async def open_session(self, tenant_id: str, session_id: str, limit: int) -> bool:
        try:
            async with self._operation("open_session"):
                opened = await self._scripts["open_session"](
                    keys=[self._sessions_key(tenant_id)],
                    args=[f"{self.member}/{session_id}", limit, self._ttl],
                )
        except ServerUnavailable:
            # the relay serves it on its own count meanwhile; it counts across the cluster
            # again once Redis is back (the restore of the next subscription)
            self._sessions.setdefault(tenant_id, set()).add(session_id)
            raise
        if opened:
            self._sessions.setdefault(tenant_id, set()).add(session_id)
        return bool(opened)

    async def close_session(self, tenant_id: str, session_id: str) -> None:
        sessions = self._sessions.get(tenant_id, set())
        sessions.discard(session_id)
        if not sessions:
            self._sessions.pop(tenant_id, None)
        async with self._operation("close_session"):
            await self._client.zrem(self._sessions_key(tenant_id), f"{self.member}/{session_id}")

    # ---- revocations ----

    async def revoke(self, revocation: Revocation) -> None:
        event = self._encode(ClusterEvent("revoked", revocation.tenant_id, revocation.to_dict()))
        async with self._transaction("revoke") as pipe:
            pipe.hset(
                f"{self._prefix}revocations",
                revocation.key,
                json.dumps(revocation.to_dict()),
            )
            pipe.publish(self._broadcast, event)

    async def revocations(self) -> list[Revocation]:
        key = f"{self._prefix}revocations"
        async with self._operation("revocations"):
            raw = await self._client.hgetall(key)
        now = time.time()
        in_force: list[Revocation] = []
        lapsed: list[bytes | str] = []
        for field, value in raw.items():
            revocation = decode_revocation(value)
            if revocation is not None and revocation.until > now:
                in_force.append(revocation)
            else:
                lapsed.append(field)
        if lapsed:
            async with self._operation("revocations"):
                await self._client.hdel(key, *lapsed)
        return in_force

    # ---- overlay leases ----

    def _ipam_key(self, tenant_id: str) -> str:
        return f"{self._prefix}ipam:{tenant_id}"

    async def ipam_update(self, tenant_id: str, change: Callable[[dict[str, Lease]], _T]) -> _T:
        key = self._ipam_key(tenant_id)
        async with self._operation("ipam_update"), self._client.pipeline() as pipe:
            for _ in range(IPAM_ATTEMPTS):
                try:
                    await pipe.watch(key)
                    raw = await pipe.hgetall(key)
                    stored = self._leases(tenant_id, raw)
                    leases = {k: Lease(**asdict(lease)) for k, lease in stored.items()}
                    result = change(leases)
                    written: dict[EncodableT, EncodableT] = {
                        k: json.dumps(asdict(lease))
                        for k, lease in leases.items()
                        if stored.get(k) != lease
                    }
                    # what was dropped as unreadable goes too, so the hash stays clean
                    gone = [k for k in raw if _text(k) not in leases]
                    pipe.multi()  # type: ignore[no-untyped-call]  # unannotated in redis-py
                    if written:
                        pipe.hset(key, mapping=written)
                    if gone:
                        pipe.hdel(key, *gone)
                    await pipe.execute()
                    return result
                except WatchError:
                    continue  # another relay changed the leases: read them again
        raise ServerUnavailable(
            f"the overlay leases of tenant {tenant_id} changed {IPAM_ATTEMPTS} times"
            " while this relay was changing them"
        )

    async def ipam_leases(self, tenant_id: str) -> dict[str, Lease]:
        async with self._operation("ipam_leases"):
            raw = await self._client.hgetall(self._ipam_key(tenant_id))
        return self._leases(tenant_id, raw)

    def _leases(self, tenant_id: str, raw: dict[Any, Any]) -> dict[str, Lease]:
        leases: dict[str, Lease] = {}
        for key, value in raw.items():
            lease = _decode_lease(value)
            if lease is None:
                log.debug("overlay_lease_malformed", backend=self._address, tenant_id=tenant_id)
            else:
                leases[_text(key)] = lease
        one_lease_per_address(tenant_id, leases)
        return leases

    # ---- outages ----

    @contextlib.asynccontextmanager
    async def _transaction(self, name: str) -> AsyncIterator[Pipeline]:
        """Commands queued in the block, run at its end as one MULTI/EXEC."""
        async with self._operation(name), self._client.pipeline(transaction=True) as pipe:
            yield pipe
            await pipe.execute()

    @contextlib.asynccontextmanager
    async def _operation(self, name: str) -> AsyncIterator[None]:
        """Time one operation, and turn Redis failing into ``ServerUnavailable``."""
        started = time.perf_counter()
        try:
            yield
        except (RedisError, OSError) as error:
            raise self._lost(error) from None
        if self._metrics is not None:
            self._metrics.latency.labels(name).observe(time.perf_counter() - started)

    def _lost(self, error: BaseException) -> ServerUnavailable:
        # redis-py's messages name host and port, never the URL or the password
        reason = f"{self._address}: {str(error)[:200] or type(error).__name__}"
        if self._healthy:
            log.warning("cluster_backend_lost", backend=self._address, error=type(error).__name__)
        self._set_healthy(False)
        if self._metrics is not None:
            self._metrics.errors.inc()
        return ServerUnavailable(f"the cluster's Redis cannot be reached: {reason}")

    def _set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy
        if self._metrics is not None:
            self._metrics.up.set(1 if healthy else 0)
