"""The fast path: WireGuard's packets leave from, and arrive on, the UDP port a NAT
strategy punched, with no Python in between.

wireguard-go (or the kernel) listens on its own port L; the punched port P belongs to the
client's Python socket, which the NAT mapping and the peer know. An nftables table owned
by the interface (``inet cb_<interface>``) rewrites ports statelessly, before conntrack
and before the socket lookup:

- leaving: UDP from L to the peer's endpoint gets source port P (``notrack``): the NAT
  maps it as it maps the Python socket's packets, onto the punched mapping;
- arriving: UDP from the peer's endpoint to P whose payload starts like a WireGuard
  message (type 1..4 and three zero bytes, ``@th,64,32``) gets destination port L, so it
  reaches WireGuard; everything else on P (QUIC, STUN) still reaches the Python socket.

The table is rebuilt in one nft transaction on every change, and deleted by ``down``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from cloudbridge_core.api import OverlayFailed, OverlayPeer, get_logger, nft_installed, run_nft

from cloudbridge_wireguard.wire import MESSAGE_HEADS, MIN_MESSAGE_BYTES

log = get_logger("overlay.wireguard")

NOT_INSTALLED = (
    "the overlay's fast path (peers with a source_port) needs nftables: install the "
    "Debian package nftables (apt install nftables)"
)
_HEADS = ", ".join(f"0x{head:08x}" for head in MESSAGE_HEADS)


@dataclass(frozen=True, slots=True, order=True)
class Rewrite:
    """The peer at ``host``:``port`` is reached from local port ``source_port``."""

    host: str
    port: int
    source_port: int


def rewrites(peers: Iterable[OverlayPeer], listen_port: int) -> tuple[Rewrite, ...]:
    """The rewrites ``peers`` need: those with an endpoint and a source port other than
    the overlay's own."""
    found = set()
    for peer in peers:
        if peer.endpoint is None or peer.source_port is None:
            continue
        if not 0 < peer.source_port < 65536:
            raise OverlayFailed(
                f"peer {peer.public_key}: source_port {peer.source_port} is out of range"
            )
        if peer.source_port == listen_port:
            continue
        host, port = peer.endpoint
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise OverlayFailed(f"peer endpoint {host!r} is not an IP address") from None
        found.add(Rewrite(str(address), int(port), int(peer.source_port)))
    return tuple(sorted(found))


def table_name(interface: str) -> str:
    return f"cb_{interface}"


def ruleset(interface: str, listen_port: int, wanted: Iterable[Rewrite]) -> str:
    """An nft script that replaces the interface's table in one transaction (an empty
    ``wanted`` deletes it). Sans-IO."""
    table = f"inet {table_name(interface)}"
    # declaring then deleting works whether the table exists or not
    script = [f"table {table} {{}}", f"delete table {table}"]
    wanted = list(wanted)
    if not wanted:
        return "\n".join(script) + "\n"
    leaving, arriving = [], []
    for rewrite in wanted:
        family = "ip6" if ipaddress.ip_address(rewrite.host).version == 6 else "ip"
        leaving.append(
            f"    {family} daddr {rewrite.host} udp sport {listen_port} udp dport {rewrite.port}"
            f" counter notrack udp sport set {rewrite.source_port}"
        )
        arriving.append(
            f"    {family} saddr {rewrite.host} udp sport {rewrite.port}"
            f" udp dport {rewrite.source_port} udp length >= {8 + MIN_MESSAGE_BYTES}"
            f" @th,64,32 {{ {_HEADS} }} counter notrack udp dport set {listen_port}"
        )
    script += [
        f"table {table} {{",
        "  chain leaving {",
        "    type filter hook output priority raw; policy accept;",
        *leaving,
        "  }",
        "  chain arriving {",
        "    type filter hook prerouting priority raw; policy accept;",
        *arriving,
        "  }",
        "}",
    ]
    return "\n".join(script) + "\n"


async def apply(script: str, *, required: bool) -> None:
    """Run ``script`` as one nft transaction in this process's network namespace.

    Without nft installed, this is an error only when ``required`` (there are rewrites to
    make; a table to delete cannot exist without nft)."""
    if not nft_installed():
        if required:
            raise OverlayFailed(NOT_INSTALLED)
        return
    await run_nft(script, "the overlay's fast-path rules")
