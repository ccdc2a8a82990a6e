"""``cloudbridge ip``: this device's overlay addresses, asked of the running client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from cloudbridge_core.cli.output import emit_json, json_option
from cloudbridge_core.cli.runtime import config_option, control_socket_of, runtime_of, socket_option
from cloudbridge_core.client.control import query
from cloudbridge_core.errors import OverlayFailed


@click.command()
@config_option
@json_option
@socket_option
@click.pass_context
def ip(ctx: click.Context, as_json: bool, control_socket: Path | None) -> None:
    """Print this device's overlay address(es), one per line."""
    path = control_socket_of(runtime_of(ctx), control_socket)
    overlay = asyncio.run(query(path, "status")).get("overlay")
    if not overlay:
        raise OverlayFailed(
            "this device has no overlay address: the overlay is off or not up",
            hint="set overlay.enabled: true; cloudbridge status says why it is not up",
        )
    addresses = [address.split("/")[0] for address in overlay["addresses"]]
    if as_json:
        emit_json({"interface": overlay["interface"], "addresses": addresses})
        return
    for address in addresses:
        click.echo(address)
