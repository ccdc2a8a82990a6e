"""The kernel backend: WireGuard's generic netlink family through pyroute2.

UNTESTED ON THE MACHINES THIS PROJECT BUILDS ON: their kernel has no WireGuard
(``CONFIG_WIREGUARD`` is not set and modules cannot be loaded), so ``backend: auto`` always
ends up on wireguard-go there and the tests that need this file skip. It is kept small on
purpose: the interface itself is made and removed by :mod:`cloudbridge_wireguard.links`,
this only sets the key, the port and the peers, and reads them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cloudbridge_core.api import OverlayFailed, OverlayPeer
from pyroute2 import WireGuard  # type: ignore[import-untyped]  # pyroute2 ships no types
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from cloudbridge_wireguard.links import Links, error_code, failure
from cloudbridge_wireguard.netlink import NetlinkThread
from cloudbridge_wireguard.uapi import DeviceStatus, PeerStatus
from cloudbridge_wireguard.wire import decode_key


class KernelWireGuard:
    """A kernel WireGuard interface (already created by :meth:`Links.add_wireguard`)."""

    backend = "kernel"

    def __init__(self, interface: str, links: Links) -> None:
        self.interface = interface
        self._links = links
        self._wg = NetlinkThread(WireGuard)

    async def _set(self, what: str, **kwargs: Any) -> None:
        try:
            await self._wg.call("set", self.interface, **kwargs)
        except (NetlinkError, OSError) as error:
            raise failure(what, error_code(error)) from None
        except ValueError:  # pyroute2's own key checks; ours ran first, so a peer key
            raise OverlayFailed(f"{what} failed: a key was refused") from None

    async def configure(self, private_key: str, listen_port: int) -> None:
        decode_key(private_key, "the overlay's private key")
        await self._set(
            f"setting {self.interface}'s key and port",
            private_key=private_key,
            listen_port=listen_port,
        )

    async def status(self) -> DeviceStatus:
        try:
            messages = list(await self._wg.call("info", self.interface))
        except (NetlinkError, OSError) as error:
            raise failure(f"reading {self.interface}", error_code(error)) from None
        listen_port, peers = 0, {}
        for message in messages:
            listen_port = message.get("WGDEVICE_A_LISTEN_PORT") or listen_port
            for peer in message.get("WGDEVICE_A_PEERS") or ():
                key = peer.get("WGPEER_A_PUBLIC_KEY")["value"]
                key = key.decode() if isinstance(key, bytes) else str(key)
                endpoint = peer.get("WGPEER_A_ENDPOINT")
                handshake = peer.get("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                peers[key] = PeerStatus(
                    public_key=key,
                    endpoint=(endpoint["addr"], endpoint["port"]) if endpoint else None,
                    allowed_ips=tuple(
                        a["addr"] for a in peer.get("WGPEER_A_ALLOWEDIPS") or () if "addr" in a
                    ),
                    keepalive_seconds=peer.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
                    rx_bytes=peer.get("WGPEER_A_RX_BYTES") or 0,
                    tx_bytes=peer.get("WGPEER_A_TX_BYTES") or 0,
                    last_handshake=handshake.get("tv_sec", 0) + handshake.get("tv_nsec", 0) / 1e9,
                )
        return DeviceStatus(listen_port=listen_port, peers=peers)

    async def apply(
        self, peers: Sequence[OverlayPeer], existing: frozenset[str], remove: Sequence[str]
    ) -> None:
        # one request per peer (pyroute2 sets one peer at a time); a new endpoint on an
        # existing peer is an update, so its session stays
        for peer in peers:
            decode_key(peer.public_key, f"peer key {peer.public_key!r}")
            wanted: dict[str, Any] = {
                "public_key": peer.public_key,
                "persistent_keepalive": max(0, int(peer.keepalive_seconds)),
                "replace_allowed_ips": True,
                "allowed_ips": list(peer.allowed_ips),
                "update_only": peer.public_key in existing,
            }
            if peer.endpoint is not None:
                wanted["endpoint_addr"], wanted["endpoint_port"] = peer.endpoint
            await self._set(f"setting peer {peer.public_key}", peer=wanted)
        for public_key in remove:
            await self._set(
                f"removing peer {public_key}", peer={"public_key": public_key, "remove": True}
            )

    async def close(self) -> None:
        self._wg.close()
        await self._links.delete(self.interface)
