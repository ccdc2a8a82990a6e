"""``cloudbridge health``: connect as the client would, and say how well it works.

The document has the seed's Part 6.5 shape: ``status`` (healthy, degraded, unhealthy) and
``details`` for network connectivity, authentication, the relay connection, the p2p mesh
and performance, in base units (``*_seconds``, ``*_ratio``); the seed's ``*_ms`` and
``*_percent`` fields stay beside them, deprecated (schemas/cli/health.schema.json).
Degraded still works: on a fallback transport, losing heartbeats, with a token about
to expire, or through a relay that says in its welcome that part of it is degraded (its
cluster store cannot be reached).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from cloudbridge_core.client.connection import RelayConnection, relay_hosts, transport_order
from cloudbridge_core.client.race import race_relays
from cloudbridge_core.client.tokens import (
    TokenSupply,
    loose_permissions,
    missing_permission,
    token_expires_in,
    token_permissions,
)
from cloudbridge_core.config import Config
from cloudbridge_core.errors import CloudBridgeError, HeartbeatFailed
from cloudbridge_core.plugins import Plugins
from cloudbridge_core.protocol import messages

PINGS = 5
#: what a token needs to forward ports through the relay (relay/server.py checks it)
TUNNEL_PERMISSION = "tunnel:create"
#: a token with less left than this makes the client degraded: renew it soon
TOKEN_RENEWAL_SECONDS = 3600
#: what a welcome's ``degraded`` codes mean for the user of the relay
RELAY_DEGRADED = {
    messages.CLUSTER_BACKEND: "its cluster store (Redis) cannot be reached, so devices on"
    " other relays, invites, token revocations and new overlay addresses wait until it is"
    " back; sessions on this relay keep working",
}


def mesh_health(running: dict[str, Any] | None, enabled: bool) -> dict[str, Any]:
    """The ``p2p_mesh`` part, from the running client's status (None: none is running)."""
    if not enabled:
        return {"status": "disabled", "peers_discovered": 0, "peers_connected": 0}
    if running is None:
        return {"status": "not_running", "peers_discovered": 0, "peers_connected": 0}
    peers = running.get("peers", [])
    paths: dict[str, int] = {}
    for peer in peers:
        if peer["connected"] and peer["path"]:
            paths[peer["path"]] = paths.get(peer["path"], 0) + 1
    return {
        "status": "active",
        "peers_discovered": len(peers),
        "peers_connected": sum(paths.values()),
        "paths": paths,
    }


