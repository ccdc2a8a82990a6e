"""A hostile client for the rate-limit tests, in its own process so that its CPU is not the
relay's: it authenticates over TLS from 127.0.0.2, floods one kind of request until the
relay disconnects it or ``--seconds`` pass, and prints what happened as one JSON line.

    python -m tests.flooder KIND --port PORT --ca CA.pem --token-file FILE --seconds 10

KIND: ``ping`` and ``mesh_refresh`` (control messages), ``mux_ping`` (multiplexer PING
frames), ``open_reset`` (a stream opened and reset at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import os
import time
from pathlib import Path

from cloudbridge_core.errors import CloudBridgeError
from cloudbridge_core.protocol import messages
from cloudbridge_core.tlsutil import client_context
from cloudbridge_core.transports.mux_session import MuxSession, ProtocolPipe
from cloudbridge_core.wire import MessageStream

SOURCE = "127.0.0.2"  # not the bystander's address: the per-address buckets stay apart


class Flood:
    def __init__(self) -> None:
        self.sent = 0
        self.pongs = 0
        self.error: str | None = None
        self.ended = asyncio.Event()

    async def read(self, control: MessageStream) -> None:
        with contextlib.suppress(CloudBridgeError):
            while True:
                message = await control.receive()
                if isinstance(message, messages.Pong):
                    self.pongs += 1
                elif isinstance(message, messages.ErrorMessage):
                    self.error = message.code
                    break  # told why: it leaves, as a client does
        self.ended.set()


async def send(
    kind: str,
    session: MuxSession,
    control: MessageStream,
    flood: Flood,
    transport: asyncio.Transport,
) -> None:
    with contextlib.suppress(CloudBridgeError):
        while True:
            # a dropped connection only logs on write: stop at it, and yield each round so
            # that the reader sees the relay's answer
            if session.is_closed or transport.is_closing():
                return
            await asyncio.sleep(0)
            # never block in a flush: the session's reader flushes too, and would wait behind
            # it instead of reading what the relay says (its rate_limited)
            while transport.get_write_buffer_size() > 16384:  # noqa: ASYNC110 (no event tells)
                await asyncio.sleep(0.001)
            if kind == "ping":
                await control.send(messages.Ping(flood.sent % 2**31))
            elif kind == "mesh_refresh":
                await control.send(messages.MeshRefresh())
            elif kind == "mux_ping":
                # no public call sends a bare PING: the flood drives the connection directly
                session._connection.ping(flood.sent % 2**32)
                await session.flush()
            else:
                stream = await session.open_stream()
                await stream.aclose()  # not yet ended by the relay: a reset
            flood.sent += 1


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["ping", "mesh_refresh", "mux_ping", "open_reset"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    # a flooder that hangs says where (on stderr) and ends, whatever its event loop does
    faulthandler.dump_traceback_later(args.seconds + 20, exit=True)
    transport, pipe = await asyncio.get_running_loop().create_connection(
        ProtocolPipe,
        "127.0.0.1",
        args.port,
        ssl=client_context(args.ca.read_bytes()),
        server_hostname="127.0.0.1",
        local_addr=(SOURCE, 0),
    )
    session = MuxSession(pipe, is_dialer=True)
    control = MessageStream(await session.open_stream(), messages.MAX_RELAY_MESSAGE_SIZE)
    await control.send(
        messages.Hello(token=args.token_file.read_text().strip(), client_version="flooder")
    )
    await control.expect(messages.Welcome)
    flood = Flood()
    started = time.monotonic()
    tasks = [
        asyncio.create_task(flood.read(control)),
        asyncio.create_task(send(args.kind, session, control, flood, transport)),
    ]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(flood.ended.wait(), args.seconds)
    elapsed = time.monotonic() - started
    report = {
        "sent": flood.sent,
        "pongs": flood.pongs,
        "error": flood.error,
        "disconnected": flood.ended.is_set(),
        "seconds": round(elapsed, 3),
    }
    print(json.dumps(report), flush=True)
    # no goodbye: a flooder does not wait for a relay it has flooded (the OS closes the socket)
    del tasks  # left running: the process ends here
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
