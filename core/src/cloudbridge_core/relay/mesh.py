"""Each tenant's mesh as the relay sees it: who is in it, and passing signals and DERP
packets between peers of one tenant — never across tenants.

A peer of another tenant is not "forbidden" but unknown: the relay looks peers up only
within the sender's tenant, so no answer reveals that another tenant's peer exists.

A device proves it holds its key when it joins. The key is X25519, which cannot sign, so
the proof is a MAC: each session gets a fresh relay X25519 key (``mesh_challenge``), and
``mesh_join`` carries an HMAC under a key derived from X25519(device key, that key) — only
the holder of the device's private key (or the relay, for this session) can compute it.
This proves possession of exactly the key that names the device (a separate signing key
would itself have to be bound to it) and needs nothing new stored or published.

A join with an ``overlay_key`` (the device's WireGuard key) also asks for the device's
overlay address: the relay's IPAM (``relay/ipam.py``) leases it one from its tenant's pool,
by device key, and the device's entry then carries ``overlay_ip`` and ``overlay_key`` for
its peers to reach it over the overlay.

In a cluster a tenant's mesh spans relays: each relay holds the devices whose sessions it
serves and learns the others' from the cluster's store (``relay/cluster``). Joins and leaves
reach the other relays as events, signals for a device on another relay go to that relay
through the store, and DERP packets for it over the relay-to-relay link
(:attr:`Mesh.remote_packets`). When the store cannot be reached, each relay goes on with
what it holds and knows: its own devices reach each other as before.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudbridge_core.errors import (
    ProtocolViolation,
    ServerUnavailable,
    TransportError,
    Unauthorized,
)
from cloudbridge_core.log import get_logger
from cloudbridge_core.protocol import derp, messages
from cloudbridge_core.providers import Claims, Stream
from cloudbridge_core.relay.cluster.remote import RemoteDevices, valid_info
from cloudbridge_core.relay.cluster.store import ClusterEvent, ClusterStore, Device
from cloudbridge_core.relay.ipam import Allocation, Ipam
from cloudbridge_core.relay.metrics import RelayMetrics
from cloudbridge_core.wire import MessageStream

log = get_logger("relay.mesh")

P2P = "p2p:mesh"
#: a peer slow to take its packets loses them rather than holding up the sender
DERP_WRITE_TIMEOUT = 1.0
#: bytes of a WireGuard public key (Curve25519)
OVERLAY_KEY_SIZE = 32


def peer_id_of(public_key: str) -> str:
    """A short, stable id for a device key (what users and signals name peers by)."""
    digest = hashlib.sha256(base64.b64decode(public_key)).digest()
    return base64.urlsafe_b64encode(digest[:12]).decode()


def join_proof(shared_secret: bytes, request: messages.MeshJoin) -> str:
    """The ``proof`` of a ``mesh_join``: binds its name, key and instance to the session's
    X25519 shared secret (computed by the device, or by the relay from its side)."""
    key = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"cloudbridge/1 mesh_join").derive(
        shared_secret
    )
    signed = "\n".join((request.name, request.public_key, request.instance)).encode()
    return hmac.new(key, signed, hashlib.sha256).hexdigest()


def is_overlay_key(value: str) -> bool:
    """Whether ``value`` is a WireGuard public key as ``wg pubkey`` writes it: base64 of
    :data:`OVERLAY_KEY_SIZE` bytes."""
    try:
        return len(base64.b64decode(value, validate=True)) == OVERLAY_KEY_SIZE
    except ValueError:  # binascii.Error: not base64
        return False


class Challenge:
    """One session's ``mesh_challenge``: a relay X25519 key made for this session only."""

    def __init__(self) -> None:
        self._key = X25519PrivateKey.generate()
        self.message = messages.MeshChallenge(
            base64.b64encode(self._key.public_key().public_bytes_raw()).decode()
        )

    def proven(self, request: messages.MeshJoin) -> bool:
        if not request.proof:
            return False
        device = X25519PublicKey.from_public_bytes(base64.b64decode(request.public_key))
        expected = join_proof(self._key.exchange(device), request)
        return hmac.compare_digest(expected, request.proof)


