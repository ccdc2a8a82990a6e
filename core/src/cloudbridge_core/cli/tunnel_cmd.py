"""``cloudbridge tunnel``: forward local TCP ports through the relay; ``tunnel list`` shows them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

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
from cloudbridge_core.client.metrics import ClientMetrics, TenantLabelled, with_tenant_label
from cloudbridge_core.client.status import RunningClient
from cloudbridge_core.client.tunnel import ConnectionLimit, Tunnel, TunnelSpec
from cloudbridge_core.client.tunnel_set import TunnelSet
from cloudbridge_core.config import Config, validate
from cloudbridge_core.config.loader import searched
from cloudbridge_core.config.reload import ConfigWatcher
from cloudbridge_core.errors import CloudBridgeError, OverlayFailed, UsageError
from cloudbridge_core.exporters import Exporters, exporting
from cloudbridge_core.log import get_logger
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.setup import MODES, MeshSetup, PeerTunnelSpec
from cloudbridge_core.prometheus_exporter import PrometheusExporter

if TYPE_CHECKING:
    from cloudbridge_core.overlay.run import OverlayRun
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
@click.option(
    "--once",
    is_flag=True,
    help="Try to connect once and exit 5 if the relay does not answer (default: keep trying).",
)
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
    once: bool,
) -> None:
    """Forward a local port (and every entry of `tunnels:` in the config) through the relay,
    or to a peer's exposed port over the best path (--remote-peer)."""
    if ctx.invoked_subcommand is not None:
        return
    runtime = runtime_of(ctx)
    config = runtime.config()
    if remote_host is not None and remote_peer is not None:
        raise UsageError("give --remote-host or --remote-peer, not both")
    mesh = None
    fixed = []
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
        fixed.append(TunnelSpec(local_port or 0, remote_host or "", remote_port or 0, local_host))
    if not config.settings.tunnels and not fixed and mesh is None:
        raise UsageError(
            "nothing to forward: give --local-port, --remote-host and --remote-port,"
            " or tunnels: in the config"
        )

    async def main() -> None:
        socket = control_socket_of(runtime, control_socket)
        await run_client(runtime, config, socket, fixed=fixed, mesh=mesh, once=once)

    run_async(main)


async def run_client(
    runtime: Runtime,
    config: Config,
    control_socket: Path,
    *,
    fixed: Sequence[TunnelSpec] = (),
    mesh: MeshSetup | None = None,
    once: bool = False,
) -> None:
    """Listen on the config's ``tunnels`` and the ``fixed`` ones (given by flags), connect
    (trying until the relay answers, or once with ``once``), answer on the control socket
    and follow config reloads until stopped.

    A reload applies each section through its owner (the relay link, the tunnels, logging,
    the exporters, the mesh); the ``reloaded`` log line lists what they applied. Stopping
    drains the tunnels first, then stops the exporters (a last push holds the final
    counts), then closes the relay session.
    """
    _say_when_no_config(runtime, config)
    transports = list(runtime.plugins.transports())
    metrics = ClientMetrics(transports)
    link = RelayLink(config, runtime.plugins, metrics)
    performance = config.settings.performance
    limit = ConnectionLimit(performance.max_concurrent_tunnels)
    tunnels: list[Tunnel | PeerTunnel] = []
    relay_tunnels = TunnelSet(link, performance.buffer_size, metrics, tunnels, limit)
    metrics.watch_tunnels(relay_tunnels.all)
    client = RunningClient(link, tunnels, config.settings.relay.host)
    handlers: dict[str, Handler] = {
        "tunnels": lambda _: client.tunnels_document(),
        "status": lambda _: client.status_document(),
    }
    exposed, labels = with_tenant_label(
        metrics.registry, lambda: link.tenant_id, config.settings.metrics.tenant_labels
    )
    status_route = {
        "/api/v1/status": lambda: (200, "application/json", _json(client.status_document()))
    }
    reload = _watcher(runtime, config)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(link.aclose)
        control = ControlServer(control_socket, handlers)
        forwards = _bind_forwards(stack, mesh)
        await _listen_then_connect(stack, config, link, relay_tunnels, fixed, once, control)
        manager = None
        if mesh is not None:
            manager = await _join_mesh(config, runtime, link, mesh, metrics)
            client.mesh = manager
            stack.push_async_callback(manager.aclose)
            handlers.update(mesh_handlers(manager))
            message(f"in the mesh as {manager.membership.name} ({manager.membership.peer_id})")
            client.overlay = await _bring_up_overlay(stack, config, link, manager, mesh, metrics)
        exporters = await stack.enter_async_context(
            exporting(config, runtime.plugins, exposed, status_route)
        )
        client.metrics_url = _metrics_url(exporters)

        def drain_timeout() -> float:  # the config in force when the stop comes
            return (reload.current if reload is not None else config).settings.server.drain_timeout

        stack.push_async_callback(_drain, relay_tunnels, forwards, control, drain_timeout)
        for forward in forwards:
            await forward.start(manager)
            tunnels.append(forward)
        _announce(tunnels, link)
        stack.callback(notify, "STOPPING=1")
        notify("READY=1")
        if reload is None:
            await _until_stopped(link)
            return
        metrics.watch_reloads(reload)
        reload.subscribe(_follow_link(link, config))
        reload.subscribe(runtime.follow_logging(config.settings.logging))
        reload.subscribe(relay_tunnels.follow)
        reload.subscribe(_follow_metrics(exporters, labels, client))
        for follow in _mesh_followers(client):
            reload.subscribe(follow)
        async with reload:
            await _until_stopped(link)


