"""One contract for every backend of the relay's cluster store (``relay/cluster``): the
memory backend of a relay alone, and the Redis one against a real redis-server. Where
the backends differ (several relays share state only through Redis), the memory backend's
"second relay" is the same store, or a second store on the same state directory."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import redis.asyncio
from cloudbridge_core.config import load_config
from cloudbridge_core.errors import ConfigError, InvalidToken, ServerUnavailable
from cloudbridge_core.providers import Claims
from cloudbridge_core.relay.cluster.backend import open_store
from cloudbridge_core.relay.cluster.metrics import ClusterMetrics
from cloudbridge_core.relay.cluster.store import (
    ClusterEvent,
    ClusterStore,
    Handlers,
    Invite,
    InviteEntry,
    RelayRecord,
    Revocation,
)
from cloudbridge_core.relay.invites import EXPIRED_INVITE, UNKNOWN_INVITE, new_code
from cloudbridge_core.relay.ipam import UNAVAILABLE, Ipam
from cloudbridge_core.settings.sections import ClusterSettings
from cloudbridge_core.tlsutil import generate_ca, issue_server_certificate
from prometheus_client import CollectorRegistry
from redis_server import RedisServer, TlsFiles, redis_server

PASSWORD = "s3cret-redis-password"
URL_PASSWORD = "stale-url-password"
#: the shortest presence_ttl the schema allows, so that a lapsed relay is noticed soon
PRESENCE_TTL = 3.0
#: a bound on waits for what Redis carries (pub/sub, presence lapsing), never a timing claim
WAIT = 20.0


@dataclass
class Recorder:
    """Handlers that remember what the store told them, and wait for it."""

    events: list[ClusterEvent] = field(default_factory=list)
    gone: list[set[str]] = field(default_factory=list)
    resynced: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def handlers(self) -> Handlers:
        return Handlers(self._event, self._resynced, self._relays_gone)

    async def _event(self, event: ClusterEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def _resynced(self) -> None:
        self.resynced += 1
        self._changed.set()

    async def _relays_gone(self, names: set[str]) -> None:
        self.gone.append(names)
        self._changed.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def kinds(self) -> list[str]:
        return [event.kind for event in self.events]

    async def next_event(self, kind: str) -> ClusterEvent:
        """The first event of ``kind``, once it has come."""
        await self.wait_until(lambda: kind in self.kinds())
        return next(event for event in self.events if event.kind == kind)


@dataclass
class Cluster:
    """Opens stores of one backend, as a relay does (``open_store``)."""

    backend: str
    state_dir: Path
    redis: RedisServer | None
    password_file: Path | None

    def settings(self, member: str) -> ClusterSettings:
        # the password in the URL is stale: the password file overrides it
        url = self.redis.url if self.redis else None
        if url and self.password_file:
            url = url.replace("//", f"//:{URL_PASSWORD}@")
        return ClusterSettings(
            backend=self.backend,
            redis_url=url,
            redis_password_file=str(self.password_file) if self.password_file else None,
            redis_ca_file=None,
            name="test-cluster",
            member=member,
            link_port=7480,
            link_host=None,
            presence_ttl=PRESENCE_TTL,
        )

    def store(self, member: str, metrics: ClusterMetrics | None = None) -> ClusterStore:
        return open_store(self.settings(member), self.state_dir, metrics)


@pytest.fixture(params=["memory", "redis"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if request.param == "memory":
        yield Cluster("memory", state_dir, None, None)
        return
    password_file = tmp_path / "redis-password"
    password_file.write_text(f"{PASSWORD}\nnot the password\n")
    with redis_server(tmp_path, PASSWORD) as server:
        yield Cluster("redis", state_dir, server, password_file)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[Cluster]:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    password_file = tmp_path / "redis-password"
    password_file.write_text(f"{PASSWORD}\n")
    with redis_server(tmp_path, PASSWORD) as server:
        yield Cluster("redis", state_dir, server, password_file)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def record(member: str) -> RelayRecord:
    return RelayRecord(f"{member}.relay.test", f"{member}.relay.test:7480")


async def started(cluster: Cluster, member: str) -> tuple[ClusterStore, Recorder]:
    store, recorder = cluster.store(member), Recorder()
    await store.start(recorder.handlers, record(member))
    return store, recorder


def info(peer_id: str) -> dict[str, str]:
    return {"peer_id": peer_id, "name": f"host-{peer_id}"}


# ---- devices ----


def test_devices_are_listed_per_tenant(cluster: Cluster) -> None:
    async def scenario() -> None:
        store, _ = await started(cluster, "relay-a")
        try:
            await store.put_device("acme", "p1", info("p1"))
            await store.put_device("acme", "p2", info("p2"))
            await store.put_device("globex", "p3", info("p3"))
            acme = await store.devices("acme")
            assert {peer: (d.relay, d.info) for peer, d in acme.items()} == {
                "p1": ("relay-a", info("p1")),
                "p2": ("relay-a", info("p2")),
            }
            assert set(await store.devices("globex")) == {"p3"}
            await store.drop_device("acme", "p1")
            await store.drop_device("acme", "never-joined")
            assert set(await store.devices("acme")) == {"p2"}
            assert set(await store.devices("globex")) == {"p3"}
            assert await store.devices("initech") == {}
        finally:
            await store.aclose()

    run(scenario)


def test_a_relay_drops_only_the_devices_it_holds(redis_cluster: Cluster) -> None:
    async def scenario() -> None:
        a, _ = await started(redis_cluster, "relay-a")
        b, _ = await started(redis_cluster, "relay-b")
        try:
            await a.put_device("acme", "p1", info("p1"))
            await b.put_device("acme", "p2", info("p2"))
            await b.drop_device("acme", "p1")
            devices = await b.devices("acme")
            assert {peer: d.relay for peer, d in devices.items()} == {
                "p1": "relay-a",
                "p2": "relay-b",
            }
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario)


# ---- invites ----


def test_invites_are_used_up_expire_and_are_unknown_otherwise(cluster: Cluster) -> None:
    async def scenario() -> None:
        store = cluster.store("relay-a")  # never started: a command's one operation
        try:
            later = time.time() + 600
            await store.add_invite("once", Invite("acme", ["connect"], later, 1))
            taken = await store.take_invite("once")
            assert (taken.tenant_id, taken.permissions, taken.uses_left) == ("acme", ["connect"], 0)
            with pytest.raises(InvalidToken, match=re.escape(UNKNOWN_INVITE)):
                await store.take_invite("once")

            await store.add_invite("thrice", Invite("acme", ["connect", "mesh"], later, 3))
            left = [(await store.take_invite("thrice")).uses_left for _ in range(3)]
            assert left == [2, 1, 0]
            with pytest.raises(InvalidToken, match=re.escape(UNKNOWN_INVITE)):
                await store.take_invite("thrice")

            await store.add_invite("old", Invite("acme", ["connect"], time.time() - 1, 5))
            with pytest.raises(InvalidToken, match=re.escape(EXPIRED_INVITE)):
                await store.take_invite("old")
            with pytest.raises(InvalidToken, match=re.escape(UNKNOWN_INVITE)):
                await store.take_invite("old")

            with pytest.raises(InvalidToken, match=re.escape(UNKNOWN_INVITE)):
                await store.take_invite("never-issued")
        finally:
            await store.aclose()

    run(scenario)


def test_a_one_use_invite_taken_at_two_relays_at_once_is_taken_once(cluster: Cluster) -> None:
    async def scenario() -> None:
        a, b = cluster.store("relay-a"), cluster.store("relay-b")
        try:
            await a.add_invite("once", Invite("acme", ["connect"], time.time() + 600, 1))
            results = await asyncio.gather(
                a.take_invite("once"), b.take_invite("once"), return_exceptions=True
            )
            assert sorted(type(result).__name__ for result in results) == [
                "InvalidToken",
                "Invite",
            ]
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario)


def test_listed_invites_show_an_id_never_the_code_tenant_by_tenant(cluster: Cluster) -> None:
    async def scenario() -> None:
        store = cluster.store("relay-a")
        (code_a, digest_a), (code_b, digest_b), (code_g, digest_g) = (new_code() for _ in "abg")
        now = time.time()
        try:
            await store.add_invite(digest_a, Invite("acme", ["relay:connect"], now + 900, 2))
            await store.add_invite(digest_b, Invite("acme", ["p2p:mesh"], now + 300, 1))
            await store.add_invite(digest_g, Invite("globex", ["relay:connect"], now + 600, 1))
            every = await store.list_invites(None)
            assert every == [
                InviteEntry(digest_b[:12], "acme", ["p2p:mesh"], now + 300, 1),
                InviteEntry(digest_g[:12], "globex", ["relay:connect"], now + 600, 1),
                InviteEntry(digest_a[:12], "acme", ["relay:connect"], now + 900, 2),
            ]
            listed = json.dumps([entry.to_dict() for entry in every])
            assert not any(code in listed for code in (code_a, code_b, code_g))
            assert [e.invite_id for e in await store.list_invites("acme")] == [
                digest_b[:12],
                digest_a[:12],
            ]
            assert [e.tenant_id for e in await store.list_invites("globex")] == ["globex"]
            assert await store.list_invites("initech") == []
        finally:
            await store.aclose()

    run(scenario)


def test_a_revoked_invite_is_unknown_and_only_its_tenant_revokes_it(cluster: Cluster) -> None:
    async def scenario() -> None:
        store = cluster.store("relay-a")
        (_, acme), (_, globex) = new_code(), new_code()
        later = time.time() + 600
        try:
            await store.add_invite(acme, Invite("acme", ["relay:connect"], later, 3))
            await store.add_invite(globex, Invite("globex", ["relay:connect"], later, 1))
            assert not await store.revoke_invite("globex", acme[:12])
            assert not await store.revoke_invite("acme", "0123456789ab")
            assert not await store.revoke_invite(None, "")  # no prefix of every invite
            assert not await store.revoke_invite(None, acme)  # the digest is no id
            assert await store.revoke_invite("acme", acme[:12])
            assert not await store.revoke_invite("acme", acme[:12])
            with pytest.raises(InvalidToken, match=re.escape(UNKNOWN_INVITE)):
                await store.take_invite(acme)
            assert [e.tenant_id for e in await store.list_invites(None)] == ["globex"]
            assert await store.revoke_invite(None, globex[:12])
            assert await store.list_invites(None) == []
        finally:
            await store.aclose()

    run(scenario)


def test_used_up_and_expired_invites_are_not_listed(cluster: Cluster) -> None:
    async def scenario() -> None:
        store = cluster.store("relay-a")
        (_, once), (_, twice), (_, old) = new_code(), new_code(), new_code()
        later = time.time() + 600
        try:
            await store.add_invite(once, Invite("acme", ["relay:connect"], later, 1))
            await store.add_invite(twice, Invite("acme", ["relay:connect"], later, 2))
            await store.add_invite(old, Invite("acme", ["relay:connect"], time.time() - 1, 5))
            await store.take_invite(once)
            await store.take_invite(twice)
            listed = await store.list_invites("acme")
            assert [(e.invite_id, e.uses_left) for e in listed] == [(twice[:12], 1)]
            assert not await store.revoke_invite("acme", old[:12])
        finally:
            await store.aclose()

    run(scenario)


def test_invites_gone_from_redis_leave_their_tenants_set(redis_cluster: Cluster) -> None:
    async def scenario() -> None:
        store = redis_cluster.store("relay-a")
        assert redis_cluster.redis is not None
        raw = redis.asyncio.Redis.from_url(redis_cluster.redis.url, password=PASSWORD)
        (_, once), (_, lapsed), (_, kept) = new_code(), new_code(), new_code()
        later = time.time() + 600
        try:
            for digest in (once, lapsed, kept):
                await store.add_invite(digest, Invite("acme", ["relay:connect"], later, 1))
            await raw.hset(f"test-cluster:invite:{kept}", "permissions", "x" * 10000)
            await store.take_invite(once)
            await raw.delete(f"test-cluster:invite:{lapsed}")  # as when its key expires
            assert await store.list_invites("acme") == []
            assert await raw.smembers("test-cluster:invites:acme") == {kept.encode()}
        finally:
            await raw.aclose()
            await store.aclose()

    run(scenario)


# ---- sessions ----


def test_a_tenants_sessions_are_limited_across_relays(cluster: Cluster) -> None:
    async def scenario() -> None:
        a, _ = await started(cluster, "relay-a")
        # relays share limits only through Redis: the memory backend's relay is alone
        b, _ = await started(cluster, "relay-b") if cluster.backend == "redis" else (a, None)
        try:
            assert await a.open_session("acme", "s1", limit=2)
            assert await b.open_session("acme", "s2", limit=2)
            assert not await a.open_session("acme", "s3", limit=2)
            assert not await b.open_session("acme", "s4", limit=2)
            assert await b.open_session("globex", "s5", limit=2)
            await a.close_session("acme", "s1")
            assert await b.open_session("acme", "s4", limit=2)
            assert not await a.open_session("acme", "s6", limit=2)
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario)


# ---- revocations ----


def claims(subject: str, *, token_id: str = "t-0", issued_at: float = 0.0) -> Claims:  # noqa: S107  # a token id, no secret
    return Claims(subject, "acme", frozenset(), time.time() + 600, {}, token_id, issued_at)


def test_revocations_cover_a_token_or_a_subject_until_they_lapse(cluster: Cluster) -> None:
    async def scenario() -> None:
        store = cluster.store("relay-a")
        try:
            now = time.time()
            by_id = Revocation("acme", now, now + 600, token_id="t-1")
            by_subject = Revocation("acme", now, now + 600, subject="alice")
            lapsed = Revocation("acme", now - 60, now - 1, subject="bob")
            for revocation in (by_id, by_subject, lapsed):
                await store.revoke(revocation)
            in_force = {r.key: r for r in await store.revocations()}
            assert in_force == {by_id.key: by_id, by_subject.key: by_subject}

            def revoked(c: Claims) -> bool:
                return any(r.covers(c) for r in in_force.values())

            assert revoked(claims("carol", token_id="t-1"))
            assert not revoked(claims("carol", token_id="t-2"))
            assert revoked(claims("alice", issued_at=now - 10))
            assert not revoked(claims("alice", issued_at=now + 10))
            assert not revoked(claims("bob", issued_at=now - 120))
        finally:
            await store.aclose()

    run(scenario)


def test_a_revocation_reaches_every_relay_the_revoker_included(cluster: Cluster) -> None:
    """Through Redis, or for the memory backend through the state directory (``relay
    token revoke`` is another process)."""

    async def scenario() -> None:
        a, seen_by_a = await started(cluster, "relay-a")
        b, seen_by_b = await started(cluster, "relay-b")
        try:
            now = time.time()
            revocation = Revocation("acme", now, now + 600, subject="alice")
            await b.revoke(revocation)
            for recorder in (seen_by_a, seen_by_b):
                event = await recorder.next_event("revoked")
                assert recorder.kinds() == ["revoked"]
                assert (event.tenant_id, event.body) == ("acme", revocation.to_dict())
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario)


# ---- events between relays ----


def test_relays_tell_each_other_of_devices_and_signals(redis_cluster: Cluster) -> None:
    async def scenario() -> None:
        a, seen_by_a = await started(redis_cluster, "relay-a")
        b, seen_by_b = await started(redis_cluster, "relay-b")
        try:
            await a.put_device("acme", "p1", info("p1"))
            joined = await seen_by_b.next_event("joined")
            assert (joined.tenant_id, joined.body, joined.sender) == ("acme", info("p1"), "relay-a")

            await a.drop_device("acme", "p1")
            left = await seen_by_b.next_event("left")
            assert (left.tenant_id, left.body, left.sender) == ("acme", info("p1"), "relay-a")

            signal = {"from": "p2", "to": "p1", "kind": "offer", "body": {"sdp": "v=0"}}
            # the sender field is the sender's own name, whatever the caller put there
            await b.send("relay-a", ClusterEvent("signal", "acme", signal, sender="relay-z"))
            received = await seen_by_a.next_event("signal")
            assert (received.body, received.sender) == (signal, "relay-b")

            # a relay's own events come back only when they are revocations: on the one
            # channel they arrive in order, so a's joined would be there before this
            now = time.time()
            await a.revoke(Revocation("acme", now, now + 600, token_id="t-1"))
            await seen_by_a.next_event("revoked")
            assert seen_by_a.kinds() == ["signal", "revoked"]
            await seen_by_b.next_event("revoked")
            assert seen_by_b.kinds() == ["joined", "left", "revoked"]
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario)


def test_malformed_events_in_redis_are_dropped(redis_cluster: Cluster) -> None:
    async def scenario() -> None:
        a, seen_by_a = await started(redis_cluster, "relay-a")
        assert redis_cluster.redis is not None
        raw = redis.asyncio.Redis.from_url(redis_cluster.redis.url, password=PASSWORD)
        channel = "test-cluster:events"
        good = {"kind": "joined", "tenant_id": "acme", "body": info("p9"), "sender": "relay-b"}
        try:
            for bad in (
                b"\xff\xfe not json",
                b"[1, 2]",
                b"{}",
                json.dumps({**good, "kind": "explode"}),
                json.dumps({**good, "tenant_id": 7}),
                json.dumps({**good, "body": {"peer_id": ["not", "a", "string"]}}),
                json.dumps({**good, "sender": ""}),
                json.dumps({**good, "kind": "signal", "body": {"from": "p1"}}),
                json.dumps({**good, "kind": "revoked", "body": {"tenant_id": "acme"}}),
                json.dumps({**good, "body": {"pad": "x" * 70000}}),
            ):
                await raw.publish(channel, bad)
            await raw.publish(channel, json.dumps(good))
            event = await seen_by_a.next_event("joined")
            assert seen_by_a.events == [event]
            assert (event.body, event.sender) == (info("p9"), "relay-b")
        finally:
            await raw.aclose()
            await a.aclose()

    run(scenario)


# ---- presence ----


def test_a_relay_alone_lists_itself(cluster: Cluster) -> None:
    async def scenario() -> None:
        store, _ = await started(cluster, "relay-a")
        try:
            assert await store.relays() == {"relay-a": record("relay-a")}
        finally:
            await store.aclose()

    run(scenario)


def test_a_relay_that_stops_refreshing_is_gone_with_its_devices(redis_cluster: Cluster) -> None:
    async def scenario() -> None:
        registry = CollectorRegistry()
        a = Recorder()
        store_a = redis_cluster.store("relay-a", ClusterMetrics(registry))
        await store_a.start(a.handlers, record("relay-a"))
        store_b, _ = await started(redis_cluster, "relay-b")
        try:
            assert await store_a.relays() == {
                "relay-a": record("relay-a"),
                "relay-b": record("relay-b"),
            }
            assert registry.get_sample_value("cloudbridge_relay_cluster_relays") == 2
            timed = registry.get_sample_value(
                "cloudbridge_relay_cluster_backend_latency_seconds_count", {"operation": "relays"}
            )
            assert (timed or 0) >= 1
            await store_b.put_device("acme", "p2", info("p2"))
            await store_a.put_device("acme", "p1", info("p1"))
            assert set(await store_a.devices("acme")) == {"p1", "p2"}
            await store_b.aclose()  # as a relay that died: its presence is left to lapse

            await a.wait_until(lambda: bool(a.gone))
            assert a.gone == [{"relay-b"}]
            assert set(await store_a.devices("acme")) == {"p1"}
            assert await store_a.relays() == {"relay-a": record("relay-a")}
            assert redis_cluster.redis is not None
            raw = redis.asyncio.Redis.from_url(redis_cluster.redis.url, password=PASSWORD)
            try:  # the lapsed relay's devices left the mesh in Redis, not only the listing
                assert await raw.hkeys("test-cluster:mesh:acme") == [b"p1"]
            finally:
                await raw.aclose()
        finally:
            await store_a.aclose()

    run(scenario)


def test_sessions_of_a_lapsed_relay_stop_counting(redis_cluster: Cluster) -> None:
    async def scenario() -> None:
        a, seen_by_a = await started(redis_cluster, "relay-a")
        b, _ = await started(redis_cluster, "relay-b")
        try:
            assert await b.open_session("acme", "s1", limit=1)
            assert not await a.open_session("acme", "s2", limit=1)
            await b.aclose()
            await seen_by_a.wait_until(lambda: bool(seen_by_a.gone))
            assert await a.open_session("acme", "s2", limit=1)
        finally:
            await a.aclose()

    run(scenario)


# ---- outages ----


def test_sessions_held_through_an_outage_count_again_once_redis_is_back(
    redis_cluster: Cluster,
) -> None:
    async def scenario() -> None:
        a, seen_by_a = await started(redis_cluster, "relay-a")
        b, seen_by_b = await started(redis_cluster, "relay-b")
        server = redis_cluster.redis
        assert server is not None
        try:
            assert await a.open_session("acme", "before", limit=2)
            server.kill()
            with pytest.raises(ServerUnavailable):  # the relay serves it on its own count
                await a.open_session("acme", "during", limit=2)
            server.start()  # without its data: the session held before is gone there too
            await seen_by_a.wait_until(lambda: seen_by_a.resynced == 1)
            await seen_by_b.wait_until(lambda: seen_by_b.resynced == 1)
            assert not await b.open_session("acme", "elsewhere", limit=2)
            await a.close_session("acme", "during")
            assert await b.open_session("acme", "elsewhere", limit=2)
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario)


def test_an_outage_is_unavailable_then_resynced(redis_cluster: Cluster) -> None:
    async def scenario() -> None:
        registry = CollectorRegistry()
        recorder = Recorder()
        store = redis_cluster.store("relay-a", ClusterMetrics(registry))
        await store.start(recorder.handlers, record("relay-a"))
        server = redis_cluster.redis
        assert server is not None

        def up() -> float | None:
            return registry.get_sample_value("cloudbridge_relay_cluster_backend_up")

        try:
            assert store.healthy
            assert up() == 1
            server.stop()
            with pytest.raises(ServerUnavailable) as raised:
                await store.put_device("acme", "p1", info("p1"))
            message = raised.value.message
            assert message.startswith("the cluster's Redis cannot be reached: 127.0.0.1:")
            assert PASSWORD not in message
            assert URL_PASSWORD not in message
            assert not store.healthy
            assert up() == 0
            assert registry.get_sample_value("cloudbridge_relay_cluster_backend_errors_total") >= 1
            with pytest.raises(ServerUnavailable):
                await store.take_invite("any")
            assert recorder.resynced == 0

            server.start()
            await recorder.wait_until(lambda: recorder.resynced == 1)
            assert store.healthy
            assert up() == 1
            await store.put_device("acme", "p1", info("p1"))
            assert set(await store.devices("acme")) == {"p1"}
        finally:
            await store.aclose()

    run(scenario)


def test_a_redis_backend_needs_a_url(tmp_path: Path) -> None:
    settings = Cluster("redis", tmp_path, None, None).settings("relay-a")
    with pytest.raises(ConfigError) as raised:
        open_store(settings, tmp_path)
    assert raised.value.issues[0].path == "server.cluster.redis_url"


def test_rediss_is_verified_against_the_configured_ca(tmp_path: Path) -> None:
    ca = generate_ca("redis test CA")
    pair = issue_server_certificate(ca, ["127.0.0.1"])
    files = TlsFiles(tmp_path / "redis.crt", tmp_path / "redis.key", tmp_path / "ca.crt")
    files.certificate.write_bytes(pair.certificate)
    files.key.write_bytes(pair.key)
    files.ca.write_bytes(ca.certificate)
    stranger = tmp_path / "other-ca.crt"
    stranger.write_bytes(generate_ca("another CA").certificate)
    with redis_server(tmp_path, tls=files) as server:
        cluster = Cluster("redis", tmp_path, server, None)

        async def scenario() -> None:
            trusting = open_store(
                replace(cluster.settings("a"), redis_ca_file=str(files.ca)), tmp_path
            )
            doubting = open_store(
                replace(cluster.settings("b"), redis_ca_file=str(stranger)), tmp_path
            )
            try:
                await trusting.add_invite("code", Invite("acme", [], time.time() + 60, 1))
                assert (await trusting.take_invite("code")).tenant_id == "acme"
                with pytest.raises(ServerUnavailable, match=r"(?i)certificate verify failed"):
                    await doubting.take_invite("code")
            finally:
                await trusting.aclose()
                await doubting.aclose()

        run(scenario)


def test_a_failing_handler_does_not_stop_the_events(redis_cluster: Cluster) -> None:
    async def scenario() -> None:
        recorder = Recorder()

        async def fails_first(event: ClusterEvent) -> None:
            if not recorder.events:
                recorder.events.append(event)
                raise RuntimeError("a bug in the relay's handler")
            await recorder.handlers.event(event)

        a = redis_cluster.store("relay-a")
        await a.start(replace(recorder.handlers, event=fails_first), record("relay-a"))
        b, _ = await started(redis_cluster, "relay-b")
        try:
            await b.put_device("acme", "p1", info("p1"))
            await b.put_device("acme", "p2", info("p2"))
            await recorder.wait_until(lambda: len(recorder.events) == 2)
            assert [event.body["peer_id"] for event in recorder.events] == ["p1", "p2"]
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario)


# ---- overlay leases (IPAM) ----

DAY = 86400.0


class Clock:
    """Unix seconds the test moves on by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def ipam_on(store: ClusterStore, clock: Clock | None = None, **keys: object) -> Ipam:
    """A relay's IPAM keeping its leases in ``store``, with ``server.overlay`` ``keys``."""
    overrides = {f"server.overlay.{key}": (value, "test") for key, value in keys.items()}
    settings = load_config(None, environ={}, overrides=overrides).settings.server.overlay
    return Ipam(store, settings, clock=clock or time.time)