@dataclass(eq=False)
class Member:
    tenant_id: str
    subject: str
    info: dict[str, str]
    control: MessageStream
    channel: Stream | None = None  # its DERP channel, once opened
    #: its overlay address or why it has none (``mesh_peers.overlay``); None: not asked for
    overlay: dict[str, str] | None = None
    #: its latest ``mesh_report`` (``{"peers": [...]}``), naming only peers of its tenant;
    #: None until it sends one
    report: dict[str, Any] | None = None
    #: when it did (``time.time()``)
    reported_at: float | None = None
    _derp_writing: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def key(self) -> bytes:
        return base64.b64decode(self.info["public_key"])

    async def deliver(self, frame: derp.Frame) -> bool:
        """Write a frame on this member's DERP channel; False if it has none or is stuck."""
        if self.channel is None:
            return False
        try:
            async with self._derp_writing:
                await asyncio.wait_for(self.channel.write(derp.encode(frame)), DERP_WRITE_TIMEOUT)
        except (TransportError, TimeoutError):
            return False
        return True


#: sends a DERP packet to a device on another relay: (relay, tenant, sender key, target
#: key, payload) -> whether it went (it is dropped otherwise, as DERP may)
RemotePackets = Callable[[str, str, bytes, bytes, bytes], Awaitable[bool]]


