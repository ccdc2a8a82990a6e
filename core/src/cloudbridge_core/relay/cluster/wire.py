"""Reading what another relay wrote to the cluster's Redis: events, devices, presence
records and revocations, each checked field by field (anyone who reaches that Redis can
write there); what does not fit is ``None``."""

from __future__ import annotations

import json
from typing import Any, TypeGuard

from cloudbridge_core.relay.cluster.store import ClusterEvent, Device, RelayRecord, Revocation

#: longest event read: a peer signal with its ICE candidates is a few KiB
MAX_EVENT_BYTES = 65536
EVENT_KINDS = frozenset({"joined", "left", "signal", "revoked"})


def _json(raw: object) -> Any:
    if not isinstance(raw, bytes | str) or len(raw) > MAX_EVENT_BYTES:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _strings(value: object) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    return value


def _optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def revocation_of(body: object) -> Revocation | None:
    if not isinstance(body, dict):
        return None
    tenant_id, revoked_at, until = body.get("tenant_id"), body.get("revoked_at"), body.get("until")
    token_id, subject = body.get("token_id"), body.get("subject")
    if not (isinstance(tenant_id, str) and _number(revoked_at) and _number(until)):
        return None
    if not (_optional_str(token_id) and _optional_str(subject)) or not (token_id or subject):
        return None
    return Revocation(tenant_id, float(revoked_at), float(until), token_id, subject)


def decode_revocation(raw: object) -> Revocation | None:
    return revocation_of(_json(raw))


def decode_record(raw: object) -> RelayRecord | None:
    record = _strings(_json(raw))
    if record is None or set(record) != {"host", "link"}:
        return None
    return RelayRecord(record["host"], record["link"])


def decode_device(raw: object) -> Device | None:
    device = _json(raw)
    if not isinstance(device, dict) or not isinstance(device.get("relay"), str):
        return None
    info = _strings(device.get("info"))
    return None if info is None else Device(device["relay"], info)


def _valid_body(kind: str, tenant_id: str, body: dict[str, Any]) -> bool:
    if kind in ("joined", "left"):
        return _strings(body) is not None
    if kind == "signal":
        return all(isinstance(body.get(field), str) for field in ("from", "to", "kind"))
    revocation = revocation_of(body)
    return revocation is not None and revocation.tenant_id == tenant_id


def decode_event(raw: object) -> ClusterEvent | None:
    event = _json(raw)
    if not isinstance(event, dict):
        return None
    kind, tenant_id = event.get("kind"), event.get("tenant_id")
    body, sender = event.get("body"), event.get("sender")
    if kind not in EVENT_KINDS or not isinstance(tenant_id, str) or not isinstance(sender, str):
        return None
    if not isinstance(body, dict) or not sender or not _valid_body(kind, tenant_id, body):
        return None
    return ClusterEvent(kind, tenant_id, body, sender)
