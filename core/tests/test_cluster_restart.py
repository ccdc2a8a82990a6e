"""A relay of a cluster restarted quicker than its presence lapses: the devices its last run
held leave the others' meshes at once (they would otherwise stay listed, since the relay
never looked gone). A real redis-server (tests/redis_server.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cloudbridge_core.relay.cluster.backend import open_store
from cloudbridge_core.relay.cluster.store import ClusterEvent, Handlers, RelayRecord
from cloudbridge_core.settings.sections import ClusterSettings
from redis_server import redis_server

DEVICE = {"peer_id": "laptop-id", "name": "laptop", "public_key": "a2V5"}


async def _nothing(*_: object) -> None:
    return None


def handlers(events: asyncio.Queue[ClusterEvent] | None = None) -> Handlers:
    """Handlers putting the events another relay sends in ``events``."""
    return Handlers(events.put if events is not None else _nothing, _nothing, _nothing)


async def next_event(events: asyncio.Queue[ClusterEvent], kind: str) -> ClusterEvent:
    async with asyncio.timeout(20):
        while (event := await events.get()).kind != kind:
            pass
    return event


def settings(url: str, member: str) -> ClusterSettings:
    return ClusterSettings(
        backend="redis",
        redis_url=url,
        redis_password_file=None,
        redis_ca_file=None,
        name="restart-test",
        member=member,
        link_port=7480,
        link_host=None,
        presence_ttl=60.0,  # never lapses during the test: only the restart can tell
    )


def test_a_restarted_relay_drops_the_devices_its_last_run_held(tmp_path: Path) -> None:
    async def scenario(url: str) -> None:
        events: asyncio.Queue[ClusterEvent] = asyncio.Queue()
        first_run = open_store(settings(url, "r1"), tmp_path)
        other = open_store(settings(url, "r2"), tmp_path)
        await first_run.start(handlers(), RelayRecord("r1", "r1:7480"))
        await other.start(handlers(events), RelayRecord("r2", "r2:7480"))
        await first_run.put_device("acme", DEVICE["peer_id"], DEVICE)
        await next_event(events, "joined")
        await first_run.aclose()  # a crash: the device was never dropped
        second_run = open_store(settings(url, "r1"), tmp_path)
        await second_run.start(handlers(), RelayRecord("r1", "r1:7480"))
        left = await next_event(events, "left")
        assert (left.tenant_id, left.body["peer_id"], left.sender) == ("acme", "laptop-id", "r1")
        assert await other.devices("acme") == {}
        await asyncio.gather(second_run.aclose(), other.aclose())

    with redis_server(tmp_path) as server:
        asyncio.run(scenario(server.url))
