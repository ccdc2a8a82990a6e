"""The interface through netlink (pyroute2): create, address, MTU, up, delete; and the
capability all of it needs. Every pyroute2 or OS error leaves as :class:`OverlayFailed`.

A :class:`Links` talks to the network namespace it was created in (a netlink socket stays
in its namespace), so the overlay makes one in ``up`` and keeps it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

from cloudbridge_core.api import NO_NET_ADMIN, OverlayFailed, get_logger
from pyroute2 import IPRoute  # type: ignore[import-untyped]  # pyroute2 ships no types
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from cloudbridge_wireguard.netlink import NetlinkThread

log = get_logger("overlay.wireguard")

#: what the overlay's interface can be: a kernel WireGuard link or wireguard-go's TUN
OVERLAY_KINDS = frozenset({"wireguard", "tun"})


@contextmanager
def netlink_errors(action: str) -> Iterator[None]:
    """Map pyroute2's and the OS's errors while doing ``action`` (named in the message)."""
    try:
        yield
    except (NetlinkError, OSError) as error:
        raise failure(action, error_code(error)) from None


def error_code(error: NetlinkError | OSError) -> int:
    code = error.code if isinstance(error, NetlinkError) else error.errno
    return code if isinstance(code, int) and code > 0 else errno.EIO


def failure(action: str, code: int) -> OverlayFailed:
    if code in (errno.EPERM, errno.EACCES):
        return OverlayFailed(NO_NET_ADMIN)
    return OverlayFailed(f"{action} failed: {os.strerror(code)}")


def parse_addresses(
    addresses: Sequence[str],
) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    parsed = []
    for address in addresses:
        try:
            parsed.append(ipaddress.ip_interface(address))
        except ValueError:
            raise OverlayFailed(
                f"overlay address {address!r} is not an address with a prefix (100.64.0.5/10)"
            ) from None
    return parsed


class Links:
    """Netlink requests for the overlay's interface."""

    def __init__(self) -> None:
        self._ipr = NetlinkThread(IPRoute)

    async def index(self, name: str) -> int | None:
        with netlink_errors(f"looking up interface {name}"):
            found = await self._ipr.call("link_lookup", ifname=name)
        return found[0] if found else None

    async def add_wireguard(self, name: str) -> bool:
        """Create a kernel WireGuard interface; ``False`` when the kernel has none."""
        log.debug("overlay change", change=f"ip link add {name} type wireguard")
        try:
            await self._ipr.call("link", "add", ifname=name, kind="wireguard")
        except (NetlinkError, OSError) as error:
            if error_code(error) in (errno.EOPNOTSUPP, errno.ENODEV, errno.ENOENT):
                return False
            raise failure(f"creating WireGuard interface {name}", error_code(error)) from None
        return True

    async def kind(self, name: str) -> str | None:
        """The interface's kind (``wireguard``, ``tun``, ``veth``...), ``""`` for one
        without, ``None`` when there is no such interface."""
        index = await self.index(name)
        if index is None:
            return None
        with netlink_errors(f"reading interface {name}"):
            (link,) = await self._ipr.call("link", "get", index=index)
        return str(link.get(("linkinfo", "kind")) or "")

    async def delete(self, name: str, kinds: Collection[str] = OVERLAY_KINDS) -> bool:
        """Delete the interface if it exists; whether it did. One of another kind than
        ``kinds`` is not the overlay's: that is an error, and it stays."""
        index = await self.index(name)
        if index is None:
            return False
        kind = await self.kind(name)
        if kind is not None and kind not in kinds:
            raise OverlayFailed(
                f"interface {name} exists and is not a WireGuard interface (it is "
                f"{kind or 'a device without a kind'}): set another overlay.interface"
            )
        log.debug("overlay change", change=f"ip link del {name}")
        try:
            await self._ipr.call("link", "del", index=index)
        except (NetlinkError, OSError) as error:
            if error_code(error) == errno.ENODEV:  # gone meanwhile (its wireguard-go exited)
                return True
            raise failure(f"deleting interface {name}", error_code(error)) from None
        return True

    async def configure(self, name: str, addresses: Sequence[str], mtu: int) -> None:
        """Give ``name`` its addresses (with their prefix: the kernel then routes the whole
        pool through it), its MTU, and bring it up."""
        index = await self.index(name)
        if index is None:
            raise OverlayFailed(f"interface {name} vanished while it was being set up")
        for address in parse_addresses(addresses):
            log.debug("overlay change", change=f"ip address add {address} dev {name}")
            try:
                await self._ipr.call(
                    "addr",
                    "add",
                    index=index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                )
            except (NetlinkError, OSError) as error:
                if error_code(error) != errno.EEXIST:  # an earlier attempt added it
                    raise failure(f"adding {address} to {name}", error_code(error)) from None
        log.debug("overlay change", change=f"ip link set mtu {mtu} up dev {name}")
        with netlink_errors(f"setting MTU {mtu} and bringing {name} up"):
            await self._ipr.call("link", "set", index=index, mtu=mtu, state="up")

    def close(self) -> None:
        self._ipr.close()