async def _listen_then_connect(
    stack: contextlib.AsyncExitStack,
    config: Config,
    link: RelayLink,
    relay_tunnels: TunnelSet,
    fixed: Sequence[TunnelSpec],
    once: bool,
    control: ControlServer,
) -> None:
    """What can fail without the relay fails first: a token without ``tunnel:create`` (every
    stream would be refused), a taken local port; then ``control`` answers ``status`` (what
    the client waits for) while it connects (trying until it works, unless ``once``)."""
    if fixed or config.settings.tunnels:
        await link.tokens.require("tunnel:create", "a tunnel through the relay")
    await relay_tunnels.start([TunnelSpec.of(t) for t in config.settings.tunnels], fixed)
    stack.push_async_callback(relay_tunnels.aclose, 0.0)  # until the drain takes over
    if await control.start():
        stack.push_async_callback(control.aclose)  # until the drain takes over
    else:
        log.warning(
            "control_socket_in_use",
            path=str(control.path),
            note="another client of this config answers status",
        )
    await link.start(keep_trying=not once, waiting=_tell_waiting)


def _tell_waiting(error: CloudBridgeError) -> None:
    """Said once per cause while the first connection is retried."""
    message(f"waiting for the relay: {error.message}")
    message(
        "  "
        + (f"{error.hint}; " if error.hint else "")
        + "trying again until it answers (Ctrl-C stops; --once tries once)"
    )