async def check_health(
    config: Config, plugins: Plugins, running: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``running``: the status of the client running with this config, if one is."""
    tokens = TokenSupply(config, plugins)
    details: dict[str, Any] = {
        "network_connectivity": {"status": "unknown", "latency_seconds": None, "latency_ms": None},
        "authentication": {
            "status": "unknown",
            "token_expires_in_seconds": None,
            "token_source": tokens.where(),
        },
        "relay_connection": {
            "status": "disconnected",
            "transport": None,
            "latency_seconds": None,
            "latency_ms": None,
        },
        "p2p_mesh": mesh_health(running, config.settings.p2p.enabled),
        "performance": {
            "avg_latency_seconds": None,
            "packet_loss_ratio": None,
            "avg_latency_ms": None,
            "packet_loss_percent": None,
            "throughput_mbps": None,
        },
    }
    problems: list[str] = []
    degraded: list[str] = []
    warnings: list[str] = []
    if tokens.stored.token_file is not None:
        loose = loose_permissions(tokens.stored.token_file)
        if loose:
            warnings.append(loose)
    try:
        token = await tokens.token()
        expires_in = token_expires_in(token)
        details["authentication"]["token_expires_in_seconds"] = (
            round(expires_in) if expires_in is not None else None
        )
        granted = token_permissions(token)
        details["authentication"]["permissions"] = sorted(granted) if granted is not None else None
        lacking = missing_permission(token, TUNNEL_PERMISSION)
        if lacking and config.settings.tunnels:
            degraded.append(f"{lacking}: the relay refuses the configured tunnels")
        elif lacking:
            warnings.append(f"{lacking}: the relay would refuse a tunnel")
        candidates = transport_order(config, plugins)
        head_start = config.settings.transport.race_head_start
        started = time.perf_counter()
        hosts = relay_hosts(config.settings.relay)
        connection, reason = await race_relays(config, hosts, candidates, head_start, token)
    except CloudBridgeError as error:
        problems.append(error.message)
        part = "authentication" if error.exit_code == 4 else "network_connectivity"
        details[part].update(status="error", error=error.message, code=error.code)
        return _document("unhealthy", details, problems, warnings)
    try:
        connect = time.perf_counter() - started
        details["network_connectivity"] = {"status": "ok", **_seconds_and_ms("latency", connect)}
        details["authentication"]["status"] = "ok"
        if expires_in is not None and expires_in < TOKEN_RENEWAL_SECONDS:
            degraded.append(f"the token expires in {format_duration(expires_in)}")
        rtts = await _pings(connection, config.settings.transport.connect_timeout)
        details["relay_connection"], relay_reasons = _relay_connection(connection, reason, rtts)
        loss = (PINGS - len(rtts)) / PINGS
        details["performance"].update(
            **_seconds_and_ms("avg_latency", sum(rtts) / len(rtts) if rtts else None),
            packet_loss_ratio=loss,
            packet_loss_percent=100 * loss,
        )
        if not rtts:
            problems.append("the relay answered no heartbeat")
        elif loss:
            degraded.append(f"{100 * loss:g}% of heartbeats were lost")
        degraded += relay_reasons
    finally:
        await connection.aclose()
    status = "unhealthy" if problems else "degraded" if degraded else "healthy"
    return _document(status, details, problems + degraded, warnings)


def _relay_connection(
    connection: RelayConnection, reason: str, rtts: list[float]
) -> tuple[dict[str, Any], list[str]]:
    """The ``relay_connection`` part, and why the relay reached makes the client degraded:
    a fallback transport, or what the relay's welcome names degraded."""
    relay_degraded = [
        {"code": code, "message": _relay_degraded_message(code)}
        for code in connection.welcome.degraded or ()
    ]
    part = {
        "status": "connected",
        "transport": connection.transport,
        "reason": reason,
        **_seconds_and_ms("latency", min(rtts) if rtts else None),
        "relay_degraded": relay_degraded,
    }
    reasons = [f"on a fallback transport: {reason}"] if reason.startswith("fallback") else []
    return part, reasons + [f"the relay is degraded: {d['message']}" for d in relay_degraded]


def _relay_degraded_message(code: str) -> str:
    """What a welcome's ``degraded`` code means, in words; a code from a newer relay as is
    (the schema keeps it to a short plain word)."""
    return RELAY_DEGRADED.get(code, f"it names {code!r}, which this client does not know")


def _seconds_and_ms(name: str, seconds: float | None) -> dict[str, float | None]:
    """``<name>_seconds``, and the seed's ``<name>_ms`` beside it (deprecated)."""
    if seconds is None:
        return {f"{name}_seconds": None, f"{name}_ms": None}
    return {f"{name}_seconds": round(seconds, 5), f"{name}_ms": round(seconds * 1000, 2)}


async def _pings(connection: RelayConnection, each_within: float) -> list[float]:
    rtts = []
    for _ in range(PINGS):
        try:
            rtts.append(await connection.ping(each_within))
        except HeartbeatFailed:
            continue
    return rtts


def format_duration(seconds: float) -> str:
    """A lifetime for people: ``23h 59m``, ``2d 3h``, ``5m 10s``, ``40s``."""
    whole = max(0, int(seconds))  # a lifetime left: 86399.7 s is not a full day
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, whole = divmod(whole, size)
        if amount or (unit == "s" and not parts):
            parts.append(f"{amount}{unit}")
    return " ".join(parts[:2])


def _document(
    status: str, details: dict[str, Any], reasons: list[str], warnings: list[str]
) -> dict[str, Any]:
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "status": status,
        "reasons": reasons,
        "warnings": warnings,
        "details": details,
    }
