"""The overlay of one running client: brought up once the relay gave this device its
address, then kept in step with the mesh.

Each peer's endpoint follows the path its peer session holds now. A direct or STUN path
is an ICE pair's own UDP socket: the overlay sends from and to that pair's ports (its
plugin arranges it, e.g. by rewriting ports in the kernel), so the NATs the pair punched
through let its packets pass and no packet goes through Python. Any other path (TURN,
DERP) goes through the peer's loopback proxy and the peer session. An overlay packet that
still reaches Python over a punched path (sent before this side's kernel rules were in
place) is dropped, not handed on through the proxy: the overlay would follow its source
(WireGuard roams) off the direct path, and a handshake lost is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import ipaddress
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from cloudbridge_core.errors import CloudBridgeError, OverlayFailed
from cloudbridge_core.log import get_logger
from cloudbridge_core.overlay import allow
from cloudbridge_core.overlay.capability import require_net_admin
from cloudbridge_core.overlay.metrics import ROUTES, OverlayMetrics
from cloudbridge_core.overlay.names import NameResponder, label
from cloudbridge_core.overlay.proxy import PeerProxy
from cloudbridge_core.overlay.routes import conflicting_route
from cloudbridge_core.providers import (
    Overlay,
    OverlayInterface,
    OverlayPeer,
    OverlayState,
    PeerPath,
)
from cloudbridge_core.settings import OverlaySettings

if TYPE_CHECKING:
    from cloudbridge_core.config import Config
    from cloudbridge_core.p2p.manager import PeerManager, PeerState
    from cloudbridge_core.p2p.session import PeerSession

log = get_logger("overlay")

#: how often the overlay's peers are brought in line with the mesh and its paths
FOLLOW_INTERVAL = 0.5


def interface_name(tenant_id: str, peer_id: str) -> str:
    """``cb`` and 8 hex digits: at most 15 characters, one per tenant and device."""
    return "cb" + hashlib.sha256(f"{tenant_id}\0{peer_id}".encode()).hexdigest()[:8]


class OverlayRun:
    def __init__(
        self,
        settings: OverlaySettings,
        overlay: Overlay,
        mesh: PeerManager,
        private_key: str,
        tenant_id: str,
        metrics: OverlayMetrics | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._overlay = overlay
        self._mesh = mesh
        self._private_key = private_key
        self._tenant = tenant_id
        self.interface = settings.interface or interface_name(tenant_id, mesh.membership.peer_id)
        self.addresses: list[str] = []
        self.state: OverlayState | None = None
        self._pool: ipaddress.IPv4Network | None = None
        self._proxies: dict[str, PeerProxy] = {}
        #: the session each proxy's peer datagrams come from
        self._hooked: dict[str, PeerSession] = {}
        #: the punched path each peer's overlay packets take now, if any
        self._punched: dict[str, PeerPath | None] = {}
        self._applied: list[OverlayPeer] | None = None
        self._filtered: str | None = None
        self._dns: NameResponder | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bring the overlay up; raises :class:`OverlayFailed` saying why it cannot be."""
        lease = self._mesh.membership.overlay
        if not lease.get("address"):
            reason = lease.get("error") or "the relay gave none (a relay without IPAM?)"
            raise OverlayFailed(f"no overlay address for this device: {reason}")
        require_net_admin()
        self._pool = pool = ipaddress.IPv4Network(lease["pool"])
        conflict = conflicting_route(pool, self.interface)
        if conflict is not None:
            raise OverlayFailed(
                f"the tenant's overlay pool {pool} overlaps the route {conflict} on this host",
                hint="give the tenant another pool on the relay (server.overlay.tenants.<tenant>"
                ".pool or server.overlay.pool), or move that network",
            )
        await allow.remove(self.interface)  # left by a run killed before its cleanup
        self.addresses = [f"{lease['address']}/{pool.prefixlen}"]
        wanted = OverlayInterface(
            self.interface, self.addresses, self._private_key, self.settings.mtu
        )
        try:
            async with self._plugin("up"):
                self.state = await self._overlay.up(wanted)
            await self._filter()
        except BaseException:  # what a half-done start created goes too
            await self.aclose()
            raise
        if self.settings.dns:
            try:
                self._dns = await NameResponder.serve(lease["address"], self.zone, self.names)
            except OSError as error:  # the port is taken there: the overlay works without names
                log.warning(
                    "overlay_names_not_served",
                    address=f"{lease['address']}:53",
                    reason=error.strerror or str(error),
                )
        self._task = asyncio.get_running_loop().create_task(self._follow())
        if self._metrics is not None:
            self._metrics.up.set(1)
        log.info(
            "overlay_up",
            interface=self.interface,
            addresses=self.addresses,
            backend=self.state.backend,
        )

    def follow(self, config: Config) -> list[str]:
        """A reload subscriber: ``overlay.allow`` holds at the next reconcile (within
        :data:`FOLLOW_INTERVAL`); the other keys need a restart."""
        allowed = config.settings.overlay.allow
        if allowed == self.settings.allow:
            return []
        self.settings = dataclasses.replace(self.settings, allow=allowed)
        return ["overlay.allow"]

    @property
    def zone(self) -> str:
        return f"{label(self._tenant)}.{self.settings.domain}"

    def names(self) -> dict[str, str]:
        """Each device of the tenant in the overlay, this one too: name -> address."""
        lease = self._mesh.membership.overlay
        found = {f"{label(self._mesh.membership.name)}.{self.zone}": lease.get("address", "")}
        for state in self._mesh.peers.values():
            if state.info.overlay_ip:
                found[f"{label(state.info.name)}.{self.zone}"] = state.info.overlay_ip
        return {name.lower(): address for name, address in found.items() if address}

    def document(self) -> dict[str, Any]:
        return {
            "interface": self.interface,
            "addresses": self.addresses,
            "backend": self.state.backend if self.state else None,
        }

    async def aclose(self) -> None:
        """Remove everything this run created."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._dns is not None:
            self._dns.close()
        for proxy in self._proxies.values():
            proxy.close()
        self._proxies.clear()
        if self._metrics is not None:
            self._metrics.up.set(0)
        with contextlib.suppress(OverlayFailed):
            await allow.remove(self.interface)
        try:
            async with self._plugin("down"):
                await self._overlay.down()
        except OverlayFailed as error:
            log.error("overlay_not_removed", interface=self.interface, reason=error.message)
            return
        log.info("overlay_down", interface=self.interface)

    @contextlib.asynccontextmanager
    async def _plugin(self, call: str) -> AsyncIterator[None]:
        """A plugin's own exceptions as :class:`OverlayFailed`: a user never sees a
        library's traceback, only what failed."""
        try:
            yield
        except CloudBridgeError:
            raise
        except Exception as error:  # a plugin may fail any way: classified here
            reason = str(error) or type(error).__name__
            raise OverlayFailed(
                f"the {self.settings.type} overlay failed in {call}: {reason}"
            ) from error

    async def _follow(self) -> None:
        failing = ""
        while True:
            try:
                await self.reconcile()
                failing = ""
            except (CloudBridgeError, OSError) as error:  # OSError: a proxy's socket
                reason = error.message if isinstance(error, CloudBridgeError) else str(error)
                if reason != failing:  # said once, not every half second
                    log.warning("overlay_not_updated", reason=reason)
                failing = reason
            await asyncio.sleep(FOLLOW_INTERVAL)

    async def reconcile(self) -> None:
        """Bring the overlay's peers and the filter in line with the mesh now."""
        assert self.state is not None  # reconciled only once up
        wanted = []
        for peer_id, state in list(self._mesh.peers.items()):
            if state.info.overlay_key and state.info.overlay_ip:
                wanted.append(await self._peer(peer_id, state))
        for gone in set(self._proxies) - set(self._mesh.peers):
            self._proxies.pop(gone).close()
            self._hooked.pop(gone, None)
            self._punched.pop(gone, None)
        if self._metrics is not None:
            routes = Counter(self._route(peer) for peer in wanted)
            for route in ROUTES:
                self._metrics.peers.labels(route).set(routes[route])
        if wanted != self._applied:
            async with self._plugin("update_peers"):
                await self._overlay.update_peers(wanted)
            self._applied = wanted
        await self._filter()

    async def _peer(self, peer_id: str, state: PeerState) -> OverlayPeer:
        assert self.state is not None
        proxy = self._proxies.get(peer_id)
        if proxy is None:
            proxy = self._proxies[peer_id] = await PeerProxy.open(
                lambda packet: self._to_peer(peer_id, packet), self.state.listen_port
            )
        if self._hooked.get(peer_id) is not state.session:  # a new session: a restart
            receiver = functools.partial(self._from_peer, peer_id, proxy)
            state.session.carry_overlay(self._overlay.carries, receiver)
            self._hooked[peer_id] = state.session
        path = state.session.datagram_path()
        punched = getattr(path, "punched", None)
        allowed = [f"{state.info.overlay_ip}/32"]
        self._punched[peer_id] = path if punched is not None else None
        if punched is not None:
            port, remote = punched
            return OverlayPeer(state.info.overlay_key, allowed, remote, source_port=port)
        endpoint = proxy.endpoint if path is not None else None
        return OverlayPeer(state.info.overlay_key, allowed, endpoint)

    @staticmethod
    def _route(peer: OverlayPeer) -> str:
        if peer.endpoint is None:
            return "none"
        return "proxy" if peer.source_port is None else "kernel"

    def _from_peer(self, peer_id: str, proxy: PeerProxy, path: PeerPath, packet: bytes) -> None:
        """An overlay packet from the peer, over ``path``: to the overlay through the
        proxy, unless it came over the punched path the overlay itself uses for the peer
        (see the module docstring)."""
        if self._punched.get(peer_id) is not path:
            proxy.from_peer(packet)
            if self._metrics is not None:
                self._metrics.received.inc(len(packet))

    def _to_peer(self, peer_id: str, packet: bytes) -> None:
        state = self._mesh.peers.get(peer_id)
        if state is not None:
            state.session.send_overlay(packet)
            if self._metrics is not None:
                self._metrics.sent.inc(len(packet))

    async def _filter(self) -> None:
        assert self._pool is not None
        peers = {
            state.info.name: state.info.overlay_ip
            for state in self._mesh.peers.values()
            if state.info.overlay_ip
        }
        rules = allow.ruleset(
            self.interface, self._pool, self.settings.allow, peers, self.settings.dns
        )
        if rules != self._filtered:
            await allow.apply(rules)
            self._filtered = rules
