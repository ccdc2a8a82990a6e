"""A transmit's datagrams in as few system calls as the kernel allows (UDP GSO, Linux).

aioquic hands over one datagram at a time, and a transport sends each with its own
``sendto``: across a 1,500-byte MTU that is one system call per 1,472 bytes, a fifth of
a sending relay's time in a profile. With UDP generic segmentation offload, one
``sendmsg`` carries up to 64 datagrams of one size to one address (the last may be
shorter) and the kernel cuts them apart. Where the kernel or the socket refuses it, or
the loop gives no socket (a peer session's virtual transport), each datagram goes
through the transport as before.

A connected socket (a client's, connected to the relay so that it hears ICMP errors)
sends without an address: uvloop refuses one on such a socket (EISCONN).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any

#: Linux's UDP_SEGMENT (absent from Python 3.11's socket module); level SOL_UDP (17)
_SOL_UDP = 17
_UDP_SEGMENT = 103
#: the kernel's limits for one segmented send: segments, and bytes of UDP payload
MAX_SEGMENTS = 64
MAX_BYTES = 65000
#: errors that say the kernel, the socket or the device cannot segment: stop trying
_UNSUPPORTED = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT})


class DatagramSender:
    """Sends datagrams through ``transport``, segmented where the kernel does it."""

    def __init__(
        self, transport: asyncio.DatagramTransport, on_error: Callable[[OSError], None]
    ) -> None:
        self._transport = transport
        self._on_error = on_error
        sock = transport.get_extra_info("socket")
        #: what the transport holds unsent (asyncio's and uvloop's UDP transports say)
        self._queued: Callable[[], int] | None = getattr(transport, "get_write_buffer_size", None)
        self._connected = transport.get_extra_info("peername") is not None
        self._fileno = -1
        self._family = socket.AF_INET
        if sys.platform == "linux" and sock is not None and self._queued is not None:
            self._fileno = sock.fileno()
            self._family = sock.family

    def send(self, datagrams: Iterable[tuple[bytes, Any]]) -> None:
        """Send ``datagrams`` (payload, address) in order."""
        batch: list[bytes] = []
        address: Any = None
        size = total = 0
        for data, destination in datagrams:
            to = None if self._connected else destination
            if batch and (
                to != address
                or len(data) > size
                or len(batch) == MAX_SEGMENTS
                or total + len(data) > MAX_BYTES
            ):
                self._send_batch(batch, address)
                batch = []
            if not batch:
                address, size, total = to, len(data), 0
            batch.append(data)
            total += len(data)
            if len(data) < size:  # a shorter datagram can only end a segmented send
                self._send_batch(batch, address)
                batch = []
        if batch:
            self._send_batch(batch, address)

    def _send_batch(self, batch: list[bytes], address: Any) -> None:
        # the transport's own queue goes first, or datagrams would overtake it
        if (
            len(batch) > 1
            and self._fileno >= 0
            and self._queued is not None
            and not self._queued()
            and self._segmented(batch, address)
        ):
            return
        for data in batch:
            self._transport.sendto(data, address)

    def _segmented(self, batch: list[bytes], address: Any) -> bool:
        """One ``sendmsg`` for ``batch``; False when it has to go the slow way instead."""
        # the loop's socket object cannot sendmsg (asyncio's wrapper hides it, uvloop's
        # refuses): a second object on the same descriptor, detached so it closes nothing
        sock = socket.socket(self._family, socket.SOCK_DGRAM, 0, self._fileno)
        try:
            segment = struct.pack("=H", len(batch[0]))
            sock.sendmsg(batch, [(_SOL_UDP, _UDP_SEGMENT, segment)], 0, address)
        except BlockingIOError:
            return False  # the socket's buffer is full: the transport queues them
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                self._on_error(error)  # as the transport reports a failed send
                return True
            self._fileno = -1
            return False
        finally:
            sock.detach()
        return True
