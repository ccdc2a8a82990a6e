"""Opening the backend ``server.cluster`` names."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cloudbridge_core.relay.cluster.memory import MemoryStore
from cloudbridge_core.relay.cluster.store import ClusterStore
from cloudbridge_core.settings.sections import ClusterSettings

if TYPE_CHECKING:
    from cloudbridge_core.relay.cluster.metrics import ClusterMetrics

_T = TypeVar("_T")


def member_name(settings: ClusterSettings) -> str:
    """This relay's name in the cluster: ``server.cluster.member``, or the host name and
    the link port (unique for relays sharing a host)."""
    return settings.member or f"{socket.gethostname()}:{settings.link_port}"


def open_store(
    settings: ClusterSettings, state_dir: Path, metrics: ClusterMetrics | None = None
) -> ClusterStore:
    """The configured backend, not yet started (:meth:`ClusterStore.start`); ``ConfigError``
    for a redis backend without ``redis_url``. ``metrics`` are recorded by the redis one."""
    if settings.backend == "redis":
        # redis-py is imported only by relays that use it
        from cloudbridge_core.relay.cluster.redis_store import RedisStore

        return RedisStore.from_settings(settings, member_name(settings), metrics)
    return MemoryStore(state_dir, member_name(settings))


def run_once(
    settings: ClusterSettings,
    state_dir: Path,
    operation: Callable[[ClusterStore], Awaitable[_T]],
) -> _T:
    """One operation on the backend, from a command (``relay invite create``, ``relay token
    revoke``): the store is opened for it and closed after."""

    async def run() -> _T:
        store = open_store(settings, state_dir)
        try:
            return await operation(store)
        finally:
            await store.aclose()

    return asyncio.run(run())
