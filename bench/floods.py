"""What a hostile stranger or tenant costs everyone else: floods against a relay, measured.

A relay (`cloudbridge relay serve --dev`, its own process) serves a bystander: a tunnel
(`cloudbridge tunnel` over the built-in TLS transport) to an echo service, whose 64-byte
round trips are timed before and during each flood. Each flood runs for a bounded time
from this process, against loopback only:

- pre-auth, silent: many TCP connections that never speak (slowloris);
- pre-auth, streams: TLS sessions that open streams and push data but never say hello;
- QUIC Initials: a fresh connection attempt per datagram (what a spoofed flood looks like);
- authenticated control flood: a session of another tenant sending pings without pause.

Printed per flood: the bystander's p50/p99 before and during (and the ratio of the p99s),
and the relay's resident memory before, at its peak during, and 2 s after. Run by
`./dev bench` after the tunnel figures, or alone: `python bench/floods.py [--seconds S]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cloudbridge_core.api import Endpoint, Stream, TlsTransport, client_context
from cloudbridge_core.client.race import connect
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.log import configure_logging
from cloudbridge_core.plugins import load_plugins
from cloudbridge_core.protocol import messages
from procs import BIN, ECHO, free_port, rss_bytes, started


@dataclass
class Relay:
    pid: int
    state: Path
    ports: dict[str, int]

    def token(self, tenant: str) -> str:
        return subprocess.run(
            [
                *(str(BIN / "cloudbridge"), "relay", "token", "issue", "--state-dir"),
                *(str(self.state), "--tenant", tenant, "--subject", tenant),
                *("--permission", "relay:connect", "--permission", "tunnel:create"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()


#: a flood: runs for the seconds given against the relay, and says what it did
Flood = Callable[[float, Relay], Awaitable[str]]


async def round_trips(port: int, seconds: float) -> list[float]:
    """64-byte request/response times through the bystander's tunnel for ``seconds``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = os.urandom(64)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            started_at = time.perf_counter()
            writer.write(payload)
            await asyncio.wait_for(reader.readexactly(len(payload)), 10)
            times.append(time.perf_counter() - started_at)
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        times.append(10.0)  # the bystander lost its tunnel or waited 10 s: count it
    finally:
        writer.close()
    return times


async def peak_rss(pid: int, until: asyncio.Event) -> int:
    peak = rss_bytes([pid])
    while not until.is_set():
        peak = max(peak, rss_bytes([pid]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), 0.2)
    return peak


def silent_connections(count: int) -> Flood:
    async def flood(seconds: float, relay: Relay) -> str:
        opened: list[socket.socket] = []
        deadline = time.monotonic() + seconds
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                sock.connect(("127.0.0.1", relay.ports["tls"]))
            opened.append(sock)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        alive = sum(1 for sock in opened if _still_open(sock))
        for sock in opened:
            sock.close()
        return f"{len(opened)} connections, {alive} still open at the end"

    return flood


def _still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def streams_without_hello(sessions: int, streams: int) -> Flood:
    async def flood(seconds: float, relay: Relay) -> str:
        context = client_context((relay.state / "ca.pem").read_bytes())
        endpoint = Endpoint("127.0.0.1", relay.ports["tls"], context, 5.0)
        chunk = bytes(64 * 1024)
        pushed = 0
        opened = 0

        async def push(stream: Stream) -> None:
            nonlocal pushed
            with contextlib.suppress(Exception):
                for _ in range(4):
                    await stream.write(chunk)
                    pushed += len(chunk)

        async def one_session() -> None:
            nonlocal opened
            with contextlib.suppress(Exception):
                session = await TlsTransport().connect(endpoint)
                writers = []
                for _ in range(streams):
                    stream = await session.open_stream()
                    opened += 1
                    writers.append(asyncio.create_task(push(stream)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*writers), seconds)
                for writer in writers:
                    writer.cancel()
                await session.aclose()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(one_session() for _ in range(sessions))), seconds + 5
            )
        return f"{sessions} sessions, {opened} streams opened, {pushed / 2**20:.0f} MiB written"

    return flood


