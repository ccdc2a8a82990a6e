"""``cloudbridge demo``: the whole path on one machine, with nothing to set up.

A relay on loopback with a fresh key, a token minted for it, a client connected to it, a
tunnel to a local echo service, and real traffic pushed through, with live throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import click

from cloudbridge_core.cli.output import message
from cloudbridge_core.cli.runtime import Runtime, runtime_of
from cloudbridge_core.cli.serving import run_async, wait_for_stop
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.client.tunnel import Tunnel, TunnelSpec
from cloudbridge_core.config import Config, load_config
from cloudbridge_core.relay.runner import start_relay
from cloudbridge_core.relay.tokens import issue_token

CHUNK = 1 << 20


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _traffic(port: int, counted: list[int]) -> None:
    """Send and read back 1 MiB blocks through the tunnel, for as long as we run."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    block = os.urandom(CHUNK)
    try:
        while True:
            writer.write(block)
            await writer.drain()
            await reader.readexactly(CHUNK)
            counted[0] += 2 * CHUNK
    finally:
        writer.close()


def _config(runtime: Runtime, overrides: dict[str, object]) -> Config:
    return load_config(
        None,
        environ={},
        overrides={k: (v, "demo") for k, v in overrides.items()},
        schema=runtime.schema,
    )


@click.command()
@click.option(
    "--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds."
)
@click.option("--connections", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final statistics as JSON.")
@click.pass_context
def demo(ctx: click.Context, duration: float | None, connections: int, as_json: bool) -> None:
    """Run a relay, a client and a tunnel on loopback and push traffic through them."""
    runtime = runtime_of(ctx)

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="cloudbridge-demo-") as state_dir:
            async with contextlib.AsyncExitStack() as stack:  # closed however the demo ends
                await _demo(stack, state_dir)

    async def _demo(stack: contextlib.AsyncExitStack, state_dir: str) -> None:
        relay_config = _config(
            runtime, {"server.state_dir": state_dir, "server.listen": "127.0.0.1"}
        )
        relay = await start_relay(relay_config, runtime.plugins, dev=True, port_override=0)
        stack.push_async_callback(relay.aclose)
        target = await asyncio.start_server(_echo, "127.0.0.1", 0)
        stack.push_async_callback(target.wait_closed)
        stack.callback(target.close)
        state = relay.state
        token = issue_token(
            state.signing_key,
            issuer=state.issuer,
            tenant="demo",
            subject="demo-client",
            permissions=["relay:connect", "tunnel:create"],
            ttl=3600,
        )
        ports = {name: listener.port for name, listener in relay.listeners.items()}
        client_config = _config(
            runtime,
            {
                "relay.host": "127.0.0.1",
                **{f"transport.{name}.port": port for name, port in ports.items()},
                "relay.tls.ca_file": str(Path(state_dir) / "ca.pem"),
                "auth.token": token,
            },
        )
        # the link, not a bare session: it sends the heartbeats without which the relay
        # reaps a session (after 90 s), and reconnects as `cloudbridge tunnel` does
        link = RelayLink(client_config, runtime.plugins)
        stack.push_async_callback(link.aclose)
        await link.start()
        target_port = target.sockets[0].getsockname()[1]
        tunnel = Tunnel(TunnelSpec(0, "127.0.0.1", target_port), link)
        await tunnel.start()
        listening = ", ".join(f"{name} on 127.0.0.1:{port}" for name, port in ports.items())
        message(f"relay: {listening}; tenant 'demo'")
        message(f"tunnel 127.0.0.1:{tunnel.port} -> echo service on 127.0.0.1:{target_port}")
        message(f"pushing traffic over {connections} connections; Ctrl-C to stop")
        counted = [0]
        pushers = [asyncio.create_task(_traffic(tunnel.port, counted)) for _ in range(connections)]
        reporter = asyncio.create_task(_report(counted))
        started = time.perf_counter()
        try:
            await wait_for_stop(duration)
        finally:
            elapsed = time.perf_counter() - started
            # the tunnel first: traffic cut by the demo itself is not a tunnel error
            await tunnel.aclose()
            for task in (*pushers, reporter):
                task.cancel()
            await asyncio.gather(*pushers, reporter, return_exceptions=True)
        stats = {
            **tunnel.statistics.to_dict(),
            "seconds": round(elapsed, 3),
            "throughput_bytes_per_second": round(counted[0] / elapsed),
        }
        if as_json:
            click.echo(json.dumps({"schema_version": 1, "tunnel": stats}, indent=2))
        else:
            click.echo("\n".join(f"{key}: {value}" for key, value in stats.items()))

    run_async(main)


async def _report(counted: list[int]) -> None:
    last, previous = time.perf_counter(), 0
    while True:
        await asyncio.sleep(1)
        now = time.perf_counter()
        rate = (counted[0] - previous) / (now - last)
        message(
            f"  {rate / 1e6:8.1f} MB/s through the tunnel ({counted[0] / 1e6:,.0f} MB in total)"
        )
        last, previous = now, counted[0]
