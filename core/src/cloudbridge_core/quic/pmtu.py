"""Datagram size from the path MTU the kernel knows, instead of QUIC's fixed 1,200 bytes.

Packets go out with "don't fragment" set, so the kernel runs path MTU discovery: an ICMP
"fragmentation needed" from a router lowers its per-destination figure, and a send larger
than that fails with EMSGSIZE instead of vanishing. The connection asks for that figure
after the handshake and again whenever a send fails, and never goes below QUIC's minimum.
"""

from __future__ import annotations

import contextlib
import errno
import socket

from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.connection import QuicConnection

#: IPv4 + UDP headers; IPv6 adds 20 more
_IPV4_OVERHEAD = 28
_IPV6_OVERHEAD = 48
# Linux values, absent from the socket module
_IP_MTU_DISCOVER = 10
_IP_PMTUDISC_DO = 2
_IP_MTU = 14
_IPV6_MTU_DISCOVER = 23
_IPV6_MTU = 24


def forbid_fragmentation(sock: socket.socket) -> None:
    """Set "don't fragment" so that the kernel discovers the path MTU (Linux only)."""
    # not Linux, or an IPv6-only socket: the datagram size stays at the safe minimum
    with contextlib.suppress(OSError):
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _IP_PMTUDISC_DO)
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)


def path_payload_size(address: tuple[str, int], ceiling: int) -> int:
    """The largest QUIC payload the path to ``address`` carries, up to ``ceiling``."""
    host = address[0].removeprefix("::ffff:")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            forbid_fragmentation(probe)
            probe.connect((host, address[1]))
            if family == socket.AF_INET6:
                mtu = probe.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU) - _IPV6_OVERHEAD
            else:
                mtu = probe.getsockopt(socket.IPPROTO_IP, _IP_MTU) - _IPV4_OVERHEAD
        except OSError:
            return SMALLEST_MAX_DATAGRAM_SIZE
    return max(SMALLEST_MAX_DATAGRAM_SIZE, min(ceiling, mtu))


def apply_datagram_size(connection: QuicConnection, size: int) -> None:
    """Change the size of the datagrams a live connection builds (aioquic keeps three copies)."""
    connection._max_datagram_size = size
    connection._loss._cc._max_datagram_size = size  # type: ignore[attr-defined]
    connection._loss._pacer._max_datagram_size = size


def is_too_big(error: Exception) -> bool:
    return isinstance(error, OSError) and error.errno == errno.EMSGSIZE