def device(n: int) -> str:
    return f"device-key-{n}"


async def address(ipam: Ipam, tenant: str, n: int, in_mesh: tuple[int, ...] = ()) -> str:
    """Lease device ``n`` of ``tenant`` an address; the address, or the error."""
    got = await ipam.lease(tenant, device(n), f"dev{n}", f"peer{n}", [device(m) for m in in_mesh])
    return got.address or got.error


def test_leases_are_sticky_lowest_free_and_per_tenant_across_relays(cluster: Cluster) -> None:
    async def scenario() -> None:
        # a relay alone shares its leases with the next one on its state directory only
        a, b = cluster.store("relay-a"), cluster.store("relay-b")
        at_a, at_b = ipam_on(a), ipam_on(b)
        try:
            assert [await address(at_a, "acme", n) for n in (1, 2, 3)] == [
                "100.64.0.1",
                "100.64.0.2",
                "100.64.0.3",
            ]
            assert await address(at_b, "acme", 2) == "100.64.0.2"  # the device moved relay
            assert await address(at_b, "acme", 4) == "100.64.0.4"
            assert await address(at_b, "globex", 1) == "100.64.0.1"  # another namespace
            leases = await b.ipam_leases("acme")
            assert {key: lease.address for key, lease in leases.items()} == {
                device(1): "100.64.0.1",
                device(2): "100.64.0.2",
                device(3): "100.64.0.3",
                device(4): "100.64.0.4",
            }
            assert (leases[device(4)].device, leases[device(4)].peer_id) == ("dev4", "peer4")
            assert set(await b.ipam_leases("globex")) == {device(1)}
            assert await b.ipam_leases("initech") == {}
        finally:
            await a.aclose()
            await b.aclose()

    run(scenario)


