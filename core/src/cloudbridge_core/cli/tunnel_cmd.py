"""``cloudbridge tunnel``: forward local TCP ports through the relay; ``tunnel list`` shows them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from cloudbridge_core.cli.output import emit_json, json_option, message, table
from cloudbridge_core.cli.runtime import config_option, runtime_of
from cloudbridge_core.cli.serving import run_async, wait_for_stop
from cloudbridge_core.client.connection import connect
from cloudbridge_core.client.control import ControlServer, default_socket, query
from cloudbridge_core.client.tunnel import Tunnel, TunnelSpec
from cloudbridge_core.errors import UsageError

socket_option = click.option(
    "--control-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=default_socket,
    show_default="the user's runtime directory",
    help="Where the running client answers `tunnel list`.",
)


@click.group(invoke_without_command=True)
@config_option
@click.option("--local-port", type=click.IntRange(0, 65535), help="Local port to listen on.")
@click.option("--remote-host", help="Target host, as the relay resolves it.")
@click.option("--remote-port", type=click.IntRange(1, 65535), help="Target port.")
@click.option(
    "--local-host", default="127.0.0.1", show_default=True, help="Local address to listen on."
)
@socket_option
@click.pass_context
def tunnel(
    ctx: click.Context,
    local_port: int | None,
    remote_host: str | None,
    remote_port: int | None,
    local_host: str,
    control_socket: Path,
) -> None:
    """Forward a local port (and every entry of `tunnels:` in the config) through the relay."""
    if ctx.invoked_subcommand is not None:
        return
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
        control = ControlServer(
            control_socket, {"tunnels": lambda: _describe(tunnels, connection.transport)}
        )
        try:
            for forward in tunnels:
                await forward.start()
                local = f"{forward.spec.local_host}:{forward.port}"
                message(f"tunnel {local} -> {forward.spec.target} via {connection.transport}")
            await control.start()
            await wait_for_stop()
        finally:
            await control.aclose()
            for forward in tunnels:
                await forward.aclose()
            await connection.aclose()

    run_async(main)


def _describe(tunnels: list[Tunnel], transport: str) -> dict[str, Any]:
    return {
        "tunnels": [
            {
                "name": t.spec.name,
                "local": f"{t.spec.local_host}:{t.port}",
                "target": t.spec.target,
                "transport": transport,
                "statistics": t.statistics.to_dict(),
            }
            for t in tunnels
        ]
    }


@tunnel.command("list")
@json_option
@socket_option
def list_tunnels(as_json: bool, control_socket: Path) -> None:
    """Show the running client's tunnels and their statistics."""
    reply = asyncio.run(query(control_socket, "tunnels"))
    if as_json:
        emit_json(reply)
        return
    rows = [
        (
            t["local"],
            t["target"],
            t["transport"],
            f"{t['statistics']['active_connections']}/{t['statistics']['total_connections']}",
            str(t["statistics"]["bytes_sent"]),
            str(t["statistics"]["bytes_received"]),
            str(t["statistics"]["errors"]),
        )
        for t in reply["tunnels"]
    ]
    click.echo(
        table(rows, ("LOCAL", "TARGET", "VIA", "ACTIVE/TOTAL", "SENT", "RECEIVED", "ERRORS"))
    )
