"""``cloudbridge health``: is this machine's client able to work? Exit 0 yes, 4 when the
token is missing or refused, 6 for any other failure (3 when the config is invalid)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from cloudbridge_core.cli.output import emit_json, json_option
from cloudbridge_core.cli.runtime import config_option, runtime_of
from cloudbridge_core.client.control import query, socket_for
from cloudbridge_core.client.health import check_health, format_duration
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
@json_option
@click.option(
    "--check",
    type=click.Choice(["live", "ready"]),
    help="Print nothing; answer by exit code (live: the config is usable, else 3;"
    " ready: connected, else 4 or 6 as without --check).",
)
@click.pass_context
def health(ctx: click.Context, output: str, as_json: bool, check: str | None) -> int:
    """Connect to the relay as the client would and report network, auth, relay and latency.

    \b
    Exit codes: 0 healthy or degraded, 3 config invalid, 4 no token or the relay refused it,
    6 unhealthy otherwise. --check prints nothing at all.
    """
    if check is not None:
        return _silently(ctx, check)
    return _report(ctx, as_json or output == "json")


def _silently(ctx: click.Context, check: str) -> int:
    """``--check``: the exit code alone; not a line on stdout or stderr."""
    logging.disable(logging.CRITICAL)  # a probe's output is its exit code
    _silence_for_good()
    runtime = runtime_of(ctx)
    try:
        config = runtime.config()  # an invalid config exits 3, also for --check live
        if check == "live":
            return int(ExitCode.OK)
        document = asyncio.run(check_health(config, runtime.plugins, _running(runtime.config_path)))
    except CloudBridgeError as error:
        return int(error.exit_code)
    return _exit_code(document)


def _silence_for_good() -> None:
    """stdout and stderr to /dev/null for the rest of the process: also what a library
    or the interpreter writes at exit (an unclosed transport's warning)."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (1, 2):
        os.dup2(null, stream)
    os.close(null)


def _exit_code(document: dict[str, Any]) -> int:
    if document["status"] != "unhealthy":
        return int(ExitCode.OK)
    if document["details"]["authentication"]["status"] == "error":
        return int(ExitCode.AUTH)
    return int(ExitCode.UNHEALTHY)


def _report(ctx: click.Context, as_json: bool) -> int:
    runtime = runtime_of(ctx)
    config = runtime.config()
    document = asyncio.run(check_health(config, runtime.plugins, _running(runtime.config_path)))
    code = _exit_code(document)
    for warning in document["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        emit_json(document)
        return code
    relay = document["details"]["relay_connection"]
    auth = document["details"]["authentication"]
    expires = auth["token_expires_in_seconds"]
    lines = [
        f"Status:     {document['status']}",
        f"Relay:      {relay['status']}"
        + (f" over {relay['transport']}, {relay['latency_ms']} ms" if relay["transport"] else "")
        + (", the relay is degraded (see below)" if relay.get("relay_degraded") else ""),
        f"Token:      {auth['status']}"
        + (f", expires in {format_duration(expires)}" if expires is not None else ""),
    ]
    if auth.get("permissions") is not None:
        lines.append(f"Allows:     {', '.join(auth['permissions']) or 'nothing'}")
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
