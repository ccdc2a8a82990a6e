"""A QUIC session between two peers, carried over whichever path is best right now.

QUIC gives peer tunnels the same reliable, encrypted, multiplexed streams on every path
(direct, STUN, TURN, DERP). aioquic sees one fixed address; underneath, datagrams go out
on the current path and are taken in from every path, so a path change is invisible to
the session and to the tunnels on it (QUIC retransmits what the old path lost).

The controlling peer (the lower peer id) is the QUIC client and pins the other's
certificate, published through the relay; streams start with a ``peer_open`` header whose
proof only the two peers can make.

Where one peer can reach the other over TCP, a TCP+TLS connection (:mod:`.tcp`) carries
new streams instead, on the core's multiplexer; QUIC stays up beside it, and carries new
streams again as soon as that connection ends (its streams are reset). Where QUIC has no
better path than DERP, the same TLS and multiplexer through a relay stream
(:mod:`.relayed`) carries them likewise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aioquic._buffer import Buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from aioquic.tls import load_pem_private_key, load_pem_x509_certificates

from cloudbridge_core.errors import P2PConnectionFailed, TransportClosed, TransportError
from cloudbridge_core.log import get_logger
from cloudbridge_core.p2p.identity import DeviceIdentity, server_name
from cloudbridge_core.p2p.relayed import TICKETED, RelayedLink
from cloudbridge_core.p2p.tcp import TcpLink
from cloudbridge_core.protocol.mux import MuxLimits
from cloudbridge_core.providers import PeerInfo, PeerPath, Stream
from cloudbridge_core.quic.flow import bound
from cloudbridge_core.quic.pmtu import apply_datagram_size, path_payload_size
from cloudbridge_core.quic.session import QuicSession
from cloudbridge_core.transports.mux_session import MuxSession

log = get_logger("p2p.session")

ALPN = "cloudbridge-peer/1"
#: what aioquic believes the peer's address is; the real one belongs to the path
VIRTUAL_ADDRESS = ("192.0.2.1", 9)
#: best first; a path's rank decides which one carries the session
RANK = {"direct": 0, "stun": 1, "turn": 2, "derp": 3}
#: seconds the current path must have been silent before datagrams over another one mean
#: that the peer moved to it
FOLLOW_AFTER = 1.0
#: the carriers on the core multiplexer: a direct TCP connection, a relay stream
TCP = "tcp"
RELAYED = "relay-stream"
#: direct and STUN paths take their datagram size from the kernel's path MTU (as the
#: relay's QUIC does), up to this; the datagrams carry no other header
DIRECT_CEILING = 16384
#: a 1,500-byte MTU after IPv6 and UDP headers (48) and TURN's ChannelData header (4)
TURN_DATAGRAM_SIZE = 1448
#: DERP packets travel sealed (28 bytes more) inside the relay session's stream, so no
#: link MTU applies; larger datagrams mean fewer seals and frames per byte
DERP_DATAGRAM_SIZE = 16384
#: datagrams waiting for a path that sends asynchronously; more are dropped, as a full
#: socket buffer drops them, and QUIC resends
OUTGOING_LIMIT = 2048
FIRST_PING_TIMEOUT = 5.0
#: receive windows (bytes a peer may send before the application reads): the QUIC
#: transport's defaults; credit follows what the application reads (quic/flow.py)
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_STREAMS = 1024
#: the relayed carrier's limits (both peers use the same: a stream's send window is the
#: other side's receive window; the TCP path's are agreed in its handshake, tcp.LIMITS).
#: Through the relay a stream's window spans three processes and four TLS layers: the
#: QUIC session's window keeps it from limiting a stream to 256 KiB per round trip there.
MUX_LIMITS = {RELAYED: MuxLimits(initial_window=STREAM_WINDOW)}

StreamServer = Callable[[Stream], Coroutine[Any, Any, None]]


class _PathTransport(asyncio.DatagramTransport):
    """The transport aioquic writes to: collects what one transmit sends for the session."""

    def __init__(self, session: PeerSession) -> None:
        super().__init__()
        self._session = session

    def sendto(self, data: Any, addr: Any = None) -> None:
        self._session.outgoing(bytes(data))

    def close(self) -> None:
        """The session owns the paths; closing the QUIC side leaves them to it."""

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _PeerQuicSession(QuicSession):
    """The bounded QUIC session of :mod:`cloudbridge_core.quic`, its datagrams handed to
    the peer session's current path in one batch per transmit, sized for that path."""

    def __init__(self, quic: QuicConnection, peer: PeerSession) -> None:
        super().__init__(quic, datagram_ceiling=DIRECT_CEILING)
        self._peer = peer

    def transmit(self) -> None:
        super().transmit()
        self._peer.flush()

    def waits_for_acks(self) -> bool:
        """Whether sent packets are still unacknowledged (aioquic keeps no public count)."""
        return bool(self._quic._loss.bytes_in_flight)

    def path_datagram_size(self) -> int | None:
        return self._peer.datagram_size()

    def send_probe(self) -> None:
        """A probe now, as QUIC sends when its probe timer fires: a PING, which the peer
        acknowledges at once, sent even when the congestion window is full (after losses it
        is), in datagrams of the size every path carries: copies may go over other paths
        (:meth:`PeerSession.probe_dropped`)."""
        apply_datagram_size(self._quic, SMALLEST_MAX_DATAGRAM_SIZE)
        try:
            self._quic._send_probe()  # aioquic's own, for its probe timeout
            self.transmit()
        finally:
            self.fit_datagrams()