def quic_initials(per_second: int) -> Flood:
    async def flood(seconds: float, relay: Relay) -> str:
        configuration = QuicConfiguration(is_client=True, alpn_protocols=["cloudbridge/1"])
        configuration.verify_mode = ssl.CERT_NONE
        target = ("127.0.0.1", relay.ports["quic"])
        sent = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                tick = time.monotonic()
                for _ in range(per_second // 10):
                    attempt = QuicConnection(configuration=configuration)
                    attempt.connect(target, now=time.time())
                    for datagram, _ in attempt.datagrams_to_send(now=time.time()):
                        with contextlib.suppress(BlockingIOError):
                            sock.sendto(datagram, target)
                            sent += 1
                    await asyncio.sleep(0)  # the bystander is timed on this loop too
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
        return f"{sent} Initial datagrams, each a new connection"

    return flood


def control_flood() -> Flood:
    async def flood(seconds: float, relay: Relay) -> str:
        plugins = load_plugins()
        overrides = {
            "auth.token": (relay.token("flooder"), "bench"),
            "transport.mode": ("tls", "bench"),
        }
        config = load_config(
            relay.state / "client.yaml",
            environ={},
            overrides=overrides,
            schema=merged_schema(plugins.config_sections()),
        )
        sent = 0
        outcome = "never disconnected"
        connection = await connect(config, plugins)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                await connection.control.send(messages.Ping(sent))
                sent += 1
        except Exception as error:  # noqa: BLE001 - what ended the flood is the result
            outcome = f"ended by the relay ({type(error).__name__}: {error})"
        finally:
            with contextlib.suppress(Exception):
                await connection.aclose()
        return f"{sent} pings, {outcome}"

    return flood


async def measure(name: str, flood: Flood, relay: Relay, port: int, seconds: float) -> list[str]:
    before = await round_trips(port, 2.0)
    rss_before = rss_bytes([relay.pid])
    done = asyncio.Event()
    watcher = asyncio.create_task(peak_rss(relay.pid, done))
    attack = asyncio.create_task(flood(seconds, relay))
    during = await round_trips(port, seconds)
    outcome = await attack
    done.set()
    peak = await watcher
    await asyncio.sleep(2.0)
    rss_after = rss_bytes([relay.pid])
    p99_before, p99_during = _p99(before), _p99(during)
    return [
        name,
        f"{statistics.median(before) * 1e3:.2f}/{p99_before * 1e3:.2f}",
        f"{statistics.median(during) * 1e3:.2f}/{p99_during * 1e3:.2f}",
        f"{p99_during / p99_before:.1f}x",
        f"{rss_before / 2**20:.0f}",
        f"+{(peak - rss_before) / 2**20:.0f}",
        f"{(rss_after - rss_before) / 2**20:+.0f}",
        outcome,
    ]


def _p99(times: list[float]) -> float:
    return sorted(times)[min(len(times) - 1, int(len(times) * 0.99))]


async def run_floods(seconds: float) -> None:
    configure_logging(level="error")  # the ping flood's own client logs: not onto the tables
    target = free_port()
    ports = {name: free_port() for name in ("tls", "quic", "grpc", "websocket")}
    env = {
        **{f"CLOUDBRIDGE_TRANSPORT__{n.upper()}__PORT": str(p) for n, p in ports.items()},
        "CLOUDBRIDGE_SERVER__LISTEN": "127.0.0.1",
        "CLOUDBRIDGE_LOGGING__LEVEL": "error",
    }
    with (
        tempfile.TemporaryDirectory() as state_dir,
        started([sys.executable, "-c", ECHO, str(target)], "ready"),
        started(
            [str(BIN / "cloudbridge"), "relay", "serve", "--dev", "--state-dir", state_dir],
            "client config:",
            env,
        ) as process,
    ):
        relay = Relay(process.pid, Path(state_dir), ports)
        local = free_port()
        bystander = [
            *(str(BIN / "cloudbridge"), "tunnel", "--config", f"{state_dir}/client.yaml"),
            *("--control-socket", f"{state_dir}/bystander.sock", "--local-port", str(local)),
            *("--remote-host", "127.0.0.1", "--remote-port", str(target)),
        ]
        tunnel_env = {
            "CLOUDBRIDGE_AUTH__TOKEN": relay.token("bystander"),
            "CLOUDBRIDGE_TRANSPORT__MODE": "tls",
            "CLOUDBRIDGE_METRICS__ENABLED": "false",
            "CLOUDBRIDGE_LOGGING__LEVEL": "error",
        }
        with started(bystander, "tunnel 127.0.0.1:", tunnel_env):
            floods = [
                ("pre-auth silent TCP", silent_connections(2000)),
                ("pre-auth streams, no hello", streams_without_hello(4, 256)),
                ("QUIC Initials", quic_initials(1000)),
                ("authenticated ping flood", control_flood()),
            ]
            rows = [await measure(name, flood, relay, local, seconds) for name, flood in floods]
    header = [
        "flood",
        "bystander p50/p99 before (ms)",
        "during (ms)",
        "p99 ratio",
        "relay RSS (MiB)",
        "peak",
        "2 s after",
        "what the flood did",
    ]
    print(f"\nFloods ({seconds:g} s each; bystander: 64-byte round trips through a TLS tunnel)")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each flood")
    asyncio.run(run_floods(parser.parse_args().seconds))


if __name__ == "__main__":
    main()
