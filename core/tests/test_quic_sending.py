"""How the QUIC session sends: a transmit's datagrams in segmented sends (UDP GSO) on
real loopback sockets, the pacer that wakes once per batch of packets, and the sockets'
buffers."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aioquic.quic.recovery import QuicPacketRecovery
from cloudbridge_core.quic.buffers import UDP_BUFFER, widen_buffers
from cloudbridge_core.quic.gso import MAX_BYTES, DatagramSender
from cloudbridge_core.quic.pacing import PACING_BATCH, PACING_TICK, BatchPacer

pytestmark = pytest.mark.timeout(30)

SIZE = 1472


def receive(sock: socket.socket, count: int) -> list[bytes]:
    sock.settimeout(5)
    return [sock.recv(65535) for _ in range(count)]


async def sent_through(datagrams: list[tuple[bytes, Any]]) -> tuple[list[int], list[OSError]]:
    """Send ``datagrams`` with a DatagramSender on a fresh endpoint; the sizes of its
    segmented sends (one system call each) and the errors it reported."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    errors: list[OSError] = []
    sender = DatagramSender(transport, errors.append)
    segmented: list[int] = []
    send = sender._segmented

    def counted(batch: list[bytes], address: Any) -> bool:
        done = send(batch, address)
        if done:
            segmented.append(len(batch))
        return done

    sender._segmented = counted  # type: ignore[method-assign]
    try:
        sender.send(datagrams)
    finally:
        transport.close()
    return segmented, errors


def test_a_transmit_leaves_in_few_sends_and_arrives_datagram_by_datagram() -> None:
    with (
        socket.socket(type=socket.SOCK_DGRAM) as far,
        socket.socket(type=socket.SOCK_DGRAM) as other,
    ):
        far.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        # full datagrams, a short one (it ends a segmented send), more full ones, then
        # some to another address, as a transmit probing a second path does
        to_far = [bytes([i]) * SIZE for i in range(60)] + [b"short"] + [b"f" * SIZE] * 3
        to_other = [b"o" * SIZE] * 2
        datagrams = [(d, far.getsockname()) for d in to_far]
        datagrams += [(d, other.getsockname()) for d in to_other]

        segmented, errors = asyncio.run(sent_through(datagrams))

        assert receive(far, len(to_far)) == to_far
        assert receive(other, len(to_other)) == to_other
    assert errors == []
    per_send = MAX_BYTES // SIZE  # the kernel's 64 KiB bound, in datagrams
    assert segmented == [per_send, 60 - per_send + 1, 3, 2]


def test_without_a_socket_each_datagram_goes_through_the_transport() -> None:
    """A peer session's transport has no socket: the sender falls back to sendto."""
    sent: list[tuple[bytes, Any]] = []
    transport = SimpleNamespace(
        get_extra_info=lambda name, default=None: default,
        get_write_buffer_size=lambda: 0,
        sendto=lambda data, address: sent.append((data, address)),
    )
    sender = DatagramSender(cast("asyncio.DatagramTransport", transport), lambda _: None)
    datagrams = [(b"d" * SIZE, ("192.0.2.1", 9))] * 5

    sender.send(datagrams)

    assert sent == datagrams


def pacer(in_flight: int, window: int) -> BatchPacer:
    recovery = SimpleNamespace(bytes_in_flight=in_flight, congestion_window=window)
    paced = BatchPacer(cast("QuicPacketRecovery", recovery), max_datagram_size=SIZE)
    paced.update_rate(congestion_window=window, smoothed_rtt=0.01)
    return paced


def test_an_empty_bucket_waits_for_a_batch_of_packets_and_a_timer_tick() -> None:
    paced = pacer(in_flight=0, window=200 * SIZE)
    now = 100.0
    while paced.next_send_time(now) is None:  # send until the bucket is empty
        paced.update_after_send(now)
    assert paced.packet_time is not None
    wait = max(PACING_BATCH * paced.packet_time, PACING_TICK)
    assert paced.next_send_time(now) == pytest.approx(now + wait)
    # and after that wait, all that accrued may go at once: a batch at least
    later = now + wait
    for _ in range(max(PACING_BATCH, round(wait / paced.packet_time))):
        assert paced.next_send_time(later) is None
        paced.update_after_send(later)


def test_a_full_congestion_window_holds_sending_without_a_pacing_timer() -> None:
    paced = pacer(in_flight=200 * SIZE, window=200 * SIZE)
    now = 100.0
    for _ in range(100):
        paced.update_after_send(now)
    # the window holds sending back; the next acknowledgement transmits, not a timer
    assert paced.next_send_time(now) is None


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's buffer sizes and caps")
def test_quic_sockets_get_the_largest_buffers_the_kernel_allows() -> None:
    caps = {
        socket.SO_RCVBUF: int(Path("/proc/sys/net/core/rmem_max").read_text()),
        socket.SO_SNDBUF: int(Path("/proc/sys/net/core/wmem_max").read_text()),
    }
    with socket.socket(type=socket.SOCK_DGRAM) as sock:
        widen_buffers(sock)
        for option, cap in caps.items():
            # Linux doubles what it grants, for its own bookkeeping
            assert sock.getsockopt(socket.SOL_SOCKET, option) >= 2 * min(UDP_BUFFER, cap)
