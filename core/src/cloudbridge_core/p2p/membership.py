"""This device in its tenant's mesh, through the relay link: joined again after every
reconnection, refreshed every ``p2p.peer_discovery_interval``, signals in and out.

Each join proves the device holds its key (it answers the session's ``mesh_challenge``).
When another process with the same device key joins, the relay tells this one it was
replaced; it says so and stops, rather than silently taking turns with the other.

A relay with ``server.turn`` sends a member its TURN credentials just before the peer list
that answers its join: once joined on a session, the session has them or the relay issues
none.

With an ``overlay_key`` (the device's WireGuard public key), every join also asks for the
device's overlay address; each peer list says what the relay leased it (``overlay``).

With a ``reporter`` (each peer as ``PeerManager.explain`` documents it), a joined device
tells its relay how it reaches its peers (``mesh_report``, ``p2p/report.py``): within about
:data:`REPORT_SETTLE` of a peer's path changing, and every :data:`REPORT_INTERVAL` when
anything else changed (bytes, a failed attempt) or :data:`REPORT_REPEAT` passed; again at
once on each new relay session, whose relay knows nothing yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.errors import (
    CloudBridgeError,
    P2PConnectionFailed,
    TransportError,
    error_for_code,
)
from cloudbridge_core.log import get_logger
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.report import mesh_report
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import PeerInfo, Stream
from cloudbridge_core.wire import MessageStream

log = get_logger("p2p.mesh")

#: how long a request for TURN credentials waits for the relay to answer the join on the
#: current session (right after a start or a reconnection)
TURN_CREDENTIALS_WAIT = 2.0
#: how often a joined device looks whether a peer's path changed, to report it
REPORT_SETTLE = 1.0
#: how often it reports what else changed (counters, attempts)
REPORT_INTERVAL = 10.0
#: how often it reports the same again, for a relay that may have lost it
REPORT_REPEAT = 30.0

PeersListener = Callable[[dict[str, PeerInfo]], None]
SignalListener = Callable[[str, str, Mapping[str, Any]], None]
Reporter = Callable[[], list[dict[str, Any]]]


def peer_info(entry: Mapping[str, str]) -> PeerInfo:
    return PeerInfo(
        peer_id=entry["peer_id"],
        name=entry["name"],
        public_key=entry["public_key"],
        certificate=entry["certificate"],
        instance=entry.get("instance", ""),
        overlay_ip=entry.get("overlay_ip", ""),
        overlay_key=entry.get("overlay_key", ""),
    )


class Membership:
    def __init__(
        self,
        link: RelayLink,
        identity: DeviceIdentity,
        name: str,
        on_peers: PeersListener,
        on_signal: SignalListener,
        *,
        overlay_key: str = "",
        reporter: Reporter | None = None,
    ) -> None:
        self._link = link
        self._identity = identity
        self.name = name
        self._on_peers = on_peers
        self._on_signal = on_signal
        #: this device's WireGuard public key, sent with every join; empty: no overlay
        self.overlay_key = overlay_key
        #: the relay's answer to it in the last peer list: ``{"address", "pool"}``, or
        #: ``{"error"}`` when it leased none; empty without an overlay key
        self.overlay: dict[str, str] = {}
        self.peers: dict[str, PeerInfo] = {}
        self.peer_id = identity.peer_id
        #: this process, as peers tell a relay reconnection (same) from a restart (new)
        self.instance = secrets.token_urlsafe(12)
        self._joined = asyncio.Event()
        #: the session whose relay last answered a join with the peer list, and its signal
        self._joined_on: RelayConnection | None = None
        #: when a relay session first answered a join (the start, each reconnection): what
        #: was signalled before went over a session that may have been dead already
        self.joined_at = 0.0
        self._answered = asyncio.Event()
        self._refused: CloudBridgeError | None = None
        #: why the relay gave this device's place to another process, once it has
        self.replaced: str | None = None
        self._within = 10.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._reporter = reporter

    async def start(self, within: float) -> None:
        """Join; raises the relay's refusal (a token without ``p2p:mesh``) or a timeout."""
        self._within = within
        self._link.on_switch.append(lambda *_: self._spawn(self._join(self._link.current)))
        await self._join(self._link.current)
        try:
            await asyncio.wait_for(self._joined.wait(), within)
        except TimeoutError:
            raise P2PConnectionFailed(
                f"the relay did not answer mesh_join in {within:g}s"
            ) from None
        if self._refused is not None:
            raise self._refused
        if self._reporter is not None:
            self._spawn(self._report(self._reporter))

    async def turn_credentials(self) -> messages.TurnCredentials | None:
        """The current session's latest TURN credentials unless expired; None when its relay
        issues none. Waits (``TURN_CREDENTIALS_WAIT`` at most) for the relay to answer the
        join on a session that has not yet, as after a reconnection."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TURN_CREDENTIALS_WAIT):
                while self._joined_on is not self._link.current:
                    self._answered.clear()
                    await self._answered.wait()
        issued = self._link.current.turn_credentials
        if issued is None or issued.expires_at <= time.time():
            return None
        return issued

    def overlay_addresses(self) -> set[str]:
        """The tenant's overlay addresses this device knows: its own and its peers'."""
        found = {peer.overlay_ip for peer in self.peers.values() if peer.overlay_ip}
        if self.overlay.get("address"):
            found.add(self.overlay["address"])
        return found

    async def refresh(self) -> None:
        with contextlib.suppress(TransportError):
            await self._link.current.control.send(messages.MeshRefresh())

    async def send_signal(self, peer_id: str, kind: str, body: Mapping[str, Any]) -> None:
        await self._link.current.control.send(messages.Signal(peer_id, kind, dict(body)))

    async def open_relay_stream(self, target: str) -> Stream:
        stream = await self._link.current.session.open_stream()
        header = MessageStream(stream)
        await header.send(messages.Open(target))
        reply = await header.expect(messages.Accept, messages.Reject)
        if isinstance(reply, messages.Reject):
            await stream.aclose()
            raise error_for_code(reply.code, reply.message)
        return stream

    async def open_splice(self, peer_id: str, attempt: int) -> tuple[Stream, bytes]:
        """A stream the relay joins to the one ``peer_id`` opens for the same ``attempt``,
        and the first bytes from it; raises the relay's refusal, or ``TransportClosed`` /
        ``ProtocolViolation`` from a relay that does not know ``peer_splice``."""
        stream = await self._link.current.session.open_stream()
        header = MessageStream(stream)
        try:
            await header.send(messages.PeerSplice(peer_id, attempt))
            reply = await header.expect(messages.Accept, messages.Reject)
        except BaseException:
            await stream.reset()
            raise
        if isinstance(reply, messages.Reject):
            await stream.aclose()
            raise error_for_code(reply.code, reply.message)
        return stream, header.take_buffered()

    async def ticket(self, peer_id: str, attempt: int) -> tuple[messages.Ticket, str | None]:
        """A ticket for a raw connection to the relay joined to ``peer_id``'s for
        ``attempt``, and the address the relay session reached (None where its transport
        does not say); raises the relay's refusal, or ``TransportClosed`` /
        ``ProtocolViolation`` from a relay that does not know ``peer_ticket``."""
        session = self._link.current.session
        stream = await session.open_stream()
        header = MessageStream(stream)
        try:
            await header.send(messages.PeerTicket(peer_id, attempt))
            reply = await header.expect(messages.Ticket, messages.Reject)
        except BaseException:
            await stream.reset()
            raise
        await stream.aclose()  # the answer is all it carries
        if isinstance(reply, messages.Reject):
            raise error_for_code(reply.code, reply.message)
        assert isinstance(reply, messages.Ticket)  # what expect() lets through
        address = getattr(session, "peer_address", None)
        return reply, address if isinstance(address, str) else None

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _report(self, reporter: Reporter) -> None:
        """Report to each relay session this device joined on (see the module's doc)."""
        sent: messages.MeshReport | None = None
        sent_on: RelayConnection | None = None
        sent_paths: list[tuple[Any, ...]] = []
        sent_at = checked_at = 0.0
        while True:
            await asyncio.sleep(REPORT_SETTLE)
            connection = self._joined_on
            if connection is None or connection is not self._link.current or self.replaced:
                continue  # not joined on this session (yet): its relay would ignore it
            if messages.MESH_REPORT not in (connection.welcome.capabilities or ()):
                continue  # an older relay, which would end the session on a report
            peers = reporter()
            paths = [_path_of(peer) for peer in peers]
            now = time.monotonic()
            fresh = connection is not sent_on
            if not fresh and paths == sent_paths and now - checked_at < REPORT_INTERVAL:
                continue
            checked_at = now
            report = mesh_report(peers)
            if not fresh and report == sent and now - sent_at < REPORT_REPEAT:
                continue
            try:
                await connection.control.send(report)
            except TransportError:
                continue  # the session is going: the next one gets a report of its own
            sent, sent_on, sent_paths, sent_at = report, connection, paths, now

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _join(self, connection: RelayConnection) -> None:
        if self.replaced is not None:
            return  # another process holds this device's place: it stays there
        connection.on_message = functools.partial(self._received, connection)
        certificate = self._identity.ca.certificate.decode()
        request = messages.MeshJoin(
            self.name,
            self._identity.public_key,
            certificate,
            self.instance,
            overlay_key=self.overlay_key or None,
        )
        try:
            challenge = await connection.mesh_challenge(self._within)
            await connection.control.send(self._identity.prove_join(challenge, request))
        except CloudBridgeError as error:  # start() reports the missing answer; a rejoin retries
            log.warning("mesh_join_not_sent", code=error.code, reason=error.message)

    def _received(self, connection: RelayConnection, message: messages.Message) -> None:
        if isinstance(message, messages.MeshPeers):
            self.peers = {p["peer_id"]: peer_info(p) for p in message.peers}
            overlay = dict(message.overlay or {})
            if "error" in overlay and overlay != self.overlay:
                log.warning("overlay_address_refused", reason=overlay["error"])
            self.overlay = overlay
            if self._joined_on is not connection:  # not a refresh's answer
                self.joined_at = time.time()
            self._joined.set()
            self._joined_on = connection
            self._answered.set()
            self._on_peers(self.peers)
        elif isinstance(message, messages.MeshEvent) and message.event == "replaced":
            if message.peer.get("instance") == self.instance:
                return  # this process's own newer session (a reconnection): nothing lost
            self.replaced = message.reason or "replaced by a newer session of this device"
            log.error(
                "mesh_replaced",
                peer_id=self.peer_id,
                reason=self.replaced,
                hint="another process uses this device's key; stop one of them",
            )
            self.peers = {}
            self._on_peers(self.peers)
        elif isinstance(message, messages.MeshEvent):
            peer = peer_info(message.peer)
            if message.event == "joined":
                self.peers[peer.peer_id] = peer
            else:
                self.peers.pop(peer.peer_id, None)
            log.info(f"peer_{message.event}", peer=peer.name, peer_id=peer.peer_id)
            self._on_peers(self.peers)
        elif isinstance(message, messages.Signal):
            self._on_signal(message.peer_id, message.kind, message.body)
        elif isinstance(message, messages.SignalFailed):
            log.info("signal_failed", peer_id=message.peer_id, reason=message.message)
        elif isinstance(message, messages.ErrorMessage):
            self._refused = error_for_code(message.code, message.message)
            log.error("mesh_refused", code=message.code, reason=message.message)
            self._joined.set()


def _path_of(peer: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a change of ``peer``'s path changes in its ``explain`` document."""
    changes = peer.get("path_changes") or [{}]
    return (peer.get("peer_id"), peer.get("path"), changes[-1].get("at"))
