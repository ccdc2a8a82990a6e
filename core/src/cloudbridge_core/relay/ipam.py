"""Overlay addresses at the relay (IPAM): each tenant's devices get addresses from the
tenant's pool, one lease per device key.

Tenants are separate namespaces: two may have the same or overlapping pools, since their
overlays never carry each other's packets. The pool is ``server.overlay.tenants.<id>.pool``,
else ``server.overlay.pool``.

A lease is sticky: the same device (its mesh ``public_key``) gets the same address back
across client and relay restarts, because the leases live in the cluster store
(:meth:`ClusterStore.ipam_update`): a relay alone keeps them in ``ipam.json`` in its state
directory (0600, replaced atomically: a crash leaves the old file or the new one), the
relays of a cluster in its Redis, where each change is atomic for the whole cluster so
two relays never lease one address twice. The rules live here alone, as a pure change
of one tenant's leases; the store only loads and saves them. When the store cannot be
reached, a join gets no address (an :class:`Allocation` saying why), never a guess.

A lease holds its address, the device's name and peer id, and when the device was last
seen (at each join and when it leaves the mesh). One whose device is away from the mesh
for longer than ``server.overlay.release_after`` is released, which is checked each time
the tenant leases an address: the only moment a released address can matter. A lease
outside its tenant's current pool (the pool was changed) is replaced at the device's next
join. A tenant's leases never share an address: of two (a file edited by hand), the one
seen last stays, whenever they are read (:func:`one_lease_per_address`).

A new lease takes the lowest free address of the pool, never the network or broadcast
address (a /31 or /32 has none). IPv4 only.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudbridge_core.durations import format_duration
from cloudbridge_core.errors import CloudBridgeError, ConfigError, ConfigIssue, ServerUnavailable
from cloudbridge_core.log import get_logger
from cloudbridge_core.secretfile import write_secret
from cloudbridge_core.settings import ServerOverlaySettings

if TYPE_CHECKING:  # the store's modules import this one for Lease
    from cloudbridge_core.relay.cluster.store import ClusterStore

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


def write_leases(path: Path, tenants: Leases) -> None:
    """Replace ``path`` (0600, atomically) with ``tenants``; raises ``OSError``."""
    document = {
        "version": FILE_VERSION,
        "tenants": {
            tenant: {key: asdict(lease) for key, lease in leases.items()}
            for tenant, leases in tenants.items()
        },
    }
    write_secret(path, (json.dumps(document, indent=2) + "\n").encode())


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


#: what a join is told when the store keeping the leases cannot be reached
UNAVAILABLE = "overlay addresses cannot be leased now: the cluster's Redis cannot be reached"


@dataclass
class _Outcome:
    """What one change of a tenant's leases did, logged once it is saved (a change may
    run again when another relay changed the leases meanwhile)."""

    allocation: Allocation
    renewed: bool = False
    released: list[Lease] = field(default_factory=list)
    replaced: Lease | None = None


class Ipam:
    """Each tenant's overlay address leases, kept in ``store``.

    Raises :class:`ConfigError` for a pool that is not an IPv4 network. ``clock`` gives
    Unix seconds (the tests' own clock).
    """

    def __init__(
        self,
        store: ClusterStore,
        settings: ServerOverlaySettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._default = parse_pool("server.overlay.pool", settings.pool)
        self._pools = {
            tenant: parse_pool(f"server.overlay.tenants.{tenant}.pool", own.pool)
            for tenant, own in settings.tenants.items()
        }
        self._release_after = settings.release_after
        self._clock = clock

    def pool_of(self, tenant_id: str) -> ipaddress.IPv4Network:
        return self._pools.get(tenant_id, self._default)

    async def leases(self, tenant_id: str) -> dict[str, Lease]:
        """The tenant's leases by device key; ``ServerUnavailable`` when the store cannot
        be reached."""
        return await self._store.ipam_leases(tenant_id)

    async def lease(
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
        now = int(self._clock())
        pool = self.pool_of(tenant_id)
        keep = {*in_mesh, device_key}

        def change(leases: dict[str, Lease]) -> _Outcome:
            released = [
                leases.pop(key)
                for key in list(leases)
                if key not in keep and now - leases[key].last_seen > self._release_after
            ]
            held = leases.get(device_key)
            replaced = None
            if held is not None and not _usable(pool, held.address):
                replaced, held = leases.pop(device_key), None
            if held is not None:
                held.device, held.peer_id, held.last_seen = device, peer_id, now
                return _Outcome(Allocation(str(pool), held.address), True, released, replaced)
            address = _lowest_free(pool, {lease.address for lease in leases.values()})
            if address is None:
                allocation = Allocation(str(pool), error=self._exhausted(tenant_id, pool))
                return _Outcome(allocation, False, released, replaced)
            leases[device_key] = Lease(address, device, peer_id, now)
            return _Outcome(Allocation(str(pool), address), False, released, replaced)

        try:
            outcome = await self._store.ipam_update(tenant_id, change)
        except ServerUnavailable as exc:
            log.warning(
                "overlay_address_refused", tenant_id=tenant_id, peer_id=peer_id, reason=exc.message
            )
            return Allocation(str(pool), error=UNAVAILABLE)
        self._log(tenant_id, peer_id, pool, now, outcome)
        return outcome.allocation

    async def seen(self, tenant_id: str, device_key: str) -> None:
        """The device left the mesh now: its lease, if it has one, counts its idle time
        from here. Logged, not raised, when the store cannot be reached (the lease then
        counts from the device's join)."""
        now = int(self._clock())

        def change(leases: dict[str, Lease]) -> None:
            held = leases.get(device_key)
            if held is not None:
                held.last_seen = now

        try:
            await self._store.ipam_update(tenant_id, change)
        except ServerUnavailable as exc:
            log.warning("overlay_lease_not_renewed", tenant_id=tenant_id, reason=exc.message)

    def _log(
        self,
        tenant_id: str,
        peer_id: str,
        pool: ipaddress.IPv4Network,
        now: int,
        outcome: _Outcome,
    ) -> None:
        for released in outcome.released:
            log.info(
                "overlay_lease_released",
                tenant_id=tenant_id,
                peer_id=released.peer_id,
                address=released.address,
                idle=format_duration(now - released.last_seen),
            )
        if outcome.replaced is not None:
            log.info(
                "overlay_lease_replaced",
                tenant_id=tenant_id,
                peer_id=peer_id,
                address=outcome.replaced.address,
                reason=f"outside the tenant's pool {pool}",
            )
        allocation = outcome.allocation
        if allocation.error:
            log.warning(
                "overlay_address_refused",
                tenant_id=tenant_id,
                peer_id=peer_id,
                reason=allocation.error,
            )
            return
        log.info(
            "overlay_address",
            tenant_id=tenant_id,
            peer_id=peer_id,
            address=allocation.address,
            renewed=outcome.renewed,
        )

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


def one_lease_per_address(tenant_id: str, leases: dict[str, Lease]) -> bool:
    """Keep one lease per address of the tenant (a file or a Redis edited by hand may hold
    two): the one seen last. Whether any was dropped."""
    dropped = False
    holder: set[str] = set()
    for key, lease in sorted(leases.items(), key=lambda item: -item[1].last_seen):
        if lease.address in holder:
            del leases[key]
            dropped = True
            log.warning(
                "overlay_lease_dropped",
                tenant_id=tenant_id,
                peer_id=lease.peer_id,
                address=lease.address,
                reason="another device of the tenant holds the same address",
            )
        else:
            holder.add(lease.address)
    return dropped
