"""Opening the backend ``server.cluster`` names."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from cloudbridge_core.relay.cluster.memory import MemoryStore
from cloudbridge_core.relay.cluster.store import ClusterStore
from cloudbridge_core.settings.sections import ClusterSettings

_T = TypeVar("_T")


def member_name(settings: ClusterSettings) -> str:
    """This relay's name in the cluster: ``server.cluster.member``, or the host name and
    the link port (unique for relays sharing a host)."""
    return settings.member or f"{socket.gethostname()}:{settings.link_port}"


def open_store(settings: ClusterSettings, state_dir: Path) -> ClusterStore:
    """The configured backend, not yet started (:meth:`ClusterStore.start`)."""
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
