"""Overlay addresses at the relay (IPAM): each tenant's devices get addresses from the
tenant's pool, one lease per device key.

Tenants are separate namespaces: two may have the same or overlapping pools, since their
overlays never carry each other's packets. The pool is ``server.overlay.tenants.<id>.pool``,
else ``server.overlay.pool``.

A lease is sticky: the same device (its mesh ``public_key``) gets the same address back
across client and relay restarts, because the leases live in ``ipam.json`` in the relay's
state directory (0600, replaced atomically: a crash leaves the old file or the new one).
A lease holds its address, the device's name and peer id, and when the device was last
seen (at each join and when it leaves the mesh). One whose device is away from the mesh
for longer than ``server.overlay.release_after`` is released, which is checked when the
relay starts and each time it leases an address: the only moments a released address can
matter. A lease outside its tenant's current pool (the pool was changed) is replaced at
the device's next join.

A new lease takes the lowest free address of the pool, never the network or broadcast
address (a /31 or /32 has none). IPv4 only.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cloudbridge_core.durations import format_duration
from cloudbridge_core.errors import CloudBridgeError, ConfigError, ConfigIssue
from cloudbridge_core.log import get_logger
from cloudbridge_core.secretfile import write_secret
from cloudbridge_core.settings import ServerOverlaySettings

log = get_logger("relay.ipam")

#: the shape of ``ipam.json``; a relay refuses a file of another version rather than guess
FILE_VERSION = 1


@dataclass
class Lease:
    """One device's address in its tenant's pool."""

    address: str
    #: the device's name when it last joined
    device: str
    peer_id: str
    #: Unix seconds: the device's last join, or when it last left the mesh
    last_seen: int


@dataclass(frozen=True)
class Allocation:
    """What a join asking for an overlay address gets: ``address`` in ``pool``, or why it
    gets none (``error``)."""

    pool: str
    address: str = ""
    error: str = ""

    def wire(self) -> dict[str, str]:
        """The ``overlay`` object of ``mesh_peers``."""
        if self.address:
            return {"address": self.address, "pool": self.pool}
        return {"error": self.error}


Leases = dict[str, dict[str, Lease]]
"""Tenant id -> device key -> lease."""


def read_leases(path: Path) -> Leases:
    """The leases kept in ``path``; none when it does not exist. Raises
    :class:`CloudBridgeError` naming the file when it cannot be read or is damaged."""
    try:
        document: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CloudBridgeError(
            f"cannot read the overlay leases in {path}: {exc.strerror or exc}",
            hint="run this as the user the relay runs as"
            if isinstance(exc, PermissionError)
            else None,
        ) from None
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, "not JSON") from None
    try:
        if document["version"] != FILE_VERSION:
            raise _damaged(path, f"version {document['version']!r}, not {FILE_VERSION}")
        return {
            str(tenant): {
                str(key): Lease(
                    address=str(ipaddress.IPv4Address(lease["address"])),
                    device=str(lease["device"]),
                    peer_id=str(lease["peer_id"]),
                    last_seen=int(lease["last_seen"]),
                )
                for key, lease in leases.items()
            }
            for tenant, leases in document["tenants"].items()
        }
    except (KeyError, TypeError, AttributeError, ValueError):
        raise _damaged(path, "not the shape of a lease file") from None


def _damaged(path: Path, reason: str) -> CloudBridgeError:
    return CloudBridgeError(
        f"cannot read the overlay leases in {path}: {reason}",
        hint="restore the file from a backup, or remove it (every device then gets a new address)",
    )


def parse_pool(key: str, pool: str) -> ipaddress.IPv4Network:
    """``pool`` as a network; :class:`ConfigError` at ``key`` when it is not an IPv4
    network in CIDR form with no host bits set (the config's schema checks this already)."""
    try:
        return ipaddress.IPv4Network(pool)
    except ValueError as exc:
        raise ConfigError([ConfigIssue(key, f"not an IPv4 network: {exc}")]) from None


class Ipam:
    """Each tenant's overlay address leases, kept in ``path`` (``ipam.json``).

    Opening it reads the file and releases the leases idle for longer than
    ``release_after``; raises :class:`CloudBridgeError` when the file is damaged, and
    :class:`ConfigError` for a pool that is not an IPv4 network. ``clock`` gives Unix
    seconds (the tests' own clock).
    """

    def __init__(
        self,
        path: Path,
        settings: ServerOverlaySettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path.absolute()
        self._default = parse_pool("server.overlay.pool", settings.pool)
        self._pools = {
            tenant: parse_pool(f"server.overlay.tenants.{tenant}.pool", own.pool)
            for tenant, own in settings.tenants.items()
        }
        self._release_after = settings.release_after
        self._clock = clock
        self._tenants = read_leases(self.path)
        changed = _drop_shared_addresses(self._tenants)
        now = self._now()
        for tenant in list(self._tenants):
            changed |= self._release_idle(tenant, (), now)
        if changed:
            self._save()

    def pool_of(self, tenant_id: str) -> ipaddress.IPv4Network:
        return self._pools.get(tenant_id, self._default)

    def leases(self, tenant_id: str) -> dict[str, Lease]:
        """The tenant's leases by device key (a copy)."""
        return {
            key: Lease(**asdict(lease)) for key, lease in self._tenants.get(tenant_id, {}).items()
        }

    def lease(
        self,
        tenant_id: str,
        device_key: str,
        device: str,
        peer_id: str,
        in_mesh: Collection[str] = (),
    ) -> Allocation:
        """The address of the device ``device_key`` of ``tenant_id``: the one it holds
        while that is in the tenant's pool, else the lowest free one; or why there is none.
        ``in_mesh`` are the keys of the tenant's devices in the mesh now (their leases are
        never released, however long ago they joined)."""
        now = self._now()
        pool = self.pool_of(tenant_id)
        changed = self._release_idle(tenant_id, {*in_mesh, device_key}, now)
        leases = self._tenants.setdefault(tenant_id, {})
        held = leases.get(device_key)
        if held is not None and not _usable(pool, held.address):
            log.info(
                "overlay_lease_replaced",
                tenant_id=tenant_id,
                peer_id=peer_id,
                address=held.address,
                reason=f"outside the tenant's pool {pool}",
            )
            del leases[device_key]
            held, changed = None, True
        renewed = held is not None
        if held is None:
            address = _lowest_free(pool, {lease.address for lease in leases.values()})
            if address is None:
                if changed:
                    self._save()
                reason = self._exhausted(tenant_id, pool)
                log.warning(
                    "overlay_address_refused", tenant_id=tenant_id, peer_id=peer_id, reason=reason
                )
                return Allocation(str(pool), error=reason)
            held = leases[device_key] = Lease(address, device, peer_id, now)
        else:
            held.device, held.peer_id, held.last_seen = device, peer_id, now
        self._save()
        log.info(
            "overlay_address",
            tenant_id=tenant_id,
            peer_id=peer_id,
            address=held.address,
            renewed=renewed,
        )
        return Allocation(str(pool), held.address)

    def seen(self, tenant_id: str, device_key: str) -> None:
        """The device left the mesh now: its lease, if it has one, counts its idle time
        from here."""
        held = self._tenants.get(tenant_id, {}).get(device_key)
        if held is not None:
            held.last_seen = self._now()
            self._save()

    def _now(self) -> int:
        return int(self._clock())

    def _release_idle(self, tenant_id: str, in_mesh: Collection[str], now: int) -> bool:
        leases = self._tenants.get(tenant_id, {})
        idle = [
            key
            for key, lease in leases.items()
            if key not in in_mesh and now - lease.last_seen > self._release_after
        ]
        for key in idle:
            released = leases.pop(key)
            log.info(
                "overlay_lease_released",
                tenant_id=tenant_id,
                peer_id=released.peer_id,
                address=released.address,
                idle=format_duration(now - released.last_seen),
            )
        if not leases:
            self._tenants.pop(tenant_id, None)
        return bool(idle)

    def _exhausted(self, tenant_id: str, pool: ipaddress.IPv4Network) -> str:
        key = (
            f"server.overlay.tenants.{tenant_id}.pool"
            if tenant_id in self._pools
            else "server.overlay.pool"
        )
        first, last = _bounds(pool)
        return (
            f"the tenant's overlay pool {pool} is exhausted: all {last - first + 1} of its"
            " addresses are leased to other devices (a lease is released once its device"
            f" has been away for {format_duration(self._release_after)}); a larger pool in"
            f" {key} would make room"
        )

    def _save(self) -> None:
        document = {
            "version": FILE_VERSION,
            "tenants": {
                tenant: {key: asdict(lease) for key, lease in leases.items()}
                for tenant, leases in self._tenants.items()
            },
        }
        try:
            write_secret(self.path, (json.dumps(document, indent=2) + "\n").encode())
        except OSError as exc:  # the leases stand meanwhile; the next save may succeed
            log.error(
                "overlay_leases_not_saved",
                path=str(self.path),
                reason=exc.strerror or str(exc),
                note="a relay restarted before the next save may move devices to new addresses",
            )


def _usable(pool: ipaddress.IPv4Network, address: str) -> bool:
    """Whether ``pool`` may lease ``address``: within it, and neither its network nor its
    broadcast address."""
    value = ipaddress.IPv4Address(address)
    first, last = _bounds(pool)
    return first <= int(value) <= last


def _bounds(pool: ipaddress.IPv4Network) -> tuple[int, int]:
    """The first and last address ``pool`` leases, as integers."""
    low, high = int(pool.network_address), int(pool.broadcast_address)
    if pool.prefixlen >= 31:  # point-to-point or one address: nothing to skip
        return low, high
    return low + 1, high - 1


def _lowest_free(pool: ipaddress.IPv4Network, used: Collection[str]) -> str | None:
    taken = {int(ipaddress.IPv4Address(address)) for address in used}
    first, last = _bounds(pool)
    candidate = first
    while candidate in taken:  # at most len(used) steps
        candidate += 1
    return str(ipaddress.IPv4Address(candidate)) if candidate <= last else None


def _drop_shared_addresses(tenants: Leases) -> bool:
    """Keep one lease per address in each tenant (a file edited by hand may hold two):
    the one seen last. Whether any was dropped."""
    dropped = False
    for tenant, leases in tenants.items():
        holder: dict[str, str] = {}
        for key, lease in sorted(leases.items(), key=lambda item: -item[1].last_seen):
            if lease.address in holder:
                del leases[key]
                dropped = True
                log.warning(
                    "overlay_lease_dropped",
                    tenant_id=tenant,
                    peer_id=lease.peer_id,
                    address=lease.address,
                    reason="another device of the tenant holds the same address",
                )
            else:
                holder[lease.address] = key
    return dropped
