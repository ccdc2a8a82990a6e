"""The pump between a TCP socket and a stream of the TLS transport's multiplexer, the path
every relayed byte takes: its direct form (no tasks) on real loopback sockets, with a
small window so that flow control holds the socket back many times over."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
from cloudbridge_core.protocol.mux import MuxLimits
from cloudbridge_core.providers import Endpoint, Session
from cloudbridge_core.pump import PumpResult, connect, prepare, pump
from cloudbridge_core.testing.tls import loopback_tls
from cloudbridge_core.transports.mux_session import MuxSession, MuxStream
from cloudbridge_core.transports.tls import TlsTransport

pytestmark = pytest.mark.timeout(60)

#: a window a sixty-fourth of what is sent: the sockets are held back over and over
LIMITS = MuxLimits(initial_window=64 * 1024, max_frame_size=16 * 1024)
SIZE = 4 * 1024 * 1024


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of loopback TCP sockets (an RST needs TCP)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    return outer, inner


#: (the application's socket, the target's socket, the two pumps' results and tasks)
Scenario = Callable[
    [socket.socket, socket.socket, list[PumpResult], list[asyncio.Task[PumpResult]]],
    Awaitable[None],
]


def run(scenario: Scenario) -> None:
    """A tunnel in one process: the application's socket is pumped into a stream of a TLS
    session, the accepting side's stream into the target's socket."""

    async def main() -> None:
        server_tls, client_tls = loopback_tls()
        transport = TlsTransport(LIMITS)
        accepted: asyncio.Queue[MuxSession] = asyncio.Queue()

        async def handle(session: Session) -> None:
            assert isinstance(session, MuxSession)
            accepted.put_nowait(session)
            await session.wait_closed()

        listener = await transport.serve(Endpoint("127.0.0.1", 0, server_tls), handle)
        client = await transport.connect(Endpoint("127.0.0.1", listener.port, client_tls))
        assert isinstance(client, MuxSession)
        application, near = tcp_pair()
        target, far = tcp_pair()
        try:
            outgoing = await client.open_stream()
            incoming = await (await accepted.get()).accept_stream()
            for stream in (outgoing, incoming):
                assert isinstance(stream, MuxStream)
                assert stream.direct  # the path under test, not the two-task pump
            results = [PumpResult(), PumpResult()]
            tasks = [
                asyncio.create_task(pump(outgoing, prepare(near), result=results[0])),
                asyncio.create_task(pump(incoming, prepare(far), result=results[1])),
            ]
            application.setblocking(False)
            target.setblocking(False)
            await scenario(application, target, results, tasks)
        finally:
            application.close()
            target.close()
            await client.aclose()
            await listener.aclose()

    asyncio.run(main())


async def receive_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while data := await loop.sock_recv(sock, 1 << 16):
        received += data
    return bytes(received)


async def send_and_end(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


def test_bytes_cross_both_ways_exactly_and_half_close_passes_on() -> None:
    request, answer = os.urandom(SIZE), os.urandom(SIZE + 1)

    async def scenario(
        application: socket.socket,
        target: socket.socket,
        results: list[PumpResult],
        tasks: list[asyncio.Task[PumpResult]],
    ) -> None:
        sending = asyncio.create_task(send_and_end(application, request))
        # the target reads the whole request to its end before it answers: the end
        # reached it while the application can still read
        assert hashlib.sha256(await receive_all(target)).digest() == (
            hashlib.sha256(request).digest()
        )
        await sending
        answering = asyncio.create_task(send_and_end(target, answer))
        assert hashlib.sha256(await receive_all(application)).digest() == (
            hashlib.sha256(answer).digest()
        )
        await answering
        await asyncio.gather(*tasks)
        assert (results[0].sent, results[0].received, results[0].error) == (SIZE, SIZE + 1, None)
        assert (results[1].sent, results[1].received, results[1].error) == (SIZE + 1, SIZE, None)

    run(scenario)


def test_a_target_reset_mid_transfer_reaches_the_application_as_a_reset() -> None:
    async def scenario(
        application: socket.socket,
        target: socket.socket,
        results: list[PumpResult],
        tasks: list[asyncio.Task[PumpResult]],
    ) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(target, os.urandom(SIZE))
        target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        target.close()
        with pytest.raises(ConnectionResetError):
            await receive_all(application)
        await asyncio.gather(*tasks)
        assert results[0].error is not None
        assert results[1].error is not None

    run(scenario)


def test_a_cancelled_pump_resets_both_ends() -> None:
    async def scenario(
        application: socket.socket,
        target: socket.socket,
        _results: list[PumpResult],
        tasks: list[asyncio.Task[PumpResult]],
    ) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(application, b"hello")
        assert await loop.sock_recv(target, 5) == b"hello"
        tasks[0].cancel()  # the tunnel's client going away with the connection open
        with pytest.raises(ConnectionResetError):
            await receive_all(application)
        with pytest.raises(ConnectionResetError):
            await receive_all(target)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert tasks[0].cancelled()

    run(scenario)


#: the loops the client and the relay run on (uvloop wherever it is installed)
LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio")]
if importlib.util.find_spec("uvloop") is not None:
    import uvloop

    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))


@pytest.mark.parametrize("new_loop", LOOPS)
def test_connect_reaches_a_listener_and_reports_a_refused_port(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            with prepare(socket.socket()) as sock:
                await connect(sock, listener.getsockname())
                accepted, _ = listener.accept()
                with accepted:
                    assert accepted.getpeername() == sock.getsockname()
            closed_port = listener.getsockname()
        with prepare(socket.socket()) as sock, pytest.raises(ConnectionRefusedError):
            await connect(sock, closed_port)

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())
