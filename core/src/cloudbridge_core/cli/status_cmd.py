"""``cloudbridge status``: what the running client is doing, asked over its control socket."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from cloudbridge_core.cli.output import emit_json, json_option, table
from cloudbridge_core.cli.runtime import config_option, control_socket_of, runtime_of, socket_option
from cloudbridge_core.client.control import query


@click.command()
@config_option
@json_option
@socket_option
@click.option("--explain", "explain", metavar="PEER", help="Why PEER is on the path it is on.")
@click.pass_context
def status(
    ctx: click.Context, as_json: bool, control_socket: Path | None, explain: str | None
) -> None:
    """Show the relay, the transport in use and why, latency, tunnels, peers and the last
    error."""
    path = control_socket_of(runtime_of(ctx), control_socket)
    if explain is not None:
        reply = asyncio.run(query(path, "explain", peer=explain))
        if as_json:
            emit_json(reply)
        else:
            click.echo(_explanation(reply))
        return
    reply = asyncio.run(query(path, "status"))
    if as_json:
        emit_json(reply)
        return
    click.echo(_text(reply))


def _explanation(reply: dict[str, Any]) -> str:
    lines = [
        f"Peer:       {reply['name']} ({reply['peer_id']})",
        f"Path:       {reply['path'] or 'none'} {reply['endpoint'] or ''}".rstrip(),
        f"Why:        {reply['summary']}",
    ]
    retry = reply["next_retry_in_seconds"]
    if retry is not None:
        lines.append(f"Next retry: in {retry:.0f} s")
    for attempt in reply["attempts"]:
        error = f" - {attempt['error']}" if attempt["error"] else ""
        lines.append(
            f"  {attempt['strategy']:<6} attempt {attempt['attempt']}: {attempt['state']}{error}"
        )
        for pair in attempt["details"].get("candidate_pairs", []):
            lines.append(f"      {pair['local']} -> {pair['remote']}: {pair['state']}")
    return "\n".join(lines)


def _carried(peer: dict[str, Any]) -> str:
    """A peer's path and what carries it there (``direct (tcp)``, ``stun (quic)``)."""
    if not peer["path"]:
        return "-"
    protocol = peer.get("protocol")
    return f"{peer['path']} ({protocol})" if protocol else peer["path"]


def _text(reply: dict[str, Any]) -> str:
    transport = reply["transport"]
    relay = reply["relay"]
    rtt = transport["rtt_seconds"]
    on = relay.get("connected_to")
    where = (
        f"{on['host']} ({on['address']}:{on['port']}) via {transport['name']}"
        if on
        else f"{relay['host']}, not connected"
    )
    lines = [
        f"State:      {reply['state']}",
        f"Relay:      {where} (tenant {relay['tenant_id']})",
        f"Token:      {reply['relay']['token_source']}",
        f"Transport:  {transport['name']} (mode {transport['mode']}) - {transport['reason']}",
        f"Latency:    {f'{rtt * 1000:.1f} ms' if rtt is not None else 'not measured yet'}",
    ]
    if len(relay.get("hosts", [])) > 1:
        lines.append(f"Relays:     {', '.join(relay['hosts'])} (the first that answers)")
    if transport["draining"]:
        lines.append(f"Draining:   {', '.join(transport['draining'])} (open connections finish)")
    if transport["note"]:
        lines.append(f"Note:       {transport['note']}")
    if reply["last_error"]:
        lines.append(f"Last error: {reply['last_error']}")
    if reply["metrics_url"]:
        lines.append(f"Metrics:    {reply['metrics_url']}")
    overlay = reply.get("overlay")
    if overlay:
        addresses = ", ".join(overlay["addresses"])
        lines.append(f"Overlay:    {overlay['interface']} {addresses} ({overlay['backend']})")
    rows = [
        (
            t["local"],
            t["target"],
            f"{t['statistics']['active_connections']}/{t['statistics']['total_connections']}",
            str(t["statistics"]["bytes_sent"]),
            str(t["statistics"]["bytes_received"]),
        )
        for t in reply["tunnels"]
    ]
    if rows:
        lines += ["", table(rows, ("LOCAL", "TARGET", "ACTIVE/TOTAL", "SENT", "RECEIVED"))]
    with_overlay = overlay is not None or any(p.get("overlay_ip") for p in reply.get("peers", []))
    peers = [
        (
            p["name"],
            *([p.get("overlay_ip") or "-"] if with_overlay else []),
            _carried(p),
            p["endpoint"] or "-",
            f"{p['rtt_ms']:.1f} ms" if p["rtt_ms"] is not None else "-",
            p["last_seen"] or "never",
        )
        for p in reply.get("peers", [])
    ]
    headers = ("PEER", *(["OVERLAY IP"] if with_overlay else []), "PATH (CARRIER)", "ENDPOINT")
    if peers:
        lines += ["", table(peers, (*headers, "RTT", "LAST SEEN"))]
    return "\n".join(lines)
