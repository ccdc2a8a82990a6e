"""Run inside a test's network namespace: an echo server, or a paced, sha256-checked round
trip through a local port (``python ns_tools.py echo PORT`` / ``roundtrip PORT SIZE SECONDS``);
PORT may be HOST:PORT (default host 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys


async def echo(host: str, port: int) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        writer.close()

    server = await asyncio.start_server(serve, host, port)
    print("echo ready", flush=True)
    async with server:
        await server.serve_forever()


async def roundtrip(host: str, port: int, size: int, seconds: float) -> None:
    payload = os.urandom(size)
    reader, writer = await asyncio.open_connection(host, port)
    chunk = 64 * 1024
    pause = seconds / max(1, size // chunk)

    async def send() -> None:
        for start in range(0, size, chunk):
            writer.write(payload[start : start + chunk])
            await writer.drain()
            await asyncio.sleep(pause)
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = bytearray()
    while data := await reader.read(65536):
        received += data
    await sender
    writer.close()
    print(hashlib.sha256(payload).hexdigest(), hashlib.sha256(received).hexdigest(), flush=True)


if __name__ == "__main__":
    where, _, number = sys.argv[2].rpartition(":")
    if sys.argv[1] == "echo":
        asyncio.run(echo(where or "127.0.0.1", int(number)))
    else:
        asyncio.run(
            roundtrip(where or "127.0.0.1", int(number), int(sys.argv[3]), float(sys.argv[4]))
        )
