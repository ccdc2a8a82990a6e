"""Socket buffers for QUIC's UDP sockets, large enough for what arrives while the loop is busy.

A UDP socket's default receive buffer (208 KiB on Linux) holds about 140 datagrams of
1,472 bytes: a bulk transfer across a 1,500-byte MTU link lost 50 to 100 datagrams in
64 MiB to full buffers (``RcvbufErrors`` in ``/proc/net/snmp``) whenever the receiving
process was busy a moment, and each loss halves a congestion window that takes long to
grow back. QUIC libraries in other languages ask for several MiB for the same reason.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

#: bytes asked for each way; Linux caps the request at net.core.rmem_max and wmem_max
UDP_BUFFER = 4 << 20


def widen_buffers(sock: Any) -> None:
    """Ask for :data:`UDP_BUFFER` bytes of receive and send buffer on ``sock`` (a socket or
    the loop's stand-in for one), never shrinking one set larger already."""
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):  # a platform or socket that refuses keeps its own
            if sock.getsockopt(socket.SOL_SOCKET, option) < UDP_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