async def _until_stopped(link: RelayLink) -> None:
    """Until SIGINT/SIGTERM, or until the relay refuses the token for good, which is then
    raised (after the caller's drain): the command exits 4 and says how to get a new one."""
    stopped = asyncio.ensure_future(wait_for_stop())
    refused = asyncio.ensure_future(link.wait_refused())
    try:
        await asyncio.wait((stopped, refused), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (stopped, refused):
            waiter.cancel()
        await asyncio.gather(stopped, refused, return_exceptions=True)
    if refused.done() and not refused.cancelled():
        raise refused.result()


def _watcher(runtime: Runtime, config: Config) -> ConfigWatcher | None:
    """The config file's watcher; none when only defaults, environment and flags apply."""
    path = runtime.config_path
    if path is None:
        return None
    return ConfigWatcher(path, lambda: validate(runtime.read(path), runtime.schema), config)


def _announce(tunnels: list[Tunnel | PeerTunnel], link: RelayLink) -> None:
    for running in tunnels:
        local = f"{running.spec.local_host}:{running.port}"
        via = link.current.transport if isinstance(running, Tunnel) else "the best peer path"
        message(f"tunnel {local} -> {running.spec.target} via {via}")


def _follow_link(link: RelayLink, config: Config) -> Callable[[Config], Awaitable[list[str]]]:
    """The relay link's reload subscriber, saying when it moved to a new ``transport.mode``."""
    current = config.settings.transport.mode

    async def apply(new: Config) -> list[str]:
        nonlocal current
        await link.apply(new)
        before, current = current, new.settings.transport.mode
        return ["transport.mode"] if current != before else []

    return apply


def _follow_metrics(
    exporters: Exporters, labels: TenantLabelled, client: RunningClient
) -> Callable[[Config], Awaitable[list[str]]]:
    """The exporters' reload subscriber: ``/metrics`` moves to a changed address at once,
    and ``metrics.tenant_labels`` holds from the next scrape."""

    async def apply(new: Config) -> list[str]:
        labelled = new.settings.metrics.tenant_labels
        applied = [] if labelled == labels.labelled else ["metrics.tenant_labels"]
        labels.labelled = labelled
        applied += [f"exporter {name}" for name in await exporters.apply(new)]
        client.metrics_url = _metrics_url(exporters)
        return applied

    return apply


def _metrics_url(exporters: Exporters) -> str | None:
    served = exporters.get("prometheus")
    return served.url if isinstance(served, PrometheusExporter) else None


async def _join_mesh(
    config: Config, runtime: Runtime, link: RelayLink, mesh: MeshSetup, metrics: ClientMetrics
) -> PeerManager:
    from cloudbridge_core.p2p.manager import PeerManager
    from cloudbridge_core.p2p.metrics import P2PMetrics

    overlay_key = ""
    if mesh.overlay_key:
        private = X25519PrivateKey.from_private_bytes(base64.b64decode(mesh.overlay_key))
        overlay_key = base64.b64encode(private.public_key().public_bytes_raw()).decode()
    manager = PeerManager(
        config,
        runtime.plugins,
        link,
        mesh.identity,
        set(config.settings.p2p.expose),
        mesh.mode,
        P2PMetrics(metrics.registry),
        overlay_key=overlay_key,
    )
    await manager.start()
    return manager


def _mesh_followers(client: RunningClient) -> list[Callable[[Config], Any]]:
    """The reload subscribers of the mesh and its overlay, where they run."""
    running = [client.mesh, client.overlay]
    return [part.follow for part in running if part is not None]


async def _bring_up_overlay(
    stack: contextlib.AsyncExitStack,
    config: Config,
    link: RelayLink,
    manager: PeerManager,
    mesh: MeshSetup,
    metrics: ClientMetrics,
) -> OverlayRun | None:
    """The overlay when the mesh has one, up and taken down by ``stack``; None when there
    is none or it cannot be brought up (said why): the mesh goes on without it."""
    from cloudbridge_core.overlay.metrics import OverlayMetrics
    from cloudbridge_core.overlay.run import OverlayRun

    if mesh.overlay is None:
        return None
    run = OverlayRun(
        config.settings.overlay,
        mesh.overlay,
        manager,
        mesh.overlay_key,
        link.tenant_id or "",
        OverlayMetrics(metrics.registry),
    )
    try:
        await run.start()
    except OverlayFailed as error:
        log.error("overlay_failed", reason=error.message, hint=error.hint)
        message(f"no overlay: {error.message}" + (f" ({error.hint})" if error.hint else ""))
        return None
    stack.push_async_callback(run.aclose)
    message(f"overlay {run.interface} up: {', '.join(run.addresses)}")
    return run


def _say_when_no_config(runtime: Runtime, config: Config) -> None:
    """No config file and no relay named anywhere: the client would try ``localhost``,
    which is rarely what a new user meant. Said before anything is tried."""
    if runtime.config_path is not None or config.origin(("relay", "host")).source != "default":
        return
    looked = " and ".join(str(path) for path in searched())
    message(
        f"no config file (looked for {looked}): trying a relay on {config.settings.relay.host};"
        " set one up with 'cloudbridge join URL' (an invite) or 'cloudbridge init'"
    )


def _bind_forwards(stack: contextlib.AsyncExitStack, mesh: MeshSetup | None) -> list[PeerTunnel]:
    """The peer tunnels' local ports, bound before anything connects (a taken one stops
    the command at once); they accept once the mesh is joined."""
    if mesh is None or not mesh.forwards:
        return []
    # the mesh brings QUIC and ICE with it: imported only by clients that join
    from cloudbridge_core.p2p.forward import PeerTunnel

    forwards = [PeerTunnel(spec) for spec in mesh.forwards]
    for forward in forwards:
        stack.push_async_callback(forward.aclose)
        forward.bind()
    return forwards


def mesh_handlers(manager: PeerManager) -> dict[str, Handler]:
    """Control requests about peers: ``ping`` and ``explain`` (each names a ``peer``)."""

    async def ping(request: dict[str, Any]) -> dict[str, Any]:
        within = manager.settings.heartbeat_timeout
        return await manager.ping(str(request.get("peer")), within)

    return {"ping": ping, "explain": lambda request: manager.explain(str(request.get("peer")))}


async def _drain(
    relay_tunnels: TunnelSet,
    forwards: list[PeerTunnel],
    control: ControlServer,
    drain_timeout: Callable[[], float],
) -> None:
    """Stop accepting, let open connections finish within ``server.drain_timeout``."""
    await control.aclose()
    drain = drain_timeout()
    stopping = time.monotonic()
    await asyncio.gather(
        relay_tunnels.aclose(drain), *(forward.aclose(drain) for forward in forwards)
    )
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