def test_two_relays_leasing_at_once_never_give_one_address_twice(cluster: Cluster) -> None:
    async def scenario() -> None:
        # four relays on Redis; the memory backend's relay is alone
        stores = [cluster.store(f"relay-{n}") for n in range(4 if cluster.redis else 1)]
        relays = [ipam_on(store, pool="10.9.0.0/24") for store in stores]
        try:
            got = await asyncio.gather(
                *(address(relays[n % len(relays)], "acme", n) for n in range(24))
            )
            assert sorted(got, key=ipaddress.IPv4Address) == [f"10.9.0.{n}" for n in range(1, 25)]
            leases = await stores[0].ipam_leases("acme")
            assert {key: lease.address for key, lease in leases.items()} == {
                device(n): got[n] for n in range(24)
            }
        finally:
            for store in stores:
                await store.aclose()

    run(scenario)


def test_a_lease_idle_for_release_after_is_released(cluster: Cluster) -> None:
    async def scenario() -> None:
        clock = Clock()
        store = cluster.store("relay-a")
        ipam = ipam_on(store, clock, release_after="1d")
        try:
            assert [await address(ipam, "acme", n) for n in (1, 2, 3)] == [
                "100.64.0.1",
                "100.64.0.2",
                "100.64.0.3",
            ]
            clock.now += 0.5 * DAY
            await ipam.seen("acme", device(2))  # device 2 leaves the mesh
            clock.now += 0.75 * DAY  # 1 and 3 were seen 1.25 days ago, 2 only 0.75
            # device 3 is in the mesh still: its lease stays; 1's address goes to 4
            assert await address(ipam, "acme", 4, in_mesh=(3,)) == "100.64.0.1"
            assert set(await store.ipam_leases("acme")) == {device(2), device(3), device(4)}
        finally:
            await store.aclose()

    run(scenario)