class Mesh:
    """``ipam`` leases overlay addresses to the devices that ask; without it, a device that
    asks is told the relay leases none. ``cluster`` holds the devices of other relays."""

    def __init__(
        self, metrics: RelayMetrics, cluster: ClusterStore, ipam: Ipam | None = None
    ) -> None:
        self._metrics = metrics
        self.ipam = ipam
        self._cluster = cluster
        self._tenants: dict[str, dict[str, Member]] = {}
        self._remote = RemoteDevices(cluster.member)
        #: set when the relay has a link to the other relays (a cluster)
        self.remote_packets: RemotePackets | None = None

    def members(self) -> Iterator[Member]:
        for peers in self._tenants.values():
            yield from peers.values()

    def members_of(self, tenant_id: str) -> list[Member]:
        """The devices of ``tenant_id`` joined on this relay (their current sessions)."""
        return list(self._tenants.get(tenant_id, {}).values())

    def member(self, tenant_id: str, peer_id: str) -> Member | None:
        """The current member ``peer_id`` of ``tenant_id`` (never another tenant's)."""
        return self._tenants.get(tenant_id, {}).get(peer_id)

    def peers_by_tenant(self) -> dict[str, int]:
        return {tenant: len(peers) for tenant, peers in self._tenants.items()}

    async def join(
        self,
        claims: Claims,
        control: MessageStream,
        request: messages.MeshJoin,
        challenge: Challenge,
        credentials: messages.TurnCredentials | None = None,
    ) -> Member:
        """Add the device to its tenant's mesh, with its overlay address when it sends an
        ``overlay_key``; ``Unauthorized`` without ``p2p:mesh``, without a proof answering
        ``challenge``, or for a key bound to another device (another name);
        ``ProtocolViolation`` for an ``overlay_key`` that is not a WireGuard key.
        ``credentials`` (TURN) reach the member just before its peer list."""
        if P2P not in claims.permissions:
            self.rejected("unauthorized", claims.tenant_id, "mesh_join without " + P2P)
            raise Unauthorized(f"token lacks the {P2P} permission")
        if not challenge.proven(request):
            self.rejected("bad_proof", claims.tenant_id, "mesh_join without a valid proof")
            raise Unauthorized("mesh_join does not prove possession of the device key")
        peers = self._tenants.get(claims.tenant_id, {})
        bound = peers.get(peer_id_of(request.public_key)) or self._remote.get(
            claims.tenant_id, peer_id_of(request.public_key)
        )
        if bound is not None and bound.info["name"] != request.name:
            self.rejected("key_in_use", claims.tenant_id, "mesh_join with another device's key")
            raise Unauthorized("this device key is already bound to another device of the tenant")
        if request.overlay_key and not is_overlay_key(request.overlay_key):
            self.rejected("bad_overlay_key", claims.tenant_id, "mesh_join with a bad overlay_key")
            raise ProtocolViolation(
                "mesh_join's overlay_key is not a WireGuard public key (base64 of 32 bytes)"
            )
        info = {
            "peer_id": peer_id_of(request.public_key),
            "name": request.name,
            "public_key": request.public_key,
            "certificate": request.certificate,
        }
        if request.instance:
            info["instance"] = request.instance
        member = Member(claims.tenant_id, claims.subject, info, control)
        if request.overlay_key:
            allocation = await self._allocate(claims.tenant_id, request, peers.values())
            member.overlay = allocation.wire()
            if allocation.address:
                info["overlay_ip"] = allocation.address
                info["overlay_key"] = request.overlay_key
        await self._load_remote(claims.tenant_id)
        peers = self._tenants.setdefault(claims.tenant_id, {})
        replaced = peers.get(member.peer_id)
        peers[member.peer_id] = member  # the same device again: its newest session wins
        replaced_remote = self._remote.get(claims.tenant_id, member.peer_id)
        self._remote.drop(claims.tenant_id, member.peer_id)
        others = [m for m in peers.values() if m is not member]
        if credentials is not None:
            await tell(control, credentials)
        listed = messages.MeshPeers(
            info, [m.info for m in others] + self._remote.infos(claims.tenant_id), member.overlay
        )
        await tell(control, listed)
        previous = replaced or replaced_remote
        events = _rejoined(previous.info if previous is not None else None, info)
        if replaced is not None:
            # told why, so two processes sharing one device key do not take turns silently
            reason = "a newer session of this device joined the mesh"
            await tell(replaced.control, messages.MeshEvent("replaced", info, reason))
        for event in events:
            await asyncio.gather(*(tell(m.control, event) for m in others))
        await self._shared(
            "put_device", self._cluster.put_device(claims.tenant_id, member.peer_id, info)
        )
        log.info(
            "peer_joined",
            tenant_id=claims.tenant_id,
            peer_id=member.peer_id,
            name=request.name,
            peers=len(peers),
        )
        return member

    async def _allocate(
        self, tenant_id: str, request: messages.MeshJoin, members: Iterable[Member]
    ) -> Allocation:
        """The overlay address of the joining device: one lease per device key."""
        if self.ipam is None:
            return Allocation("", error="this relay leases no overlay addresses")
        in_mesh = {m.info["public_key"] for m in members}
        peer_id = peer_id_of(request.public_key)
        return await self.ipam.lease(tenant_id, request.public_key, request.name, peer_id, in_mesh)

    async def refresh(self, member: Member) -> None:
        others = [
            m.info for m in self._tenants.get(member.tenant_id, {}).values() if m is not member
        ] + self._remote.infos(member.tenant_id)
        await tell(member.control, messages.MeshPeers(member.info, others, member.overlay))

    async def leave(self, member: Member) -> None:
        peers = self._tenants.get(member.tenant_id, {})
        if peers.get(member.peer_id) is not member:
            return  # already replaced by a newer session of the same device
        del peers[member.peer_id]
        if not peers:
            del self._tenants[member.tenant_id]
            self._remote.forget(member.tenant_id)  # loaded again when a device joins here
        await self._shared(
            "drop_device", self._cluster.drop_device(member.tenant_id, member.peer_id)
        )
        if self.ipam is not None and "overlay_ip" in member.info:
            await self.ipam.seen(member.tenant_id, member.info["public_key"])
        gone = derp.Frame(derp.FrameType.PEER_GONE, member.key)
        await asyncio.gather(
            *(tell(m.control, messages.MeshEvent("left", member.info)) for m in peers.values()),
            *(m.deliver(gone) for m in peers.values()),
        )
        log.info("peer_left", tenant_id=member.tenant_id, peer_id=member.peer_id)

    async def signal(self, sender: Member | None, tenant_id: str, signal: messages.Signal) -> None:
        """Forward a signal to a peer of the sender's tenant, or say it could not be."""
        if sender is None or not self._current(sender):
            self.rejected("not_joined", tenant_id, "signal before mesh_join")
            return
        target = self._tenants.get(tenant_id, {}).get(signal.peer_id)
        remote = self._remote.get(tenant_id, signal.peer_id) if target is None else None
        if remote is not None:
            await self._signal_remote(sender, tenant_id, remote, signal)
            return
        if target is None:
            self.rejected("unknown_peer", tenant_id, f"signal to unknown peer {signal.peer_id}")
            await tell(
                sender.control,
                messages.SignalFailed(signal.peer_id, "p2p_failed", "no such peer in the mesh"),
            )
            return
        await tell(target.control, messages.Signal(sender.peer_id, signal.kind, signal.body))

    def report(self, member: Member, report: messages.MeshReport) -> None:
        """Keep the member's report of how it reaches its peers, naming only peers of its
        tenant (here or on another relay): a device cannot make the relay show other
        tenants' ids. Others are dropped without a word: a peer that left the relay may
        still be reached over a direct path. A replaced member's report is dropped, as its
        signals are."""
        if not self._current(member):
            return
        tenant = member.tenant_id
        peers = [
            peer
            for peer in report.peers
            if peer["peer_id"] != member.peer_id
            and (
                self.member(tenant, peer["peer_id"]) is not None
                or self._remote.get(tenant, peer["peer_id"]) is not None
            )
        ]
        member.report, member.reported_at = {"peers": peers}, time.time()

    async def serve_derp(self, member: Member, stream: Stream, early: bytes = b"") -> None:
        """The member's DERP channel: forward its packets to peers of its tenant by key."""
        member.channel = stream
        reader = derp.FrameReader()
        try:
            data = early or await stream.read()
            while data:
                for frame in reader.feed(data):
                    await self._forward(member, frame)
                data = await stream.read()
        finally:
            if member.channel is stream:
                member.channel = None

    def _current(self, member: Member) -> bool:
        """False for a member replaced by a newer session of its device: it speaks no more."""
        return self._tenants.get(member.tenant_id, {}).get(member.peer_id) is member

    async def _forward(self, sender: Member, frame: derp.Frame) -> None:
        if frame.type is not derp.FrameType.SEND_PACKET or not self._current(sender):
            return  # only the relay sends the other kinds; a replaced member speaks no more
        target = next(
            (m for m in self._tenants.get(sender.tenant_id, {}).values() if m.key == frame.key),
            None,
        )
        if target is None and await self._forward_remote(sender, frame):
            return
        received = derp.Frame(derp.FrameType.RECV_PACKET, sender.key, frame.payload)
        if target is None or not await target.deliver(received):
            if target is None:
                self.rejected("unknown_peer", sender.tenant_id, "DERP packet to an unknown key")
            await sender.deliver(derp.Frame(derp.FrameType.PEER_GONE, frame.key))
            return
        self._metrics.derp_bytes.inc(len(frame.payload))

    # ---- the other relays of a cluster ----

    async def _shared(self, operation: str, call: Awaitable[None]) -> None:
        """A change other relays should learn; when the store cannot be reached the mesh
        goes on without them (the store's resync publishes it again)."""
        try:
            await call
        except ServerUnavailable as error:
            log.warning("cluster_degraded", operation=operation, reason=error.message)

    async def _load_remote(self, tenant_id: str) -> None:
        if self._remote.known(tenant_id):
            return
        try:
            devices = await self._cluster.devices(tenant_id)
        except ServerUnavailable as error:  # tried again at the tenant's next join
            log.warning("cluster_degraded", operation="devices", reason=error.message)
            return
        self._remote.load(tenant_id, devices)

    async def _signal_remote(
        self, sender: Member, tenant_id: str, device: Device, signal: messages.Signal
    ) -> None:
        body = {"from": sender.peer_id, "to": signal.peer_id, "kind": signal.kind}
        event = ClusterEvent(
            "signal", tenant_id, {**body, "body": signal.body}, self._cluster.member
        )
        try:
            await self._cluster.send(device.relay, event)
        except ServerUnavailable:
            self.rejected("cluster_unavailable", tenant_id, "signal to a peer on another relay")
            reason = "the peer is on another relay, which cannot be reached now"
            await tell(sender.control, messages.SignalFailed(signal.peer_id, "unavailable", reason))

    async def _forward_remote(self, sender: Member, frame: derp.Frame) -> bool:
        """Send a packet for a device on another relay over the link; False when no device
        of the sender's tenant on another relay has the key."""
        device = self._remote.by_key(sender.tenant_id, frame.key)
        if device is None or self.remote_packets is None:
            return False
        if await self.remote_packets(
            device.relay, sender.tenant_id, sender.key, frame.key, frame.payload
        ):
            self._metrics.derp_bytes.inc(len(frame.payload))
        return True  # a packet the link could not take is dropped, as DERP may

    async def deliver_remote(
        self, tenant_id: str, sender_key: bytes, target_key: bytes, payload: bytes
    ) -> bool:
        """A packet from a device on another relay, for a device here."""
        target = next(
            (m for m in self._tenants.get(tenant_id, {}).values() if m.key == target_key), None
        )
        if target is None:
            return False
        return await target.deliver(derp.Frame(derp.FrameType.RECV_PACKET, sender_key, payload))

    async def on_event(self, event: ClusterEvent) -> None:
        """Another relay's ``joined``, ``left`` or ``signal``."""
        if event.kind == "signal":
            await self._remote_signal(event.tenant_id, event.body)
            return
        if event.kind == "left":
            peer_id = event.body.get("peer_id")
            device = self._remote.left(event.tenant_id, event.sender, str(peer_id))
            if device is not None:
                await self._tell_left(event.tenant_id, device.info)
            return
        info = valid_info(event.body)
        if info is None:
            log.debug("cluster_event_dropped", kind=event.kind, relay=event.sender)
            return
        if event.kind == "joined":
            await self._remote_joined(event.tenant_id, event.sender, info)

    async def _remote_joined(self, tenant_id: str, relay: str, info: dict[str, str]) -> None:
        peers = self._tenants.get(tenant_id)
        if not peers:
            return  # no device of the tenant here: nobody to tell
        here = peers.get(info["peer_id"])
        if here is not None:  # the device's newest session is on another relay now
            del peers[info["peer_id"]]
            reason = "a newer session of this device joined the mesh at another relay"
            await tell(here.control, messages.MeshEvent("replaced", info, reason))
        replaced = self._remote.joined(tenant_id, relay, info)
        previous = here.info if here is not None else replaced.info if replaced else None
        if previous == info:
            return  # published again (a resync): nothing changed
        for event in _rejoined(previous, info):
            await asyncio.gather(*(tell(m.control, event) for m in peers.values()))

    async def _tell_left(self, tenant_id: str, info: dict[str, str]) -> None:
        peers = list(self._tenants.get(tenant_id, {}).values())
        event = messages.MeshEvent("left", info)
        gone = derp.Frame(derp.FrameType.PEER_GONE, base64.b64decode(info["public_key"]))
        await asyncio.gather(
            *(tell(m.control, event) for m in peers), *(m.deliver(gone) for m in peers)
        )

    async def _remote_signal(self, tenant_id: str, body: dict[str, Any]) -> None:
        sender, target_id = body.get("from"), body.get("to")
        kind, payload = body.get("kind"), body.get("body")
        if not (isinstance(sender, str) and isinstance(target_id, str)):
            return
        if not (isinstance(kind, str) and isinstance(payload, dict)):
            return
        target = self._tenants.get(tenant_id, {}).get(target_id)
        if target is not None:
            await tell(target.control, messages.Signal(sender, kind, payload))

    async def relays_gone(self, relays: set[str]) -> None:
        """Relays whose presence lapsed: their devices leave the meshes here."""
        for tenant_id, device in self._remote.gone(relays):
            await self._tell_left(tenant_id, device.info)

    async def resynced(self) -> None:
        """The store is back after an outage: publish this relay's devices again and
        catch up with the joins and leaves missed meanwhile."""
        for member in list(self.members()):
            await self._shared(
                "put_device",
                self._cluster.put_device(member.tenant_id, member.peer_id, member.info),
            )
        for tenant_id in list(self._tenants):
            before = {info["peer_id"]: info for info in self._remote.infos(tenant_id)}
            self._remote.forget(tenant_id)
            await self._load_remote(tenant_id)
            after = {info["peer_id"]: info for info in self._remote.infos(tenant_id)}
            for peer_id, info in before.items():
                if peer_id not in after:
                    await self._tell_left(tenant_id, info)
            for peer_id, info in after.items():
                if before.get(peer_id) != info:
                    event = messages.MeshEvent("joined", info)
                    await asyncio.gather(
                        *(tell(m.control, event) for m in self._tenants.get(tenant_id, {}).values())
                    )

    async def restarting(self) -> None:
        notice = derp.Frame(derp.FrameType.RESTARTING, bytes(derp.KEY_SIZE))
        await asyncio.gather(*(m.deliver(notice) for m in self.members()))

    def rejected(self, reason: str, tenant_id: str, what: str) -> None:
        self._metrics.p2p_rejected.labels(reason).inc()
        log.info("p2p_rejected", tenant_id=tenant_id, reason=reason, detail=what)


def _rejoined(previous: dict[str, str] | None, info: dict[str, str]) -> list[messages.MeshEvent]:
    """What the others are told when a device joins again, its ``previous`` entry still
    held. A new process (a restart: another ``instance``) is a new peer to them: ``left``
    then ``joined``, and they drop what they held for the old one (its QUIC session, its
    paths). The same process back on a new relay session (a reconnection, as after its
    network changed) is only ``joined``: it kept its peer sessions, so they keep theirs;
    told ``left``, one whose direct path was lost with the move would drop its session
    while the device goes on with its own, whose streams then fail."""
    joined = messages.MeshEvent("joined", info)
    if previous is None or (info.get("instance") and previous.get("instance") == info["instance"]):
        return [joined]
    return [messages.MeshEvent("left", previous), joined]


async def tell(control: MessageStream, message: messages.Message) -> None:
    """Send on a session's control stream; a session that is gone or stuck is skipped."""
    with contextlib.suppress(TransportError, TimeoutError):
        await asyncio.wait_for(control.send(message), 1.0)
