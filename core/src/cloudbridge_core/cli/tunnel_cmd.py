"""``cloudbridge tunnel``: forward local TCP ports through the relay; ``tunnel list`` shows them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cloudbridge_core.cli.output import SCHEMA_VERSION, emit_json, json_option, message, table
from cloudbridge_core.cli.runtime import (
    Runtime,
    config_option,
    control_socket_of,
    runtime_of,
    socket_option,
)
from cloudbridge_core.cli.serving import notify, run_async, wait_for_stop
from cloudbridge_core.client.control import ControlServer, Handler, query
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.client.metrics import ClientMetrics, with_tenant_label
from cloudbridge_core.client.status import RunningClient
from cloudbridge_core.client.tunnel import Tunnel, TunnelSpec
from cloudbridge_core.config import Config, validate
from cloudbridge_core.config.reload import ConfigWatcher
from cloudbridge_core.durations import parse_duration
from cloudbridge_core.errors import UsageError
from cloudbridge_core.exporters import exporting
from cloudbridge_core.log import get_logger
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.setup import MODES, MeshSetup, PeerTunnelSpec
from cloudbridge_core.prometheus_exporter import PrometheusExporter

if TYPE_CHECKING:
    from cloudbridge_core.p2p.forward import PeerTunnel
    from cloudbridge_core.p2p.manager import PeerManager

log = get_logger("client")


@click.group(invoke_without_command=True)
@config_option
@click.option("--local-port", type=click.IntRange(0, 65535), help="Local port to listen on.")
@click.option("--remote-host", help="Target host, as the relay resolves it.")
@click.option(
    "--remote-peer", help="A peer of the tenant (its p2p.name) to reach instead of a host."
)
@click.option("--remote-port", type=click.IntRange(1, 65535), help="Target port.")
@click.option(
    "--local-host", default="127.0.0.1", show_default=True, help="Local address to listen on."
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="p2p-first",
    show_default=True,
    help="With --remote-peer: p2p-first (relayed DERP as fallback), relay-only, p2p-only.",
)
@socket_option
@click.pass_context
def tunnel(
    ctx: click.Context,
    local_port: int | None,
    remote_host: str | None,
    remote_peer: str | None,
    remote_port: int | None,
    local_host: str,
    mode: str,
    control_socket: Path,
) -> None:
    """Forward a local port (and every entry of `tunnels:` in the config) through the relay,
    or to a peer's exposed port over the best path (--remote-peer)."""
    if ctx.invoked_subcommand is not None:
        return
    runtime = runtime_of(ctx)
    config = runtime.config()
    if remote_host is not None and remote_peer is not None:
        raise UsageError("give --remote-host or --remote-peer, not both")
    specs = [TunnelSpec(**entry) for entry in config.get("tunnels")]
    mesh = None
    given = [
        local_port is not None,
        (remote_host or remote_peer) is not None,
        remote_port is not None,
    ]
    if any(given) and not all(given):
        raise UsageError(
            "--local-port, --remote-host (or --remote-peer) and --remote-port go together"
        )
    if all(given) and remote_peer is not None:
        forward = PeerTunnelSpec(local_port or 0, remote_peer, remote_port or 0, local_host)
        # a device key of its own: the p2p service of this config keeps its identity
        mesh = MeshSetup(DeviceIdentity.create(), mode, [forward])
    elif all(given):
        specs.append(TunnelSpec(local_port or 0, remote_host or "", remote_port or 0, local_host))
    if not specs and mesh is None:
        raise UsageError(
            "nothing to forward: give --local-port, --remote-host and --remote-port,"
            " or tunnels: in the config"
        )

    async def main() -> None:
        await run_client(runtime, config, specs, control_socket_of(runtime, control_socket), mesh)

    run_async(main)


