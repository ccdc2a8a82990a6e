"""Accepting, connecting and pumping on a loop without readiness callbacks.

Windows' proactor loop has no ``add_reader``/``add_writer`` (they raise
``NotImplementedError``); the byte path falls back to ``sock_accept``, ``sock_connect`` and
``sock_recv_into`` there. Windows cannot run on this machine, so a selector loop that
refuses readiness callbacks, as the proactor does, stands in for it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from cloudbridge_core.accept import accept_forever
from cloudbridge_core.pump import connect, prepare, pump

pytestmark = pytest.mark.timeout(30)


class NoReadinessLoop(asyncio.SelectorEventLoop):
    """Refuses readiness callbacks as Windows' proactor does; its ``sock_*`` calls work."""

    def add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:
        raise NotImplementedError

    def add_writer(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:
        raise NotImplementedError


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = NoReadinessLoop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class EchoStream:
    """A stream that reads back what was written to it, then the end once closed."""

    def __init__(self) -> None:
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()

    async def read(self, max_bytes: int = 65536) -> bytes:
        return await self._chunks.get()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._chunks.put_nowait(bytes(data))

    async def close_write(self) -> None:
        self._chunks.put_nowait(b"")

    async def reset(self) -> None:
        self._chunks.put_nowait(b"")

    async def aclose(self) -> None:
        return None


def test_a_listener_accepts_with_sock_accept() -> None:
    async def main() -> None:
        accepted: list[socket.socket] = []
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            acceptor = asyncio.ensure_future(
                accept_forever(listener, lambda connection, _: accepted.append(connection))
            )
            with socket.create_connection(listener.getsockname()):
                for _ in range(200):
                    if accepted:
                        break
                    await asyncio.sleep(0.01)
            acceptor.cancel()
            await asyncio.gather(acceptor, return_exceptions=True)
        assert len(accepted) == 1
        accepted[0].close()

    run(main)


def test_a_socket_connects_and_is_pumped_without_readiness_callbacks() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            sock = prepare(socket.socket())
            await connect(sock, listener.getsockname())
            application, _ = await loop.sock_accept(listener)
        pumping = asyncio.ensure_future(pump(EchoStream(), sock))  # type: ignore[arg-type]
        payload = os.urandom(1 << 20)
        await loop.sock_sendall(application, payload)
        application.shutdown(socket.SHUT_WR)
        echoed = bytearray()
        while data := await loop.sock_recv(application, 65536):
            echoed += data
        application.close()
        result = await pumping
        assert echoed == payload
        assert (result.sent, result.received, result.error) == (len(payload), len(payload), None)

    run(main)
