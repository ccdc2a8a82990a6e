"""The QUIC engine's own rate: two bare QUIC connections moving bulk data, nothing else.

What a peer tunnel on a UDP-only path is held to (issue 15): the same engine, datagram
size and receive windows as the peer session, without CloudBridge's sessions, streams,
pumps or sockets on either side. A server (run in the namespace) sinks and sources
streams; the client opens them, times each bulk run on one connection and prints the
figures as JSON. A stream starts with a command, as the target's connections do:

- ``U`` + 8-byte size: the server reads ``size`` bytes, then answers one byte and FIN;
- ``D`` + 8-byte size: the server sends ``size`` bytes and FIN.

    python quic_engine.py serve HOST PORT [options]     # prints "ready" once it listens
    python quic_engine.py run HOST PORT [options]       # prints the figures (JSON)

Options: --engine (aioquic; qh3 where installed, for comparison), --datagram-size,
--stream-window, --connection-window, --megabytes (each run's total), --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from cloudbridge_core.tlsutil import generate_ca

ALPN = "cloudbridge-bench/1"
MIB = 1 << 20
#: bytes handed to the engine at once, and the unsent bytes a stream may hold before its
#: writer waits for the engine to drain them (the peer session's own piece size)
PIECE = 64 * 1024
SOURCE = memoryview(bytes(range(256)) * (PIECE // 256))
#: the runs, as the bench's bulk figures: (direction, streams on the one connection)
RUNS = [("up", 1), ("down", 1), ("up", 8), ("down", 8)]


@dataclass
class Engine:
    """One QUIC library's modules, by the names aioquic and qh3 share."""

    name: str
    configuration: ModuleType
    events: ModuleType
    protocol: ModuleType
    client: ModuleType
    server: ModuleType
    tls: ModuleType

    @classmethod
    def load(cls, name: str) -> Engine:
        def module(path: str) -> ModuleType:
            return importlib.import_module(f"{name}.{path}")

        return cls(
            name,
            module("quic.configuration"),
            module("quic.events"),
            module("asyncio.protocol"),
            module("asyncio.client"),
            module("asyncio.server"),
            module("tls"),
        )

    def unsent(self, quic: Any, stream_id: int) -> int:
        """Bytes of the stream the engine holds and has not acknowledged (aioquic) or not
        sent yet (qh3): what a writer waits on."""
        if self.name == "qh3":
            return int(quic.get_send_buffer_size(stream_id))
        stream = quic._streams.get(stream_id)
        return 0 if stream is None else len(stream.sender._buffer)


