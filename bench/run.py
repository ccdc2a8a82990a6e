"""CloudBridge tunnel benchmark: direct TCP, socat and CloudBridge, measured in one run.

For each path to the same echo service it measures bulk throughput (1 and 8
connections), 64-byte request/response latency (p50, p99), connection setup rate, and
the forwarder's resident memory (socat with its children; CloudBridge's relay) holding
1,000 idle connections; then prints ratios to direct TCP and to socat. Then the floods of
floods.py: what a hostile stranger or tenant costs a bystander. Run it with `./dev bench`
(`--floods-only` for the second part); it is not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
#: the transports measured, in auto mode's preference order (plugins that are installed)
TRANSPORTS = [
    name
    for name, module in (
        ("quic", "cloudbridge_quic"),
        ("grpc", "cloudbridge_grpc"),
        ("websocket", "cloudbridge_websocket"),
        ("tls", "cloudbridge_core"),
    )
    if importlib.util.find_spec(module) is not None
]
ECHO = """
import asyncio, sys
async def echo(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        # a zombie (an exited child not yet reaped) has no VmRSS line: it holds no memory
        sizes = [
            int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS")
        ]
        total += sum(sizes)
    return total


def children_of(pid: int) -> list[int]:
    found = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found += children_of(int(child))
    return found


@contextmanager
def started(
    command: list[str], ready: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    for line in process.stdout:
        if ready in line:
            break
    else:
        raise RuntimeError(f"{command[0]} exited before it was ready")
    # keep draining its output so that it never blocks on a full pipe
    threading.Thread(target=process.stdout.read, daemon=True).start()
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Results:
    name: str
    figures: dict[str, float] = field(default_factory=dict)


async def bulk(port: int, connections: int, megabytes: int) -> float:
    """Echo throughput in bytes per second (both directions counted)."""
    block = os.urandom(1 << 20)

    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send() -> None:
            for _ in range(megabytes):
                writer.write(block)
                await writer.drain()

        sender = asyncio.create_task(send())
        received = 0
        while received < megabytes << 20:
            data = await reader.read(1 << 20)
            if not data:
                raise RuntimeError(f"port {port} closed the connection after {received} bytes")
            received += len(data)
        await sender
        writer.close()
        return 2 * received

    started_at = time.perf_counter()
    moved = sum(await asyncio.gather(*(one() for _ in range(connections))))
    return moved / (time.perf_counter() - started_at)


async def latency(port: int, rounds: int) -> tuple[float, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = b"x" * 64
    samples = []
    for _ in range(rounds):
        begin = time.perf_counter()
        writer.write(message)
        await reader.readexactly(64)
        samples.append(time.perf_counter() - begin)
    writer.close()
    quantiles = statistics.quantiles(samples, n=100)
    return quantiles[49], quantiles[98]


async def setup_rate(port: int, count: int) -> float:
    begin = time.perf_counter()
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"!")
        await reader.readexactly(1)
        writer.close()
        await writer.wait_closed()
    return count / (time.perf_counter() - begin)


async def idle_memory(port: int, count: int, pids: list[int]) -> float:
    """Resident memory of the forwarder (with its children) holding ``count`` idle connections."""
    held = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"!")
        await reader.readexactly(1)
        held.append(writer)
    resident = rss_bytes([p for pid in pids for p in children_of(pid)])
    for writer in held:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for writer in held), return_exceptions=True)
    return float(resident)