class PeerSession:
    def __init__(
        self,
        identity: DeviceIdentity,
        peer: PeerInfo,
        controlling: bool,
        serve: StreamServer,
        idle_timeout: float = 60.0,
    ) -> None:
        self.peer = peer
        self.controlling = controlling
        self._identity = identity
        self._serve = serve
        self._idle_timeout = idle_timeout
        self._paths: dict[str, PeerPath] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self.suspect: set[str] = set()  # paths that stopped delivering
        self._pending: list[bytes] = []
        #: dropped paths that get a copy of what is sent now (:meth:`probe_dropped`)
        self._probing: list[str] = []
        #: when each dropped path was last probed (monotonic)
        self._probed_at: dict[str, float] = {}
        self._sending = asyncio.Event()
        self._sender = asyncio.get_running_loop().create_task(self._send())
        self._tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak refs
        self._protocol: _PeerQuicSession | None = None
        self._connected = asyncio.Event()  # the QUIC session
        #: the QUIC session, or a TCP path, is up
        self._usable = asyncio.Event()
        #: the multiplexed carriers up (:data:`TCP`, :data:`RELAYED`), and their links
        self._muxes: dict[str, tuple[MuxSession, TcpLink]] = {}
        #: when each carrier last ended (the controlling peer then tries again at once)
        self.lost_at: dict[str, float] = {}
        #: the QUIC session's path (the TCP path, when up, is :attr:`path`)
        self.current: str | None = None
        self.last_seen: float | None = None
        #: monotonic times: the last datagram from the peer over each path, and when
        #: :attr:`current` was taken
        self._heard: dict[str, float] = {}
        self._current_since = 0.0
        self.rtt_seconds: float | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.changes: deque[dict[str, Any]] = deque(maxlen=20)
        #: the overlay's packets among the datagrams from the peer (:meth:`carry_overlay`)
        self._overlay: tuple[Callable[[bytes], bool], Callable[[PeerPath, bytes], None]] | None = (
            None
        )

    # ---- paths ----

    @property
    def paths(self) -> list[str]:
        return sorted(self._paths, key=RANK.__getitem__)

    @property
    def endpoint(self) -> str | None:
        """Where the carrying connection goes: the peer's TCP endpoint, ``relay``, or the
        QUIC path's."""
        carrier = self._carrier()
        if carrier is not None:
            return self._muxes[carrier][1].endpoint
        path = self._paths.get(self.current) if self.current else None
        return path.endpoint if path else None

    @property
    def path(self) -> str | None:
        """The path that carries new streams: ``direct`` on a TCP path, ``derp`` through a
        relay stream, else QUIC's."""
        carrier = self._carrier()
        if carrier == TCP:
            return "direct"
        return "derp" if carrier == RELAYED else self.current

    @property
    def protocol(self) -> str | None:
        """What carries new streams: ``tcp``, ``relay-tcp`` or ``relay-stream`` (the
        relayed link's), ``quic``, or None while nothing is up."""
        carrier = self._carrier()
        if carrier is not None:
            link = self._muxes[carrier][1]
            return link.protocol if isinstance(link, RelayedLink) else carrier
        return "quic" if self._connected.is_set() else None

    def has(self, carrier: str) -> bool:
        """Whether the multiplexed ``carrier`` (:data:`TCP`, :data:`RELAYED`) is up."""
        return carrier in self._muxes

    def carried_by(self, carrier: str) -> tuple[MuxSession, TcpLink] | None:
        """The multiplexer and link of ``carrier`` while it is up."""
        return self._muxes.get(carrier)

    def _carrier(self) -> str | None:
        """The multiplexed carrier new streams take: TCP when up; a relay stream unless
        QUIC has a better path than DERP; else none (QUIC)."""
        if TCP in self._muxes:
            return TCP
        quic_better = self._connected.is_set() and self.current not in (None, "derp")
        if RELAYED in self._muxes and not quic_better:
            return RELAYED
        return None

    # ---- the multiplexed carriers ----

    def attach_tcp(self, link: TcpLink) -> None:
        """Carry new streams over ``link`` (a chosen TCP connection), until it ends."""
        self.attach(TCP, link)

    def attach(self, carrier: str, link: TcpLink) -> None:
        """Carry new streams over ``link`` (:data:`TCP` or :data:`RELAYED`), until it ends."""
        old, before = self._muxes.get(carrier), self.path
        link.pipe.count = self._count
        # raw connections through the relay are as new as the TCP path's ALPN: both peers
        # take the limits their handshake agreed on there too
        raw = isinstance(link, RelayedLink) and link.protocol == TICKETED
        limits = link.limits if carrier == TCP or raw else MUX_LIMITS[carrier]
        session = MuxSession(link.pipe, is_dialer=link.dialed, limits=limits)
        self._muxes[carrier] = (session, link)
        if carrier == TCP or self.path != before:  # a relay stream under QUIC's derp: same path
            self._changed(before, self.path, carrier, f"{carrier} path established")
        log.info(
            f"{carrier.replace('-', '_')}_path_up",
            peer=self.peer.name,
            endpoint=link.endpoint,
            dialed=link.dialed,
        )
        self._usable.set()
        self._spawn(self._serve_mux(carrier, session, link))
        if old is not None:
            self._spawn(old[0].aclose())

    def _changed(self, before: str | None, after: str | None, protocol: str, why: str) -> None:
        change = {"at": time.time(), "from": before, "to": after, "reason": why}
        self.changes.append({**change, "protocol": protocol})

    def _count(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        if received:
            self.last_seen = time.time()

    async def _serve_mux(self, carrier: str, session: MuxSession, link: TcpLink) -> None:
        try:
            while True:
                self._spawn(self._serve(await session.accept_stream()))
        except TransportError:  # the connection ended: its streams were reset
            pass
        finally:
            held = self._muxes.get(carrier)
            if held is not None and held[0] is session:
                before = self.path
                del self._muxes[carrier]
                self.lost_at[carrier] = time.time()
                if not self._connected.is_set() and not self._muxes:
                    self._usable.clear()
                if carrier == TCP or self.path != before:
                    why = f"{carrier} path ended"
                    self._changed(before, self.path, self.protocol or "quic", why)
                log.info(f"{carrier.replace('-', '_')}_path_lost", peer=self.peer.name)
            await session.aclose()
            await link.aclose()

    def add_path(self, path: PeerPath) -> None:
        """Take a path a strategy established; the best working one carries the session."""
        old = self._paths.pop(path.kind, None)
        if old is not None:
            self._drop_reader(path.kind)
            self._spawn(old.aclose())
        self._paths[path.kind] = path
        self.suspect.discard(path.kind)
        deliver_to: Callable[[Callable[[bytes], None]], None] | None = getattr(
            path, "deliver_to", None
        )
        if deliver_to is not None:  # no queue and task hop per datagram
            deliver_to(functools.partial(self._received, path))
        self._readers[path.kind] = asyncio.get_running_loop().create_task(self._read(path))
        self._choose(f"{path.kind} path established")
        if self.controlling and self._protocol is None:
            self._start_client()

    def path_failed(self, kind: str, why: str) -> None:
        """The path stopped delivering: move to the next best without dropping the peer."""
        if kind in self._paths and kind not in self.suspect:
            self.suspect.add(kind)
            log.info("path_failed", peer=self.peer.name, path=kind, reason=why)
            self._choose(f"{kind} path failed: {why}")

    def _choose(self, why: str) -> None:
        usable = [k for k in self.paths if k not in self.suspect]
        best = usable[0] if usable else None
        if best == self.current:
            return
        self.changes.append({"at": time.time(), "from": self.current, "to": best, "reason": why})
        log.info("path_selected", peer=self.peer.name, path=best, previous=self.current, reason=why)
        self.current = best
        self._current_since = time.monotonic()
        if self._protocol is not None and self._protocol.handshake is not None:
            self._protocol.fit_datagrams()

    def datagram_size(self) -> int:
        """The datagram size the current path carries (see the constants above)."""
        path = self._paths.get(self.current) if self.current else None
        if path is None:
            return SMALLEST_MAX_DATAGRAM_SIZE
        if path.kind == "turn":
            return TURN_DATAGRAM_SIZE
        if path.kind == "derp":
            return DERP_DATAGRAM_SIZE
        host, _, port = path.endpoint.rpartition(":")
        if not port.isdigit():
            return SMALLEST_MAX_DATAGRAM_SIZE
        return path_payload_size((host.strip("[]"), int(port)), DIRECT_CEILING)

    async def _read(self, path: PeerPath) -> None:
        try:
            while True:
                self._received(path, await path.receive())
        except Exception as error:  # noqa: BLE001 - a plugin's path may fail any way; that ends it only
            if self._paths.get(path.kind) is path:
                self.path_failed(path.kind, str(error) or type(error).__name__)

    def _received(self, path: PeerPath, datagram: bytes) -> None:
        if self._paths.get(path.kind) is not path:
            return  # from a path replaced meanwhile
        self.last_seen = time.time()
        now = self._heard[path.kind] = time.monotonic()
        self.bytes_received += len(datagram)
        if path.kind != self.current:
            self._follow(path.kind, now)
        if self._overlay is not None and self._overlay[0](datagram):
            self._overlay[1](path, datagram)
            return
        self._deliver(datagram)

    # ---- the overlay's packets ----

    def carry_overlay(
        self, carries: Callable[[bytes], bool], receiver: Callable[[PeerPath, bytes], None]
    ) -> None:
        """Hand datagrams from the peer that ``carries`` says are the overlay's to
        ``receiver``, with the path they came over, instead of QUIC (QUIC packets always
        have their fixed bit set, so the two never mistake each other's)."""
        self._overlay = (carries, receiver)

    def send_overlay(self, packet: bytes) -> None:
        """Send one of the overlay's packets over the current path, beside QUIC's."""
        self.outgoing(packet)
        self.flush()

    def datagram_path(self) -> PeerPath | None:
        """The path that carries QUIC's datagrams now (None while there is none)."""
        return self._paths.get(self.current) if self.current else None

    def _silent_since(self, kind: str) -> float:
        """Since when the current path ``kind`` has carried nothing from the peer."""
        return max(self._heard.get(kind, 0.0), self._current_since)

    def _follow(self, kind: str, now: float) -> None:
        """The peer speaks over ``kind``, not over the current path: when that one has been
        silent for :data:`FOLLOW_AFTER`, the peer has moved (it lost the path first, or its
        address changed), and answering over a silent path would answer into nothing; when
        ``kind`` was probed (:meth:`probe_dropped`) less than that ago and the current path
        has carried nothing since, the peer answered: the path carries both ways again.
        While the current path delivers, datagrams over another one change nothing (no
        flapping): a better path then comes back only through a new attempt."""
        current = self.current
        probed = self._probed_at.get(kind)
        answered = (
            probed is not None
            and now - probed < FOLLOW_AFTER
            and self._heard.get(current or "", 0.0) < probed
        )
        if (
            not answered
            and current is not None
            and now - self._silent_since(current) < FOLLOW_AFTER
        ):
            return
        self.suspect.discard(kind)
        if current is not None and RANK[kind] > RANK[current]:
            self.suspect.add(current)  # else the better path is chosen over it anyway
            log.info(
                "path_failed", peer=self.peer.name, path=current, reason=f"the peer moved to {kind}"
            )
        self._choose(f"the peer speaks over {kind}")

    def check_stalled(self, after: float) -> str | None:
        """Fail the current path when it has been silent for ``after`` seconds while QUIC
        waits for acknowledgements: a path that dies under a transfer is found in about
        that time, not at the next heartbeat (QUIC then resends over the next best path).
        An idle session is left to the heartbeats. Returns the path failed, if one was."""
        kind, protocol = self.current, self._protocol
        if kind is None or protocol is None or not protocol.waits_for_acks():
            return None
        silent = time.monotonic() - self._silent_since(kind)
        if silent < after:
            return None
        self.path_failed(kind, f"silent for {silent:.1f}s with data unacknowledged")
        return kind

    def probe_dropped(self) -> list[str]:
        """While QUIC waits for acknowledgements and nothing has come from the peer over any
        path for :data:`FOLLOW_AFTER`, and a dropped path that sends without waiting (direct,
        STUN) is left, send a QUIC probe over the current path (if any) and a copy over each
        such dropped path (QUIC's own probes cover the current path alone); the manager
        calls this about once a second. Returns the dropped paths probed.

        Why: a NAT that forgot its mappings (it rebooted; they expired) lets nothing in to
        its host until that host sends. A peer that was only answering sends nothing, and
        its relay session too stays deaf until its next health check (up to 30 s), so
        neither DERP nor the signalling of a new attempt reaches it. Its direct path opens
        again at its next ICE consent check (every 4-6 s), and only a packet sent over that
        path finds out: the peer answers it there, and :meth:`_follow` takes the path back.
        """
        protocol = self._protocol
        if protocol is None or not self._connected.is_set() or not protocol.waits_for_acks():
            return []
        now = time.monotonic()
        if now - max(self._heard.values(), default=0.0) < FOLLOW_AFTER:
            return []
        dropped = [
            kind
            for kind in self.paths
            if kind in self.suspect and callable(getattr(self._paths[kind], "send_batch", None))
        ]
        if dropped:
            self._probing = dropped
            try:
                protocol.send_probe()
            finally:
                self._probing = []
            self._probed_at.update(dict.fromkeys(dropped, now))
        return dropped

    def _deliver(self, datagram: bytes) -> None:
        if self._protocol is None:
            if self.controlling or not _is_initial(datagram):
                return
            self._start_server(datagram)
        assert self._protocol is not None
        self._protocol.datagram_received(datagram, VIRTUAL_ADDRESS)

    def outgoing(self, datagram: bytes) -> None:
        """Take a datagram of the transmit under way; :meth:`flush` sends them all."""
        if len(self._pending) < OUTGOING_LIMIT:
            self._pending.append(datagram)

    def flush(self) -> None:
        """Hand what the last transmit produced to the current path: at once to a path
        that sends without waiting (``send_batch``), else to the sender task."""
        if not self._pending:
            return
        for kind in self._probing:  # copies: a dropped path that fails stays dropped
            with contextlib.suppress(Exception):
                self._paths[kind].send_batch(self._pending)  # type: ignore[attr-defined]
                self.bytes_sent += sum(map(len, self._pending))
        path = self._paths.get(self.current) if self.current else None
        if path is None:
            self._pending.clear()  # no path: lost, as on a network that is down
            return
        send_batch: Callable[[Sequence[bytes]], None] | None = getattr(path, "send_batch", None)
        if send_batch is None:
            self._sending.set()
            return
        batch, self._pending = self._pending, []
        try:
            send_batch(batch)
        except Exception as error:  # noqa: BLE001 - a plugin's path may fail any way; that ends it only
            self.path_failed(path.kind, str(error) or type(error).__name__)
            return
        self.bytes_sent += sum(map(len, batch))

    async def _send(self) -> None:
        """Send for paths whose ``send`` waits (TURN, DERP), a batch at a time, in order."""
        while True:
            await self._sending.wait()
            self._sending.clear()
            batch, self._pending = self._pending, []
            kind = self.current
            path = self._paths.get(kind) if kind else None
            if path is None:
                continue
            try:
                for datagram in batch:
                    await path.send(datagram)
                    self.bytes_sent += len(datagram)
            except Exception as error:  # noqa: BLE001 - a plugin's path may fail any way; that ends it only
                self.path_failed(path.kind, str(error) or type(error).__name__)

    # ---- QUIC ----

    def _configuration(self) -> QuicConfiguration:
        return QuicConfiguration(
            is_client=self.controlling,
            alpn_protocols=[ALPN],
            idle_timeout=self._idle_timeout,
            max_data=CONNECTION_WINDOW,
            max_stream_data=STREAM_WINDOW,
            server_name=server_name(self.peer.peer_id) if self.controlling else None,
            congestion_control_algorithm="cubic",
        )

    def _start_client(self) -> None:
        configuration = self._configuration()
        configuration.cadata = self.peer.certificate.encode()
        protocol = self._adopt(QuicConnection(configuration=configuration))
        protocol.connect(VIRTUAL_ADDRESS)

    def _start_server(self, initial: bytes) -> None:
        configuration = self._configuration()
        certificate, *chain = load_pem_x509_certificates(self._identity.server.certificate)
        configuration.certificate = certificate
        configuration.certificate_chain = [
            *chain,
            *load_pem_x509_certificates(self._identity.ca.certificate),
        ]
        configuration.private_key = load_pem_private_key(self._identity.server.key)
        header = pull_quic_header(Buffer(data=initial), host_cid_length=8)
        self._adopt(
            QuicConnection(
                configuration=configuration,
                original_destination_connection_id=header.destination_cid,
            )
        )

    def _adopt(self, connection: QuicConnection) -> _PeerQuicSession:
        bounded = bound(
            connection,
            stream_window=STREAM_WINDOW,
            connection_window=CONNECTION_WINDOW,
            max_streams=MAX_STREAMS,
        )
        protocol = _PeerQuicSession(bounded, self)
        protocol.connection_made(_PathTransport(self))
        self._protocol = protocol
        self._spawn(self._until_connected(protocol))
        self._spawn(self._accept(protocol))
        return protocol

    async def _until_connected(self, protocol: _PeerQuicSession) -> None:
        try:
            await protocol.wait_connected()
        except ConnectionError:
            return  # the session ended before its handshake did
        self._connected.set()
        self._usable.set()
        log.info("peer_connected", peer=self.peer.name, path=self.current)
        # status shows an RTT from the start; a session that ends meanwhile has none to show
        with contextlib.suppress(P2PConnectionFailed, TransportError, ConnectionError):
            await self.ping(FIRST_PING_TIMEOUT)

    async def _accept(self, protocol: _PeerQuicSession) -> None:
        with contextlib.suppress(TransportError):  # the session ended
            while True:
                self._spawn(self._serve(await protocol.accept_stream()))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_connected(self, within: float) -> None:
        try:
            await asyncio.wait_for(self._usable.wait(), within)
        except TimeoutError:
            paths = ", ".join(self.paths) or "none yet"
            raise P2PConnectionFailed(
                f"no session with {self.peer.name} within {within:g}s (paths: {paths})"
            ) from None

    async def wait_quic(self, within: float) -> None:
        """Until the QUIC session is up (a multiplexed carrier may be up before it)."""
        try:
            await asyncio.wait_for(self._connected.wait(), within)
        except TimeoutError:
            raise P2PConnectionFailed(
                f"no QUIC session with {self.peer.name} within {within:g}s"
            ) from None

    @property
    def connected(self) -> bool:
        """The QUIC session or a multiplexed carrier is up."""
        return self._usable.is_set()

    async def open_stream(self) -> Stream:
        """A new stream to the peer, on the multiplexed carrier when one is up (see
        :meth:`_carrier`); raises ``TransportClosed`` once the session has ended."""
        carrier = self._carrier()
        mux = self._muxes[carrier][0] if carrier is not None else None
        if mux is not None and not mux.is_closed:
            with contextlib.suppress(TransportClosed):  # it ended meanwhile: QUIC then
                return await mux.open_stream()
        if self._protocol is None:
            raise TransportClosed(f"no session with {self.peer.name}")
        return await self._protocol.open_stream()

    async def ping(self, within: float) -> float:
        """The round-trip time over the current path; a silent path is marked failed."""
        if self._protocol is None or not self._connected.is_set():
            raise P2PConnectionFailed(f"no QUIC session with {self.peer.name} yet")
        kind = self.current
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self._protocol.ping(), within)
        except TimeoutError:
            if kind is not None:
                self.path_failed(kind, f"no answer in {within:g}s")
            raise P2PConnectionFailed(f"{self.peer.name} did not answer in {within:g}s") from None
        self.rtt_seconds = time.perf_counter() - started
        return self.rtt_seconds

    def transmit(self) -> None:
        """Flush what aioquic holds (after a path change, so resends go out at once)."""
        if self._protocol is not None:
            self._protocol.transmit()

    async def aclose(self) -> None:
        """Close the TCP path and the QUIC connection (their streams fail: their pumps
        reset their sockets), then the paths. Its tasks end even if this is cancelled
        meanwhile (a manager closing while a dropped peer's session closes)."""
        try:
            for mux, link in list(self._muxes.values()):
                await mux.aclose()
                await link.aclose()
            if self._protocol is not None:
                await self._protocol.aclose()
        finally:
            self._sender.cancel()
            for kind in list(self._readers):
                self._drop_reader(kind)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(self._sender, *self._tasks, return_exceptions=True)
            for path in self._paths.values():
                with contextlib.suppress(Exception):
                    await path.aclose()
            self._paths.clear()

    def _drop_reader(self, kind: str) -> None:
        reader = self._readers.pop(kind, None)
        if reader is not None:
            reader.cancel()


def _is_initial(datagram: bytes) -> bool:
    try:
        header = pull_quic_header(Buffer(data=datagram), host_cid_length=8)
    except ValueError:
        return False
    return header.packet_type == QuicPacketType.INITIAL