@dataclass
class _Incoming:
    header: bytes = b""
    size: int = 0
    received: int = 0
    done: asyncio.Future[None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def protocol_class(engine: Engine) -> type[Any]:
    """A protocol for ``engine``: bulk streams in both directions, no buffering."""
    base: type[Any] = engine.protocol.QuicConnectionProtocol
    stream_data = engine.events.StreamDataReceived

    class Bulk(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.incoming: dict[int, _Incoming] = {}
            self.progress: asyncio.Future[None] | None = None
            self.tasks: set[asyncio.Task[None]] = set()

        def datagram_received(self, data: bytes | str, addr: Any) -> None:
            # one transmit (one acknowledgement) per batch of datagrams read together, as
            # the QUIC session does, instead of aioquic's transmit after each datagram
            self._quic.receive_datagram(data, addr, now=self._loop.time())
            self._process_events()
            self._transmit_soon()
            self.wake()

        def datagrams_received(self, data: list[bytes], addr: Any) -> None:
            super().datagrams_received(data, addr)
            self.wake()

        def wake(self) -> None:
            if self.progress is not None and not self.progress.done():
                self.progress.set_result(None)
            self.progress = None

        async def send(self, stream_id: int, size: int) -> None:
            """Send ``size`` bytes and FIN, keeping at most a window's worth in the engine."""
            while size:
                while engine.unsent(self._quic, stream_id) >= PIECE * 16:
                    if self.progress is None:
                        self.progress = self._loop.create_future()
                    await self.progress
                piece = min(size, PIECE)
                self._quic.send_stream_data(stream_id, SOURCE[:piece], False)
                size -= piece
                self._transmit_soon()
            self._quic.send_stream_data(stream_id, b"", True)
            self._transmit_soon()

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, stream_data):
                incoming = self.incoming.setdefault(event.stream_id, _Incoming())
                self.arrived(event.stream_id, incoming, bytes(event.data), event.end_stream)

        def arrived(self, stream_id: int, incoming: _Incoming, data: bytes, end: bool) -> None:
            raise NotImplementedError

    return Bulk


def server_class(engine: Engine) -> type[Any]:
    class Server(protocol_class(engine)):  # type: ignore[misc]
        def arrived(self, stream_id: int, incoming: _Incoming, data: bytes, end: bool) -> None:
            if len(incoming.header) < 9:
                need = 9 - len(incoming.header)
                incoming.header += data[:need]
                data = data[need:]
                if len(incoming.header) == 9 and incoming.header[:1] == b"D":
                    size = int.from_bytes(incoming.header[1:], "big")
                    task = self._loop.create_task(self.send(stream_id, size))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
            incoming.received += len(data)
            if end and incoming.header[:1] == b"U":
                self._quic.send_stream_data(stream_id, b"k", True)
                self.transmit()

    return Server


def client_class(engine: Engine) -> type[Any]:
    class Client(protocol_class(engine)):  # type: ignore[misc]
        def arrived(self, stream_id: int, incoming: _Incoming, data: bytes, end: bool) -> None:
            incoming.received += len(data)
            if end and incoming.done is not None and not incoming.done.done():
                incoming.done.set_result(None)

        async def transfer(self, direction: str, size: int) -> int:
            """One stream: upload ``size`` bytes (until the server's answer) or download them."""
            stream_id = self._quic.get_next_available_stream_id()
            incoming = self.incoming[stream_id] = _Incoming(done=self._loop.create_future())
            command = (b"U" if direction == "up" else b"D") + size.to_bytes(8, "big")
            self._quic.send_stream_data(stream_id, command, direction == "down")
            self.transmit()
            if direction == "up":
                await self.send(stream_id, size)
            await incoming.done
            return size if direction == "up" else incoming.received

    return Client


def _configuration(engine: Engine, args: argparse.Namespace, *, is_client: bool) -> Any:
    configuration = engine.configuration.QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_datagram_size=args.datagram_size,
        max_data=args.connection_window,
        max_stream_data=args.stream_window,
        idle_timeout=60.0,
    )
    if engine.name == "aioquic":
        configuration.congestion_control_algorithm = "cubic"  # as the peer session
    else:
        # the datagram size is the peer path's, not one qh3 discovers on its own
        configuration.probe_datagram_size = False
    return configuration


async def serve(engine: Engine, args: argparse.Namespace) -> None:
    pair = generate_ca("bench")  # self-signed; the client does not verify it
    certificate_pem, key_pem = pair.certificate, pair.key
    configuration = _configuration(engine, args, is_client=False)
    configuration.certificate = engine.tls.load_pem_x509_certificates(certificate_pem)[0]
    configuration.private_key = engine.tls.load_pem_private_key(key_pem)
    server = await engine.server.serve(
        args.host, args.port, configuration=configuration, create_protocol=server_class(engine)
    )
    print("ready", flush=True)
    try:
        await asyncio.Future()
    finally:
        server.close()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    configuration = _configuration(engine, args, is_client=True)
    configuration.verify_mode = 0  # ssl.CERT_NONE: a throwaway certificate
    size = args.megabytes * MIB
    figures: dict[str, Any] = {"engine": engine.name, "datagram_size": args.datagram_size}
    cpu, moved = 0.0, 0
    async with engine.client.connect(
        args.host, args.port, configuration=configuration, create_protocol=client_class(engine)
    ) as client:
        for direction, streams in RUNS:
            cpu_before, begin = _cpu(), time.perf_counter()
            done = await asyncio.wait_for(
                asyncio.gather(
                    *(client.transfer(direction, size // streams) for _ in range(streams))
                ),
                args.timeout,
            )
            seconds = time.perf_counter() - begin
            cpu += _cpu() - cpu_before
            moved += sum(done)
            figures[f"bulk_{direction}_{streams}_bytes_per_second"] = sum(done) / seconds
    figures["client_cpu_seconds"] = cpu
    figures["moved_bytes"] = moved
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("role", choices=["serve", "run"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--engine", default="aioquic", choices=["aioquic", "qh3"])
    parser.add_argument("--datagram-size", type=int, default=1472)
    parser.add_argument("--stream-window", type=int, default=1 * MIB)
    parser.add_argument("--connection-window", type=int, default=16 * MIB)
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    engine = Engine.load(args.engine)
    with contextlib.suppress(ImportError):  # as the CLI runs: uvloop where installed
        import uvloop  # noqa: PLC0415

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.role == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(engine, args))
        return
    print(json.dumps(asyncio.run(run(engine, args))), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
