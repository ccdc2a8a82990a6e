"""What the console shows, as JSON-ready dicts: the pages render them, ``/api/v1/`` returns
them (``schemas/console/``). Everything is read for one tenant; nothing here can name
another tenant's devices, tokens or invites."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from cloudbridge_core.errors import ServerUnavailable
from cloudbridge_core.relay.cluster.store import Device
from cloudbridge_core.relay.console.traffic import TrafficHistory
from cloudbridge_core.relay.mesh import Member
from cloudbridge_core.relay.server import Relay

#: what a device's report says of each peer, shown in the device list
PEER_FIELDS = ("peer_id", "name", "path", "rtt_seconds", "bytes_sent", "bytes_received")


def utc(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def tenant_devices(relay: Relay, tenant_id: str) -> tuple[list[dict[str, Any]], bool]:
    """The tenant's devices on every relay of the cluster, and whether the cluster could be
    asked (when not, this relay's own devices alone)."""
    local = {m.peer_id: m for m in relay.mesh.members() if m.tenant_id == tenant_id}
    try:
        listed = await relay.cluster.devices(tenant_id)
        whole = True
    except ServerUnavailable:
        listed = {peer_id: Device(relay.cluster.member, m.info) for peer_id, m in local.items()}
        whole = False
    devices = [_device(peer_id, d, local.get(peer_id)) for peer_id, d in listed.items()]
    return sorted(devices, key=lambda d: (d["name"], d["peer_id"])), whole


def _device(peer_id: str, device: Device, member: Member | None) -> dict[str, Any]:
    report = member.report if member is not None else None
    peers = list(report["peers"]) if report else []
    rtts = [p["rtt_seconds"] for p in peers if p.get("rtt_seconds")]
    return {
        "peer_id": peer_id,
        "name": device.info.get("name", peer_id),
        "overlay_ip": device.info.get("overlay_ip"),
        "relay": device.relay,
        "subject": member.subject if member is not None else None,
        "online": True,
        "last_seen": utc(member.reported_at if member is not None else None),
        "paths": dict(Counter(p["path"] for p in peers if p.get("path"))),
        "rtt_seconds": min(rtts) if rtts else None,
        "bytes_sent": sum(p.get("bytes_sent", 0) for p in peers),
        "bytes_received": sum(p.get("bytes_received", 0) for p in peers),
        "peers": [{key: p.get(key) for key in PEER_FIELDS} for p in peers],
    }


def device_detail(
    devices: Iterable[dict[str, Any]], relay: Relay, tenant_id: str, peer_id: str
) -> dict[str, Any] | None:
    """One device with what its report explains of each peer (attempts with their candidate
    pairs, path history), or None when the tenant has no such device."""
    found = next((d for d in devices if d["peer_id"] == peer_id), None)
    if found is None:
        return None
    member = relay.mesh.member(tenant_id, peer_id)
    report = member.report if member is not None else None
    found["peers"] = [
        {
            **{key: p.get(key) for key in PEER_FIELDS},
            "last_seen": p.get("last_seen"),
            "summary": p.get("summary", ""),
            "attempts": [
                # an older device reports no candidate pairs
                {**a, "candidate_pairs": list(a.get("candidate_pairs", []))}
                for a in p.get("attempts", [])
            ],
            "path_changes": list(p.get("path_changes", [])),
        }
        for p in (report["peers"] if report else [])
    ]
    return found


def links(devices: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Who talks to whom and over which path: one link per pair of devices, as the
    device with the lower id reports it (the other's report when only it has one)."""
    known = {d["peer_id"] for d in devices}
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for device in devices:
        for peer in device["peers"]:
            other = peer.get("peer_id")
            if other not in known or not peer.get("path"):
                continue
            low, high = sorted((device["peer_id"], other))
            pair = (low, high)
            if pair in pairs and device["peer_id"] != pair[0]:
                continue
            pairs[pair] = {
                "from": pair[0],
                "to": pair[1],
                "path": peer["path"],
                "rtt_seconds": peer.get("rtt_seconds"),
            }
    return list(pairs.values())


def graph(devices: list[dict[str, Any]], edges: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the devices and links go in the devices page's picture (SVG units, 400 x 300):
    devices on a circle, links between them."""
    centre_x, centre_y, radius = 200.0, 150.0, 110.0
    spots: dict[str, tuple[float, float]] = {}
    for index, device in enumerate(devices):
        angle = 2 * math.pi * index / max(len(devices), 1) - math.pi / 2
        spots[device["peer_id"]] = (
            round(centre_x + radius * math.cos(angle), 1),
            round(centre_y + radius * math.sin(angle), 1),
        )
    return {
        "nodes": [
            {"device": d, "x": spots[d["peer_id"]][0], "y": spots[d["peer_id"]][1]} for d in devices
        ],
        "edges": [
            {
                **edge,
                "x1": spots[edge["from"]][0],
                "y1": spots[edge["from"]][1],
                "x2": spots[edge["to"]][0],
                "y2": spots[edge["to"]][1],
            }
            for edge in edges
        ],
    }


async def overview(
    relay: Relay, tenant_id: str, devices: list[dict[str, Any]], traffic: TrafficHistory
) -> dict[str, Any]:
    try:
        relays = await relay.cluster.relays()
        cluster = "ok" if relay.cluster.healthy else "degraded"
    except ServerUnavailable:
        relays, cluster = {}, "degraded"
    paths: Counter[str] = Counter()
    for edge in links(devices):
        paths[edge["path"]] += 1
    return {
        "tenant_id": tenant_id,
        "relay": relay.cluster.member,
        "cluster": cluster,
        "relays": [
            {"name": name, "host": record.host, "this": name == relay.cluster.member}
            for name, record in sorted(relays.items())
        ],
        "sessions": relay.sessions_by_tenant.get(tenant_id, 0),
        "devices": len(devices),
        "paths": dict(paths),
        "traffic": traffic.of(tenant_id),
    }


def tokens(relay: Relay, tenant_id: str) -> dict[str, Any]:
    """The tokens the tenant's open sessions use (by subject and id), and the tenant's
    revocations in force."""
    in_use: dict[tuple[str, str | None], dict[str, Any]] = {}
    for claims in relay.session_claims(tenant_id):
        key = (claims.subject, claims.token_id)
        entry = in_use.setdefault(
            key,
            {
                "subject": claims.subject,
                "token_id": claims.token_id,
                "expires_at": utc(claims.expires_at),
                "permissions": sorted(claims.permissions),
                "sessions": 0,
            },
        )
        entry["sessions"] += 1
    revocations = [
        {
            "token_id": r.token_id,
            "subject": r.subject,
            "revoked_at": utc(r.revoked_at),
            "until": utc(r.until),
        }
        for r in relay.revocations.held()
        if r.tenant_id == tenant_id
    ]
    return {
        "in_use": sorted(in_use.values(), key=lambda e: (e["subject"], e["token_id"] or "")),
        "revocations": sorted(revocations, key=lambda r: r["revoked_at"] or ""),
    }


def invite_rows(entries: Iterable[Any]) -> list[dict[str, Any]]:
    return [
        {
            "invite_id": e.invite_id,
            "permissions": list(e.permissions),
            "expires_at": utc(e.expires_at),
            "uses_left": e.uses_left,
        }
        for e in entries
    ]


def now_utc() -> str:
    return utc(time.time()) or ""


def counts(values: Mapping[str, int]) -> str:
    """``{"direct": 2, "derp": 1}`` as "direct 2, derp 1" (what a table cell shows)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(values.items())) or "none"