def test_during_an_outage_a_join_gets_no_address_not_a_guess(redis_cluster: Cluster) -> None:
    async def scenario() -> None:
        store = redis_cluster.store("relay-a")
        ipam = ipam_on(store)
        server = redis_cluster.redis
        assert server is not None
        try:
            assert await address(ipam, "acme", 1) == "100.64.0.1"
            server.stop()
            refused = await ipam.lease("acme", device(2), "dev2", "peer2")
            assert (refused.address, refused.error) == ("", UNAVAILABLE)
            assert refused.wire() == {"error": UNAVAILABLE}
            await ipam.seen("acme", device(1))  # a leave during the outage: logged, no raise
            server.start()
            # this test's Redis keeps nothing across its restart: the pool is empty again
            assert await address(ipam, "acme", 2) == "100.64.0.1"
            assert set(await store.ipam_leases("acme")) == {device(2)}
        finally:
            await store.aclose()

    run(scenario)


def test_leases_in_redis_that_no_relay_wrote_are_dropped(redis_cluster: Cluster) -> None:
    async def scenario() -> None:
        store = redis_cluster.store("relay-a")
        ipam = ipam_on(store)
        assert redis_cluster.redis is not None
        raw = redis.asyncio.Redis.from_url(redis_cluster.redis.url, password=PASSWORD)
        key = "test-cluster:ipam:acme"
        good = {"address": "100.64.0.1", "device": "dev9", "peer_id": "peer9", "last_seen": 1}
        try:
            await raw.hset(
                key,
                mapping={
                    device(9): json.dumps(good),
                    "not-json": b"\xff{",
                    "no-address": json.dumps({**good, "address": "100.64.0.999"}),
                    "text-time": json.dumps({**good, "address": "100.64.0.2", "last_seen": "1"}),
                    "huge": json.dumps({**good, "device": "x" * 10000}),
                    "shared": json.dumps({**good, "last_seen": 0}),  # 9 was seen later
                },
            )
            assert set(await store.ipam_leases("acme")) == {device(9)}
            assert await address(ipam, "acme", 1, in_mesh=(9,)) == "100.64.0.2"
            assert sorted(await raw.hkeys(key)) == sorted([device(1).encode(), device(9).encode()])
        finally:
            await raw.aclose()
            await store.aclose()

    run(scenario)
