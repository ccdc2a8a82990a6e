"""The devices other relays of the cluster hold, as this relay knows them: filled from the
store when a tenant's first device joins here, kept current by the other relays' ``joined``
and ``left`` events, emptied of a relay's devices when its presence lapses.

What arrives from another relay went through Redis: every field is checked before use (a
device's info is a flat mapping of short strings naming at least its id, name and key).
"""

from __future__ import annotations

import base64
import binascii

from cloudbridge_core.relay.cluster.store import Device

#: the fields every device's info names, and the longest value a field may hold (a
#: certificate is the longest)
REQUIRED = ("peer_id", "name", "public_key")
MAX_FIELD = 8192
MAX_FIELDS = 16


def valid_info(info: object) -> dict[str, str] | None:
    """``info`` as a device's info, or None when it is not one."""
    if not isinstance(info, dict) or len(info) > MAX_FIELDS:
        return None
    if not all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= MAX_FIELD for k, v in info.items()
    ):
        return None
    if not all(info.get(name) for name in REQUIRED):
        return None
    return dict(info)


def key_of(info: dict[str, str]) -> bytes | None:
    try:
        return base64.b64decode(info["public_key"], validate=True)
    except (binascii.Error, ValueError):
        return None


class RemoteDevices:
    """Devices on other relays, by tenant and peer id."""

    def __init__(self, member: str) -> None:
        self._member = member
        self._tenants: dict[str, dict[str, Device]] = {}

    def known(self, tenant_id: str) -> bool:
        return tenant_id in self._tenants

    def load(self, tenant_id: str, devices: dict[str, Device]) -> None:
        """The tenant's devices as the store lists them (this relay's left out)."""
        self._tenants[tenant_id] = {
            peer_id: device
            for peer_id, device in devices.items()
            if device.relay != self._member and valid_info(device.info) is not None
        }

    def forget(self, tenant_id: str) -> None:
        """No device of the tenant is here any more: its view is loaded again when one is."""
        self._tenants.pop(tenant_id, None)

    def infos(self, tenant_id: str) -> list[dict[str, str]]:
        return [device.info for device in self._tenants.get(tenant_id, {}).values()]

    def get(self, tenant_id: str, peer_id: str) -> Device | None:
        return self._tenants.get(tenant_id, {}).get(peer_id)

    def by_key(self, tenant_id: str, key: bytes) -> Device | None:
        for device in self._tenants.get(tenant_id, {}).values():
            if key_of(device.info) == key:
                return device
        return None

    def joined(self, tenant_id: str, relay: str, info: dict[str, str]) -> Device | None:
        """Record a device that joined on ``relay``; the one it replaces (same peer id, an
        older session), if any."""
        if not self.known(tenant_id):
            return None
        devices = self._tenants[tenant_id]
        replaced = devices.get(info["peer_id"])
        devices[info["peer_id"]] = Device(relay, info)
        return replaced

    def left(self, tenant_id: str, relay: str, peer_id: str) -> Device | None:
        """Forget a device that left ``relay``; the device, if it was known there."""
        devices = self._tenants.get(tenant_id, {})
        device = devices.get(peer_id)
        if device is None or device.relay != relay:
            return None
        del devices[peer_id]
        return device

    def drop(self, tenant_id: str, peer_id: str) -> None:
        """Forget a device whose newest session is on this relay now."""
        self._tenants.get(tenant_id, {}).pop(peer_id, None)

    def gone(self, relays: set[str]) -> list[tuple[str, Device]]:
        """Forget the devices of relays that are gone; each, with its tenant."""
        dropped: list[tuple[str, Device]] = []
        for tenant_id, devices in self._tenants.items():
            for peer_id in [p for p, d in devices.items() if d.relay in relays]:
                dropped.append((tenant_id, devices.pop(peer_id)))
        return dropped