async def run_client(
    runtime: Runtime,
    config: Config,
    specs: list[TunnelSpec],
    control_socket: Path,
    mesh: MeshSetup | None = None,
) -> None:
    """Connect, forward, answer on the control socket and follow config reloads until stopped.

    Stopping drains the tunnels first, then stops the exporters (a last push holds the
    final counts), then closes the relay session.
    """
    transports = list(runtime.plugins.providers("transport"))
    metrics = ClientMetrics(transports)
    link = RelayLink(config, runtime.plugins, metrics)
    await link.start()
    buffer_size = config.get("performance.buffer_size")
    tunnels: list[Tunnel | PeerTunnel] = [
        Tunnel(spec, link, buffer_size, metrics) for spec in specs
    ]
    relay_tunnels = [t for t in tunnels if isinstance(t, Tunnel)]
    metrics.watch_tunnels(lambda: relay_tunnels)
    client = RunningClient(link, tunnels, config.get("relay.host"))
    handlers: dict[str, Handler] = {
        "tunnels": lambda _: client.tunnels_document(),
        "status": lambda _: client.status_document(),
    }
    exposed = metrics.registry
    if config.get("metrics.tenant_labels"):
        exposed = with_tenant_label(metrics.registry, lambda: link.tenant_id)
    status_route = {
        "/api/v1/status": lambda: (200, "application/json", _json(client.status_document()))
    }
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(link.aclose)
        if mesh is not None:
            manager = await _join_mesh(config, runtime, link, mesh, metrics)
            client.mesh = manager
            stack.push_async_callback(manager.aclose)
            tunnels += peer_tunnels(manager, mesh)
            handlers.update(mesh_handlers(manager, config))
            message(f"in the mesh as {manager.membership.name} ({manager.membership.peer_id})")
        control = ControlServer(control_socket, handlers)
        exporters = await stack.enter_async_context(
            exporting(config, runtime.plugins, exposed, status_route)
        )
        served = exporters.get("prometheus")
        client.metrics_url = served.url if isinstance(served, PrometheusExporter) else None
        stack.push_async_callback(_drain, tunnels, control, config)
        for forward in tunnels:
            await forward.start()
            local = f"{forward.spec.local_host}:{forward.port}"
            via = link.current.transport if isinstance(forward, Tunnel) else "the best peer path"
            message(f"tunnel {local} -> {forward.spec.target} via {via}")
        stack.callback(notify, "STOPPING=1")
        if not await control.start():
            log.warning(
                "control_socket_in_use",
                path=str(control_socket),
                note="another client of this config answers status",
            )
        notify("READY=1")
        path = runtime.config_path
        if path is None:
            await wait_for_stop()
            return
        reload = ConfigWatcher(path, lambda: validate(runtime.read(path), runtime.schema), config)
        metrics.watch_reloads(reload)
        reload.subscribe(link.apply)
        async with reload:
            await wait_for_stop()


async def _join_mesh(
    config: Config, runtime: Runtime, link: RelayLink, mesh: MeshSetup, metrics: ClientMetrics
) -> PeerManager:
    from cloudbridge_core.p2p.manager import PeerManager
    from cloudbridge_core.p2p.metrics import P2PMetrics

    expose = set(config.get("p2p.expose"))
    manager = PeerManager(
        config,
        runtime.plugins,
        link,
        mesh.identity,
        expose,
        mesh.mode,
        P2PMetrics(metrics.registry),
    )
    await manager.start()
    return manager


def peer_tunnels(manager: PeerManager, mesh: MeshSetup) -> list[PeerTunnel]:
    # the mesh brings QUIC and ICE with it: imported only by clients that join
    from cloudbridge_core.p2p.forward import PeerTunnel

    return [PeerTunnel(spec, manager) for spec in mesh.forwards]


def mesh_handlers(manager: PeerManager, config: Config) -> dict[str, Handler]:
    """Control requests about peers: ``ping`` and ``explain`` (each names a ``peer``)."""
    within = parse_duration(config.get("p2p.heartbeat_timeout"))

    async def ping(request: dict[str, Any]) -> dict[str, Any]:
        return await manager.ping(str(request.get("peer")), within)

    return {"ping": ping, "explain": lambda request: manager.explain(str(request.get("peer")))}


async def _drain(
    tunnels: list[Tunnel | PeerTunnel], control: ControlServer, config: Config
) -> None:
    """Stop accepting, let open connections finish within ``server.drain_timeout``."""
    await control.aclose()
    drain = parse_duration(config.get("server.drain_timeout"))
    stopping = time.monotonic()
    await asyncio.gather(*(forward.aclose(drain) for forward in tunnels))
    log.info("shutdown", duration_ms=round((time.monotonic() - stopping) * 1000, 1))


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps({"schema_version": SCHEMA_VERSION, **document}).encode()


@tunnel.command("list")
@config_option
@json_option
@socket_option
@click.pass_context
def list_tunnels(ctx: click.Context, as_json: bool, control_socket: Path | None) -> None:
    """Show the running client's tunnels and their statistics."""
    path = control_socket_of(runtime_of(ctx), control_socket)
    reply = asyncio.run(query(path, "tunnels"))
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
