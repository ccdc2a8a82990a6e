"""This relay's part in a cluster's data plane: the link server other relays send DERP
packets to, and the pool of links it sends theirs on, addressed by the presence records of
the cluster's store (a relay's ``link`` address, looked up again when unknown here)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from cloudbridge_core.errors import ServerUnavailable
from cloudbridge_core.relay.cluster.link import (
    Deliver,
    LinkIdentity,
    LinkMetrics,
    LinkPool,
    LinkServer,
)
from cloudbridge_core.relay.cluster.store import ClusterStore
from cloudbridge_core.tlsutil import KeyPair


class ClusterLinks:
    def __init__(self, store: ClusterStore, server: LinkServer, pool: LinkPool) -> None:
        self._store = store
        self.server = server
        self._pool = pool
        self._addresses: dict[str, str] = {}

    @classmethod
    async def start(
        cls,
        store: ClusterStore,
        ca: KeyPair,
        listen: tuple[str, int],
        deliver: Deliver,
        registry: CollectorRegistry,
    ) -> ClusterLinks:
        """Listen for the other relays' links at ``listen`` (``server.listen`` and
        ``server.cluster.link_port``) as the member the cluster's ``ca`` certifies."""
        identity = LinkIdentity.issue(ca, store.member)
        metrics = LinkMetrics(registry)
        server = await LinkServer.start(*listen, identity, deliver, metrics=metrics)
        return cls(store, server, LinkPool(identity, metrics=metrics))

    async def send(
        self, relay: str, tenant_id: str, sender_key: bytes, target_key: bytes, payload: bytes
    ) -> bool:
        """A packet for a device on ``relay``; False when it was dropped."""
        address = self._addresses.get(relay) or await self._look_up(relay)
        if address is None:
            return False
        try:
            return self._pool.send(relay, address, tenant_id, sender_key, target_key, payload)
        except ValueError:  # no member would take it (an oversized payload)
            return False

    async def _look_up(self, relay: str) -> str | None:
        try:
            relays = await self._store.relays()
        except ServerUnavailable:
            return None
        self._addresses = {name: record.link for name, record in relays.items()}
        return self._addresses.get(relay)

    def forget(self, relays: set[str]) -> None:
        """Relays that left the cluster: their links close, their addresses are looked up
        again if they come back."""
        for relay in relays:
            self._addresses.pop(relay, None)
            self._pool.forget(relay)

    async def aclose(self) -> None:
        await self._pool.aclose()
        await self.server.aclose()
