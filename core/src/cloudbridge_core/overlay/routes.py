"""Whether an overlay pool would shadow a network this host already routes to.

The overlay routes its whole pool through its interface; a LAN or VPN route inside or
around the pool would then silently lose traffic one way or the other. The main IPv4
table is read from ``/proc/net/route`` (Linux); elsewhere nothing is checked.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

ROUTES = Path("/proc/net/route")


def local_routes(table: Path = ROUTES) -> list[tuple[ipaddress.IPv4Network, str]]:
    """The host's IPv4 routes other than the default one, with their interfaces."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return []
    routes = []
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        destination, mask = (_address(fields[1]), _address(fields[7]))
        network = ipaddress.IPv4Network(f"{destination}/{mask}", strict=False)
        if network.prefixlen:
            routes.append((network, fields[0]))
    return routes


def conflicting_route(
    pool: ipaddress.IPv4Network, own_interface: str, table: Path = ROUTES
) -> str | None:
    """The first route of another interface that overlaps ``pool``, as ``ip route``
    writes it (``100.64.0.0/10 dev tailscale0``); None when there is none."""
    for network, interface in local_routes(table):
        if interface != own_interface and network.overlaps(pool):
            return f"{network} dev {interface}"
    return None


def _address(little_endian_hex: str) -> str:
    return socket.inet_ntoa(struct.pack("<I", int(little_endian_hex, 16)))


def routed_through(address: str, table: Path = ROUTES) -> str | None:
    """The interface of the most specific route (not the default one) that holds
    ``address``: where this host sends it; None when only the default route does."""
    ip = ipaddress.IPv4Address(address)
    holding = [(network, interface) for network, interface in local_routes(table) if ip in network]
    if not holding:
        return None
    return max(holding, key=lambda route: route[0].prefixlen)[1]
