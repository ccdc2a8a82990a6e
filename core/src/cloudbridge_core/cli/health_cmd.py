"""``cloudbridge health``: is this machine's client able to work? Exit 0 yes, 6 no."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from cloudbridge_core.cli.runtime import config_option, runtime_of
from cloudbridge_core.client.control import query, socket_for
from cloudbridge_core.client.health import check_health
from cloudbridge_core.errors import CloudBridgeError, ExitCode


def _running(config_path: Path | None) -> dict[str, Any] | None:
    """The status of the client running with this config (its peers), if one is."""
    try:
        return asyncio.run(asyncio.wait_for(query(socket_for(config_path), "status"), 2))
    except (CloudBridgeError, TimeoutError, OSError, ValueError):
        return None


@click.command()
@config_option
@click.option(
    "--format",
    "output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="How to print the result.",
)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option(
    "--check",
    type=click.Choice(["live", "ready"]),
    help="Print nothing; answer by exit code (live: the config is usable; ready: connected).",
)
@click.pass_context
def health(ctx: click.Context, output: str, as_json: bool, check: str | None) -> int:
    """Connect to the relay as the client would and report network, auth, relay and latency."""
    runtime = runtime_of(ctx)
    config = runtime.config()  # an invalid config exits 3, also for --check live
    if check == "live":
        return int(ExitCode.OK)
    document = asyncio.run(check_health(config, runtime.plugins, _running(runtime.config_path)))
    healthy = document["status"] != "unhealthy"
    code = int(ExitCode.OK if healthy else ExitCode.UNHEALTHY)
    if check == "ready":
        return code
    if as_json or output == "json":
        click.echo(json.dumps(document, indent=2))
        return code
    relay = document["details"]["relay_connection"]
    auth = document["details"]["authentication"]
    lines = [
        f"Status:     {document['status']}",
        f"Relay:      {relay['status']}"
        + (f" over {relay['transport']}, {relay['latency_ms']} ms" if relay["transport"] else ""),
        f"Token:      {auth['status']}"
        + (
            f", expires in {auth['token_expires_in_seconds']} s"
            if auth["token_expires_in_seconds"] is not None
            else ""
        ),
    ]
    mesh = document["details"]["p2p_mesh"]
    lines.append(
        f"P2P mesh:   {mesh['status']}"
        + (
            f", {mesh['peers_connected']}/{mesh['peers_discovered']} peers connected"
            if mesh["status"] == "active"
            else ""
        )
    )
    lines += [f"  - {reason}" for reason in document["reasons"]]
    click.echo("\n".join(lines))
    return code
