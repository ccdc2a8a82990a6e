"""Copy bytes both ways between a multiplexed stream and a TCP connection.

Each direction ends on its own (half-close propagates: EOF from one side becomes
``close_write`` / ``write_eof`` on the other); an error on either side aborts both. Reads
are bounded by ``buffer_size`` and writes wait for the other side (backpressure end to
end), so a slow reader never makes memory grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

from cloudbridge_core.errors import TransportError
from cloudbridge_core.providers import Stream


@dataclass
class PumpResult:
    """Bytes moved each way: ``sent`` is TCP → stream, ``received`` is stream → TCP."""

    sent: int = 0
    received: int = 0
    error: str | None = None


def tune(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY: tunnelled request/response traffic must not wait for Nagle."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def pump(
    stream: Stream,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    buffer_size: int = 65536,
    result: PumpResult | None = None,
) -> PumpResult:
    """Run until both directions have ended; never raises for a peer's failure.

    ``result`` is updated as bytes move, so a caller sees the counts even if cancelled.
    """
    result = result if result is not None else PumpResult()

    async def tcp_to_stream() -> None:
        while data := await reader.read(buffer_size):
            await stream.write(data)
            result.sent += len(data)
        await stream.close_write()

    async def stream_to_tcp() -> None:
        while data := await stream.read(buffer_size):
            writer.write(data)
            await writer.drain()
            result.received += len(data)
        if writer.can_write_eof():
            writer.write_eof()

    tasks = [asyncio.create_task(tcp_to_stream()), asyncio.create_task(stream_to_tcp())]
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    except (OSError, TransportError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TransportError):
            await stream.aclose()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return result
