"""The WireGuard overlay: implements :class:`cloudbridge_core.api.Overlay`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from cloudbridge_core.api import (
    OverlayFailed,
    OverlayInterface,
    OverlayPeer,
    OverlayState,
    build,
    get_logger,
    require_net_admin,
)

from cloudbridge_wireguard import fastpath
from cloudbridge_wireguard.hooks import SETTINGS_SCHEMA
from cloudbridge_wireguard.kernel import KernelWireGuard
from cloudbridge_wireguard.links import Links, parse_addresses
from cloudbridge_wireguard.uapi import DeviceStatus, peer_lines
from cloudbridge_wireguard.userspace import WireGuardGo, remove_leftover
from cloudbridge_wireguard.wire import check_interface_name, decode_key, is_wireguard_message

log = get_logger("overlay.wireguard")

#: the schema's defaults, for a provider built without the core's validated section
DEFAULTS: Mapping[str, Any] = {
    key: spec["default"] for key, spec in SETTINGS_SCHEMA["properties"].items()
}
BACKENDS: tuple[str, ...] = tuple(SETTINGS_SCHEMA["properties"]["backend"]["enum"])
NO_KERNEL = (
    "kernel WireGuard is not available on this host (the kernel has no WireGuard module): "
    "set overlay.wireguard.backend to auto or wireguard-go"
)


@dataclass(frozen=True, slots=True)
class WireGuardSettings:
    """``overlay.wireguard`` as the core hands it over (validated, defaults filled in)."""

    backend: str
    listen_port: int


class Device(Protocol):
    """A WireGuard device, whichever backend runs it."""

    backend: str

    async def configure(self, private_key: str, listen_port: int) -> None: ...

    async def status(self) -> DeviceStatus: ...

    async def apply(
        self, peers: Sequence[OverlayPeer], existing: frozenset[str], remove: Sequence[str]
    ) -> None: ...

    async def close(self) -> None: ...


class WireGuardOverlay:
    """WireGuard over the paths NAT traversal found, on the kernel or wireguard-go.

    Everything it does happens in the network namespace of the thread that runs its event
    loop. It is an async resource: ``async with`` brings nothing up but takes it down.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings = build(WireGuardSettings, {**DEFAULTS, **(settings or {})})
        if self.settings.backend not in BACKENDS:
            raise OverlayFailed(
                f"overlay.wireguard.backend {self.settings.backend!r} is not one of "
                + ", ".join(BACKENDS)
            )
        self._lock = asyncio.Lock()
        self._interface: str | None = None
        self._links: Links | None = None
        self._device: Device | None = None
        self._listen_port = 0
        self._rewrites: tuple[fastpath.Rewrite, ...] = ()
        #: the peers as last given to update_peers
        self._given: dict[str, OverlayPeer] = {}

    async def __aenter__(self) -> WireGuardOverlay:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.down()

    @property
    def state(self) -> OverlayState | None:
        if self._device is None or self._interface is None:
            return None
        return OverlayState(self._interface, self._device.backend, self._listen_port)

    async def up(self, interface: OverlayInterface) -> OverlayState:
        """Bring ``interface`` up (see :meth:`cloudbridge_core.api.Overlay.up`).

        Raises :class:`OverlayFailed`: no CAP_NET_ADMIN, wireguard-go not installed, the
        kernel backend asked for but absent, a bad name, key or address, or a failed step
        (what was made is removed again)."""
        name = check_interface_name(interface.name)
        decode_key(interface.private_key, "the overlay's private key")
        parse_addresses(interface.addresses)
        async with self._lock:
            if self._device is not None:
                raise OverlayFailed(f"the overlay is already up on {self._interface}")
            require_net_admin()
            links = Links()
            try:
                await self._remove_leftovers(name, links)
            except BaseException:
                links.close()
                raise
            # from here on the name is the overlay's: a failure removes what was made
            self._interface, self._links = name, links
            try:
                self._device = await self._create(name, links)
                await self._device.configure(interface.private_key, self.settings.listen_port)
                await links.configure(name, interface.addresses, interface.mtu)
                self._listen_port = (await self._device.status()).listen_port
                if not self._listen_port:
                    raise OverlayFailed(f"WireGuard on {name} has no UDP socket (no listen port)")
            except BaseException:
                with contextlib.suppress(OverlayFailed):
                    await self._teardown()
                raise
            log.info(
                "overlay up",
                interface=name,
                backend=self._device.backend,
                listen_port=self._listen_port,
                addresses=list(interface.addresses),
            )
            return OverlayState(name, self._device.backend, self._listen_port)

    async def _remove_leftovers(self, name: str, links: Links) -> None:
        """What a run killed before its ``down`` left: a live wireguard-go or its socket,
        the interface (kernel, or a tun), and the fast path's table."""
        found = await remove_leftover(name)
        found = await links.delete(name) or found
        if found:
            log.info("overlay leftover removed", interface=name)
        await fastpath.apply(fastpath.ruleset(name, 0, ()), required=False)

    async def _create(self, name: str, links: Links) -> Device:
        backend = self.settings.backend
        if backend in ("auto", "kernel"):
            if await links.add_wireguard(name):
                return KernelWireGuard(name, links)
            if backend == "kernel":
                raise OverlayFailed(NO_KERNEL)
            log.debug("overlay backend", interface=name, note="no kernel WireGuard: wireguard-go")
        return await WireGuardGo.start(name)

    async def update_peers(self, peers: Sequence[OverlayPeer]) -> None:
        """Make the peers exactly ``peers`` (see
        :meth:`cloudbridge_core.api.Overlay.update_peers`). A peer with ``source_port``
        gets the nftables fast path (module :mod:`cloudbridge_wireguard.fastpath`).

        Raises :class:`OverlayFailed` when the overlay is not up, a peer is malformed
        (nothing is changed then), or a step fails."""
        keys = [peer.public_key for peer in peers]
        if len(set(keys)) != len(keys):
            raise OverlayFailed("a peer appears twice in the overlay's peer list")
        for peer in peers:
            peer_lines(peer, existing=False)  # refuses a malformed peer before any change
        async with self._lock:
            device, name = self._device, self._interface
            if device is None or name is None:
                raise OverlayFailed("the overlay is not up")
            wanted = fastpath.rewrites(peers, self._listen_port)
            status = await device.status()
            existing = frozenset(status.peers)
            remove = sorted(existing - set(keys))
            if wanted != self._rewrites:
                # before the endpoints change, so no packet leaves from the wrong port
                await fastpath.apply(
                    fastpath.ruleset(name, self._listen_port, wanted), required=bool(wanted)
                )
                self._rewrites = wanted
            changes = list(self._changes(peers, existing))
            await device.apply(changes, existing, remove)
            self._given = {peer.public_key: peer for peer in peers}
            for peer in changes:
                change = "added" if peer.public_key not in existing else "changed"
                log.debug(
                    f"overlay peer {change}",
                    interface=name,
                    peer=peer.public_key,
                    endpoint=f"{peer.endpoint[0]}:{peer.endpoint[1]}" if peer.endpoint else None,
                )
            for public_key in remove:
                log.debug("overlay peer removed", interface=name, peer=public_key)

    def _changes(
        self, peers: Sequence[OverlayPeer], existing: frozenset[str]
    ) -> Iterator[OverlayPeer]:
        """The peers to send: new ones, and changed ones, without their endpoint when only
        something else changed (WireGuard may have learned a newer one from the peer's
        packets, which an unrelated update must not undo)."""
        for peer in peers:
            before = self._given.get(peer.public_key)
            if peer.public_key not in existing or before is None:
                yield peer
            elif peer != before:
                yield peer if peer.endpoint != before.endpoint else replace(peer, endpoint=None)

    async def status(self) -> DeviceStatus:
        """The device as WireGuard reports it now: listen port, peers, their endpoints,
        counters and last handshakes. Raises :class:`OverlayFailed` when it is not up."""
        device = self._device
        if device is None:
            raise OverlayFailed("the overlay is not up")
        return await device.status()

    def carries(self, datagram: bytes) -> bool:
        return is_wireguard_message(datagram)

    async def down(self) -> None:
        """Remove the interface, wireguard-go, and the fast path's table; idempotent.
        Raises :class:`OverlayFailed` after trying every step when one failed."""
        async with self._lock:
            await self._teardown()

    async def aclose(self) -> None:
        await self.down()

    async def _teardown(self) -> None:
        name, links, device = self._interface, self._links, self._device
        self._interface, self._links, self._device = None, None, None
        self._rewrites, self._listen_port, self._given = (), 0, {}
        if name is None:
            return
        failures: list[OverlayFailed] = []
        steps: list[Callable[[], Awaitable[object]]] = [
            lambda: fastpath.apply(fastpath.ruleset(name, 0, ()), required=False)
        ]
        if device is not None:
            steps.append(device.close)
        if links is not None:
            steps.append(lambda: links.delete(name))
        for step in steps:
            try:
                await step()
            except OverlayFailed as error:
                failures.append(error)
        if links is not None:
            links.close()
        if failures:
            raise failures[0]
        log.info("overlay down", interface=name)
