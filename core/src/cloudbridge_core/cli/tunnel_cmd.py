"""``cloudbridge tunnel``: forward local TCP ports through the relay."""

from __future__ import annotations

import click

from cloudbridge_core.cli.output import message
from cloudbridge_core.cli.runtime import config_option, runtime_of
from cloudbridge_core.cli.serving import run_async, wait_for_stop
from cloudbridge_core.client.connection import connect
from cloudbridge_core.client.tunnel import Tunnel, TunnelSpec
from cloudbridge_core.errors import UsageError


@click.command()
@config_option
@click.option("--local-port", type=click.IntRange(0, 65535), help="Local port to listen on.")
@click.option("--remote-host", help="Target host, as the relay resolves it.")
@click.option("--remote-port", type=click.IntRange(1, 65535), help="Target port.")
@click.option(
    "--local-host", default="127.0.0.1", show_default=True, help="Local address to listen on."
)
@click.pass_context
def tunnel(
    ctx: click.Context,
    local_port: int | None,
    remote_host: str | None,
    remote_port: int | None,
    local_host: str,
) -> None:
    """Forward a local port (and every entry of `tunnels:` in the config) through the relay."""
    runtime = runtime_of(ctx)
    config = runtime.config()
    specs = [TunnelSpec(**entry) for entry in config.get("tunnels")]
    given = [local_port is not None, remote_host is not None, remote_port is not None]
    if any(given) and not all(given):
        raise UsageError("--local-port, --remote-host and --remote-port go together")
    if all(given):
        specs.append(TunnelSpec(local_port or 0, remote_host or "", remote_port or 0, local_host))
    if not specs:
        raise UsageError(
            "nothing to forward: give --local-port, --remote-host and --remote-port,"
            " or tunnels: in the config"
        )

    async def main() -> None:
        connection = await connect(config, runtime.plugins)
        tunnels = [
            Tunnel(spec, connection, config.get("performance.buffer_size")) for spec in specs
        ]
        try:
            for forward in tunnels:
                await forward.start()
                local = f"{forward.spec.local_host}:{forward.port}"
                message(f"tunnel {local} -> {forward.spec.target} via {connection.transport}")
            await wait_for_stop()
        finally:
            for forward in tunnels:
                await forward.aclose()
            await connection.aclose()

    run_async(main)