async def measure(name: str, port: int, pids: list[int], args: argparse.Namespace) -> Results:
    result = Results(name)
    print(f"{name}: bulk", file=sys.stderr, flush=True)
    result.figures["bulk_1_bytes_per_second"] = await bulk(port, 1, args.megabytes)
    result.figures["bulk_8_bytes_per_second"] = await bulk(port, 8, max(1, args.megabytes // 8))
    print(f"{name}: latency", file=sys.stderr, flush=True)
    p50, p99 = await latency(port, args.rounds)
    result.figures["latency_p50_seconds"] = p50
    result.figures["latency_p99_seconds"] = p99
    print(f"{name}: connection setup", file=sys.stderr, flush=True)
    result.figures["setup_per_second"] = await setup_rate(port, args.setups)
    print(f"{name}: {args.idle} idle connections", file=sys.stderr, flush=True)
    result.figures[f"idle_{args.idle}_rss_bytes"] = await idle_memory(port, args.idle, pids)
    return result


def report(results: list[Results]) -> None:
    by_name = {r.name: r for r in results}
    keys = list(results[0].figures)
    print(f"{'':28}" + "".join(f"{r.name:>24}" for r in results))
    for key in keys:
        print(f"{key:28}" + "".join(f"{r.figures[key]:>24.6g}" for r in results))
    for reference in ("direct", "socat", "cloudbridge-websocket"):
        if reference not in by_name:
            continue
        print(f"\nratio to {reference} (higher is better for rates, lower for latency and memory)")
        base = by_name[reference].figures
        for r in results:
            if r.name == reference:
                continue
            ratios = [f"{key}={r.figures[key] / base[key]:.2f}" for key in keys if base[key]]
            print(f"  {r.name:22} " + "  ".join(ratios))


async def run_all(args: argparse.Namespace) -> None:
    target = free_port()
    results: list[Results] = []
    with (
        tempfile.TemporaryDirectory() as state,
        started([sys.executable, "-c", ECHO, str(target)], "ready"),
    ):
        results.append(await measure("direct", target, [], args))
        if shutil.which("socat"):
            socat_port = free_port()
            command = [
                "socat",
                f"TCP-LISTEN:{socat_port},fork,reuseaddr,nodelay,backlog=4096,bind=127.0.0.1",
                f"TCP:127.0.0.1:{target},nodelay",
            ]
            with subprocess.Popen(command) as socat:
                try:
                    await asyncio.sleep(0.3)  # socat prints nothing when ready
                    results.append(await measure("socat", socat_port, [socat.pid], args))
                finally:
                    socat.terminate()
        else:
            print("socat is not installed: skipping the reference forwarder", file=sys.stderr)
        ports = {name: free_port() for name in TRANSPORTS}
        relay_env = {
            **{f"CLOUDBRIDGE_TRANSPORT__{n.upper()}__PORT": str(p) for n, p in ports.items()},
            "CLOUDBRIDGE_SERVER__LISTEN": "127.0.0.1",
            "CLOUDBRIDGE_LOGGING__LEVEL": "warning",
        }
        with started(
            [str(BIN / "cloudbridge"), "relay", "serve", "--dev", "--state-dir", state],
            "client config:",
            relay_env,
        ) as relay:
            token = subprocess.run(
                [
                    str(BIN / "cloudbridge"),
                    "relay",
                    "token",
                    "issue",
                    "--state-dir",
                    state,
                    "--tenant",
                    "bench",
                    "--subject",
                    "bench",
                    "--permission",
                    "relay:connect",
                    "--permission",
                    "tunnel:create",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            for transport in TRANSPORTS:
                local = free_port()
                tunnel_env = {
                    "CLOUDBRIDGE_AUTH__TOKEN": token,
                    "CLOUDBRIDGE_TRANSPORT__MODE": transport,
                    "CLOUDBRIDGE_METRICS__ENABLED": "false",
                    "CLOUDBRIDGE_LOGGING__LEVEL": "warning",
                }
                command = [
                    str(BIN / "cloudbridge"),
                    "tunnel",
                    "--config",
                    f"{state}/client.yaml",
                    "--control-socket",
                    f"{state}/{transport}.sock",
                    "--local-port",
                    str(local),
                    "--remote-host",
                    "127.0.0.1",
                    "--remote-port",
                    str(target),
                ]
                with started(command, "tunnel 127.0.0.1:", tunnel_env):
                    results.append(
                        await measure(f"cloudbridge-{transport}", local, [relay.pid], args)
                    )
    report(results)


def main() -> None:
    # thousands of idle connections need more descriptors than the usual 1024 (children inherit it)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, default=64, help="bulk size per run")
    parser.add_argument("--rounds", type=int, default=2000, help="latency round trips")
    parser.add_argument("--setups", type=int, default=300, help="connections for the setup rate")
    parser.add_argument(
        "--idle", type=int, default=1000, help="idle connections for the memory figure"
    )
    parser.add_argument("--flood-seconds", type=float, default=5.0, help="length of each flood")
    parser.add_argument("--floods-only", action="store_true", help="skip the tunnel figures")
    args = parser.parse_args()
    if not args.floods_only:
        asyncio.run(run_all(args))
    from floods import run_floods  # noqa: PLC0415 - floods imports this module (a cycle)

    asyncio.run(run_floods(args.flood_seconds))


if __name__ == "__main__":
    main()
