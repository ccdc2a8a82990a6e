"""A TCP proxy adding a fixed delay each way (this kernel has no netem).

Usage: python delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_SECONDS; prints "ready" on stderr.
Each chunk is forwarded DELAY after it arrived, in order, so the RTT grows by 2 x DELAY.
"""

from __future__ import annotations

import asyncio
import sys


async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait((loop.time() + delay, b""))
    await asyncio.gather(delivering, return_exceptions=True)


async def main(listen: int, target: int, delay: float) -> None:
    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(
            carry(reader, upstream_writer, delay),
            carry(upstream_reader, writer, delay),
            return_exceptions=True,
        )

    server = await asyncio.start_server(accepted, "0.0.0.0", listen)  # noqa: S104 - in a test netns
    print("ready", file=sys.stderr, flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
