"""``cloudbridge p2p`` joins the tenant's mesh; ``cloudbridge ping PEER`` asks it which path
answers and how fast."""

from __future__ import annotations

import asyncio
import base64
import warnings
from pathlib import Path

import click
import platformdirs

from cloudbridge_core.cli.output import emit_json, json_option, message
from cloudbridge_core.cli.runtime import (
    Runtime,
    config_option,
    control_socket_of,
    runtime_of,
    socket_option,
)
from cloudbridge_core.cli.serving import run_async
from cloudbridge_core.cli.tunnel_cmd import run_client
from cloudbridge_core.client.control import config_digest, query
from cloudbridge_core.errors import UsageError
from cloudbridge_core.overlay.capability import NO_NET_ADMIN, has_net_admin
from cloudbridge_core.p2p.identity import DeviceIdentity, load_or_create_key
from cloudbridge_core.p2p.setup import MODES, MeshSetup


def device_key_file(config_path: Path | None) -> Path:
    """Where this config's device key lives: one identity per config file, kept 0600."""
    with warnings.catch_warnings():  # platformdirs warns when it falls back to a default
        warnings.simplefilter("ignore")
        state = platformdirs.user_state_path("cloudbridge")
    name = f"device-{config_digest(config_path)}.key" if config_path else "device.key"
    return state / name


@click.command()
@config_option
@socket_option
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="p2p-first",
    show_default=True,
    help="Paths to peers: p2p-first (relayed DERP as fallback), relay-only, p2p-only.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Try to connect once and exit 5 if the relay does not answer (default: keep trying).",
)
@click.pass_context
def p2p(ctx: click.Context, control_socket: Path | None, mode: str, once: bool) -> None:
    """Join the tenant's mesh: find its peers, reach them through NAT, serve p2p.expose."""
    join_mesh(runtime_of(ctx), control_socket, mode, once=once)


def join_mesh(
    runtime: Runtime, control_socket: Path | None, mode: str, *, once: bool = False
) -> None:
    """Run the client in the mesh until stopped (``cloudbridge p2p``, and ``join``)."""
    config = runtime.config()
    if not config.settings.p2p.enabled:
        raise UsageError("p2p.enabled is false in the config: the mesh is turned off")
    key_file = device_key_file(runtime.config_path)
    identity = DeviceIdentity.create(key_file)
    setup = MeshSetup(identity, mode)
    overlay = config.settings.overlay
    if overlay.enabled and not has_net_admin():  # no address asked for, none held for nothing
        message(f"no overlay: {NO_NET_ADMIN}")
    elif overlay.enabled:
        spec = runtime.plugins.require("overlay", overlay.type)
        setup.overlay = spec.load(
            runtime.plugins.settings_for("overlay", overlay.type, config.converted)
        )
        # a key of its own, beside the device's: the overlay's peers never see the other
        overlay_key = load_or_create_key(key_file.with_name("overlay-" + key_file.name))
        setup.overlay_key = base64.b64encode(overlay_key.private_bytes_raw()).decode()
    socket = control_socket_of(runtime, control_socket)

    async def main() -> None:
        await run_client(runtime, config, socket, mesh=setup, once=once)

    run_async(main)


@click.command()
@click.argument("peer")
@config_option
@json_option
@socket_option
@click.pass_context
def ping(ctx: click.Context, peer: str, as_json: bool, control_socket: Path | None) -> None:
    """Ping PEER through the running `cloudbridge p2p`: which path answered, and its RTT."""
    path = control_socket_of(runtime_of(ctx), control_socket)
    reply = asyncio.run(query(path, "ping", peer=peer))
    if as_json:
        emit_json(reply)
        return
    click.echo(f"pong from {reply['peer']} via {reply['path']} in {reply['rtt_ms']:.2f} ms")
