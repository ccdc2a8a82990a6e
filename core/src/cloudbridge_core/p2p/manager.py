"""The peers of this device: a QUIC session with each, over the best path the NAT
strategies found, kept up (heartbeats, fallback) and upgraded (retrying better paths);
and, where one of the two can reach the other over TCP, a TCP path that carries their
streams while it lasts (:mod:`cloudbridge_core.p2p.tcp`; not in ``relay-only`` mode);
where DERP is a strategy, the same TLS and multiplexer through a relay stream
(:mod:`cloudbridge_core.p2p.relayed`), which carries them while QUIC has no better path.

The controlling peer of a pair (the lower peer id) starts every attempt: it sends
``begin`` for attempt N of a strategy (or of the TCP path, kind ``tcp``, or of the
relayed stream, kind ``relay-stream``), and both sides
then run it with the signalling of attempt N. The other side only follows, so the two
never race; when it loses its path it asks for attempts (:data:`RETRY`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.client.opening import OpeningStream
from cloudbridge_core.config import Config
from cloudbridge_core.errors import CloudBridgeError, P2PConnectionFailed
from cloudbridge_core.log import get_logger
from cloudbridge_core.p2p.channel import AttemptChannel
from cloudbridge_core.p2p.identity import DeviceIdentity
from cloudbridge_core.p2p.membership import Membership
from cloudbridge_core.p2p.metrics import P2PMetrics
from cloudbridge_core.p2p.relayed import KIND as RELAYED
from cloudbridge_core.p2p.relayed import RelayedConnector
from cloudbridge_core.p2p.session import RANK, PeerSession
from cloudbridge_core.p2p.setup import MODES
from cloudbridge_core.p2p.streams import (
    accept_peer_stream,
    open_peer_stream,
    open_peer_stream_at_once,
)
from cloudbridge_core.p2p.tcp import KIND as TCP
from cloudbridge_core.p2p.tcp import PeerTcpListener, TcpAttempt, TcpLink
from cloudbridge_core.plugins import Plugins
from cloudbridge_core.providers import NatStrategy, PeerInfo, Stream
from cloudbridge_core.settings import P2PSettings

log = get_logger("p2p")

#: one attempt of one strategy: ICE checks, TURN allocation, DERP channel
ATTEMPT_TIMEOUT = 15.0
#: while no path works at all, attempts are retried this often
RETRY_WHEN_DOWN = 2.0
#: seconds a path may stay silent while data waits for acknowledgement (QUIC acknowledges
#: within 25 ms of a packet, and probes when it hears nothing: silence this long is a path
#: that stopped carrying, on any path this mesh uses)
STALL_AFTER = 2.0
#: the least an upgrade attempt is given, however short the upgrade interval (hole
#: punching took 0.7-1.4 s between the NAT tests' namespaces)
UPGRADE_ATTEMPT_FLOOR = 5.0
#: failed TCP path attempts retried as quickly as paths are while none works
TCP_QUICK_RETRIES = 2
#: the signal by which the peer that only follows asks the controlling one for attempts
#: now: it lost its path, which the other may still believe works (its address changed,
#: so the other's direct path points at the old one, and its DERP path went with its
#: relay session); the controlling peer would otherwise notice only when it next sends,
#: at its next heartbeat (30 s by default). Older peers ignore it.
RETRY = "retry"
#: seconds a peer gone from the relay's list keeps its session, though only the relay
#: carried it: a device whose relay session was cut (roaming) is told ``left`` when the
#: relay sees that session end, and joins again on a new one as the same process, with its
#: peer sessions kept; dropped here meanwhile, its streams on this one would fail
REJOIN_GRACE = 10.0
#: what a reload changes for what follows; the others need a restart (x-restart-required)
LIVE_SETTINGS = (
    "expose",
    "heartbeat_interval",
    "heartbeat_timeout",
    "peer_discovery_interval",
    "max_connections",
    "upgrade_interval",
)


@dataclass
class Attempt:
    strategy: str
    number: int
    state: str = "trying"  # trying | established | failed
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "attempt": self.number,
            "state": self.state,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "error": self.error,
            "details": self.details,
        }


@dataclass(eq=False)
class PeerState:
    info: PeerInfo
    session: PeerSession
    controlling: bool
    attempts: dict[str, Attempt] = field(default_factory=dict)
    channels: dict[tuple[str, int], AttemptChannel] = field(default_factory=dict)
    numbers: int = 0
    #: the TCP path attempt under way, which takes the connections the peer dials
    tcp_attempt: TcpAttempt | None = None
    #: attempts of a multiplexed carrier (``tcp``, ``relay-stream``) failed in a row
    failures: dict[str, int] = field(default_factory=dict)
    #: the session's path at the last look (:meth:`PeerManager._ask_when_worse`)
    held: str | None = None
    #: on the side that only follows, since when it asks for attempts (:data:`RETRY`),
    #: None once one began; when it last asked, and why
    asking_since: float | None = None
    asked_at: float = 0.0
    asked_for: str = ""
    #: why each strategy last failed, as logged: the same reason again is logged at debug
    #: (a strategy that cannot work here fails alike at every upgrade round, forever)
    reported: dict[str, str] = field(default_factory=dict)
    #: since when (monotonic) the peer is missing from the relay's list, None while listed
    gone_since: float | None = None

    @property
    def key(self) -> bytes:
        return base64.b64decode(self.info.public_key)


class PeerManager:
    """The mesh as this device sees it. ``expose`` is the set of local ports peers may
    reach (``p2p.expose``); :meth:`apply` takes a reloaded ``p2p`` section.
    ``overlay_key`` (this device's overlay public key) asks the relay for an overlay
    address at each join.
    ``tcp_addresses`` are the addresses peers are told to dial for the TCP path (default:
    this machine's, as ICE offers them); ``tcp`` turns that path on or off (default: on
    unless ``relay-only``); ``relayed`` the relayed stream (default: on where DERP is one
    of the strategies)."""

    def __init__(
        self,
        config: Config,
        plugins: Plugins,
        link: RelayLink,
        identity: DeviceIdentity,
        expose: set[int],
        mode: str = "p2p-first",
        metrics: P2PMetrics | None = None,
        tcp_addresses: Sequence[str] | None = None,
        tcp: bool | None = None,
        relayed: bool | None = None,
        overlay_key: str = "",
    ) -> None:
        self._connect_timeout = config.settings.relay.connect_timeout
        self._identity = identity
        self._expose = expose
        #: the ``p2p`` section in force: a reload replaces it (:meth:`apply`)
        self.settings = config.settings.p2p
        self.metrics = metrics
        self.strategies = _strategies(config, plugins, mode)
        name = self.settings.name or socket.gethostname()
        self._link = link
        self.membership = Membership(
            link,
            identity,
            name,
            self._peers_changed,
            self._signalled,
            overlay_key=overlay_key,
            reporter=self.explained,
        )
        self._relayed = RelayedConnector(self.membership, identity)
        self.peers: dict[str, PeerState] = {}
        #: peers whose heartbeat is under way (one at a time each)
        self._beating: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: dropped peers' sessions closing: waited for, never cancelled, by :meth:`aclose`
        #: (a close cancelled before it started would leave the session's tasks running)
        self._closing: set[asyncio.Task[None]] = set()
        #: set by :meth:`aclose`: membership events that arrive while it runs start nothing
        #: (a peer added then would keep its session's tasks running after the close)
        self._closed = False
        #: wakes the keep-up loop before its next second (a relay session joined again)
        self._nudge = asyncio.Event()
        self._tcp_enabled = mode != "relay-only" if tcp is None else tcp
        derp = any(name == "derp" for name, _ in self.strategies)
        self._relayed_enabled = derp if relayed is None else relayed
        self.tcp_listener: PeerTcpListener | None = None
        if self._tcp_enabled:
            self.tcp_listener = PeerTcpListener(
                identity,
                lambda: [state.info for state in self.peers.values()],
                self._tcp_verified,
                tcp_addresses,
            )

    async def start(self) -> None:
        if self.tcp_listener is not None:
            try:
                await self.tcp_listener.start()
            except OSError as error:  # peers may still reach it by its own dials
                log.warning("peer_tcp_not_listening", reason=error.strerror or str(error))
                self.tcp_listener = None
        await self.membership.start(self._connect_timeout)
        self._spawn(self._keep_up())
        self._spawn(self._discover())

    def follow(self, config: Config) -> list[str]:
        """A reload subscriber: :meth:`apply` with the new config's ``p2p`` section."""
        return self.apply(config.settings.p2p)

    def apply(self, settings: P2PSettings) -> list[str]:
        """Take a reloaded ``p2p`` section; returns the keys applied.

        A port removed from ``expose`` is refused to new peer streams at once (open ones
        go on), an added one is served; intervals, timeouts and ``max_connections`` hold
        for what follows. The other keys (name, fallback, ICE servers) need a restart.
        """
        applied = [
            f"p2p.{f.name}"
            for f in fields(settings)
            if f.name in LIVE_SETTINGS
            and getattr(settings, f.name) != getattr(self.settings, f.name)
        ]
        if settings.expose != self.settings.expose:
            self._expose = set(settings.expose)
            log.info("expose_changed", expose=sorted(self._expose))
        self.settings = settings
        return applied

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)
        await asyncio.gather(*(p.session.aclose() for p in self.peers.values()))
        self.peers.clear()
        if self.tcp_listener is not None:
            await self.tcp_listener.aclose()
        await self.membership.aclose()

    # ---- what the rest of the client uses ----

    def find(self, name: str) -> PeerState:
        for state in self.peers.values():
            if name in (state.info.name, state.info.peer_id):
                return state
        known = ", ".join(sorted(p.info.name for p in self.peers.values())) or "none"
        raise P2PConnectionFailed(f"no peer named {name!r} in the mesh (peers: {known})")

    async def open(self, name: str, port: int, within: float) -> tuple[Stream, bytes]:
        """A stream to ``port`` exposed by the peer ``name``, over its best path, and the
        first bytes from the peer's target (see :func:`open_peer_stream`)."""
        state = self.find(name)
        await state.session.wait_connected(within)
        return await open_peer_stream(
            state.session, port, self._identity.proof_for(state.key), within
        )

    async def open_at_once(
        self, name: str, port: int, first: bytes, accepted: Callable[[], None], within: float
    ) -> OpeningStream:
        """A stream to ``port`` exposed by the peer ``name``, over its best path, carrying
        ``first`` without waiting for the peer's answer (see
        :func:`open_peer_stream_at_once`); ``within`` bounds the wait for a session."""
        state = self.find(name)
        if not state.session.connected:  # a task and a timer per stream otherwise
            await state.session.wait_connected(within)
        proof = self._identity.proof_for(state.key)
        return await open_peer_stream_at_once(state.session, port, proof, first, accepted)

    async def ping(self, name: str, within: float) -> dict[str, Any]:
        state = self.find(name)
        await state.session.wait_quic(within)  # the relayed stream may carry before it
        rtt = await state.session.ping(within)
        # measured over the QUIC session, which stays up beside a TCP path
        return {
            "peer": state.info.name,
            "path": state.session.current,
            "protocol": "quic",
            "rtt_seconds": rtt,
            "rtt_ms": rtt * 1000,  # the same, deprecated: JSON says seconds
        }

    def status(self) -> list[dict[str, Any]]:
        return [self._document(state) for state in self.peers.values()]

    def explain(self, name: str) -> dict[str, Any]:
        """Why a peer is on the path it is on: each strategy's last attempt and what's next."""
        return self._explain(self.find(name))

    def explained(self) -> list[dict[str, Any]]:
        """Every peer as :meth:`explain` documents it (what the relay is told)."""
        return [self._explain(state) for state in self.peers.values()]

    def _explain(self, state: PeerState) -> dict[str, Any]:
        session = state.session
        direct = session.path in ("direct", "stun")
        return {
            **self._document(state),
            "controlling": state.controlling,
            "attempts": [a.document() for a in state.attempts.values()],
            "path_changes": list(session.changes),
            "next_retry_in_seconds": None if direct else self._next_retry(state),
            "summary": _summary(state),
        }

    # ---- membership ----

    def _peers_changed(self, peers: Mapping[str, PeerInfo]) -> None:
        if self._closed:
            return
        self._drop_departed(peers)
        limit = self.settings.max_connections
        for peer_id, info in peers.items():
            known = self.peers.get(peer_id)
            if known is not None and known.info.instance != info.instance:
                self._drop(peer_id)  # the peer restarted: its old session is gone
            elif known is not None or peer_id == self.membership.peer_id:
                continue
            if len(self.peers) >= limit:
                log.warning("peer_limit_reached", peer=info.name, limit=limit)
                continue
            self._add(info)
        self._nudge.set()  # after a rejoin, what the dead session lost is retried now

    def _drop_departed(self, listed: Mapping[str, PeerInfo]) -> None:
        """Drop the peers missing from the relay's ``listed`` ones for
        :data:`REJOIN_GRACE` whose session no path without the relay carries (a peer in
        the list again, with the same ``instance``, is the same process: it kept its
        session, so it keeps it here too)."""
        now = time.monotonic()
        for peer_id, state in list(self.peers.items()):
            if peer_id in listed:
                state.gone_since = None
                continue
            if state.gone_since is None:
                state.gone_since = now
            if now - state.gone_since >= REJOIN_GRACE and not _holds_without_relay(state):
                self._drop(peer_id)

    def _drop(self, peer_id: str) -> None:
        state = self.peers.pop(peer_id)
        log.info("peer_removed", peer=state.info.name, peer_id=peer_id)
        closing = asyncio.get_running_loop().create_task(state.session.aclose())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def _add(self, info: PeerInfo) -> PeerState:
        controlling = self.membership.peer_id < info.peer_id
        state_ref: list[PeerState] = []

        async def serve(stream: Stream) -> None:
            # the set in force when the stream arrives: a reload may have changed it
            await accept_peer_stream(
                stream, self._identity, state_ref[0].key, self._expose, info.name
            )

        session = PeerSession(self._identity, info, controlling, serve)
        state = PeerState(info, session, controlling)
        state_ref.append(state)
        self.peers[info.peer_id] = state
        log.info("peer_added", peer=info.name, peer_id=info.peer_id, controlling=controlling)
        if controlling:
            for name, _ in self.strategies:
                self._spawn(self._begin(state, name))
            if self._tcp_enabled:
                self._spawn(self._begin(state, TCP))
        return state

    def _signalled(self, peer_id: str, kind: str, body: Mapping[str, Any]) -> None:
        state = self.peers.get(peer_id)
        if kind == RETRY and state is not None and state.controlling and not self._closed:
            log.info("peer_asks_for_attempts", peer=state.info.name, reason=body.get("reason"))
            for name, _ in self.strategies:
                attempt = state.attempts.get(name)
                if attempt is None or attempt.state != "trying":
                    self._spawn(self._begin(state, name))
            return
        strategy = dict(self.strategies).get(kind)
        number = body.get("attempt")
        known = (
            strategy is not None
            or (kind == TCP and self._tcp_enabled)
            or (kind == RELAYED and self._relayed_enabled)
        )
        if self._closed or state is None or not known or not isinstance(number, int):
            log.debug("signal_ignored", peer_id=peer_id, kind=kind)
            return
        if body.get("begin") and not state.controlling:
            state.asking_since = None  # attempts begin: what was asked for
            channel = self._channel(state, kind, number)
            if strategy is not None:
                self._spawn(self._run(state, kind, strategy, channel))
            elif kind == TCP:
                self._spawn(self._run_tcp(state, channel))
            else:
                self._spawn(self._run_relayed(state, channel))
            return
        waiting = state.channels.get((kind, number))
        if waiting is not None and isinstance(body.get("data"), Mapping):
            waiting.inbox.put_nowait(body["data"])

    # ---- attempts ----

    def _channel(self, state: PeerState, strategy: str, number: int) -> AttemptChannel:
        for key in [k for k in state.channels if k[0] == strategy]:
            del state.channels[key]  # one attempt per strategy at a time
        channel = AttemptChannel(
            self.membership, self._identity, state.info, strategy, number, state.controlling
        )
        state.channels[(strategy, number)] = channel
        return channel

    async def _begin(self, state: PeerState, name: str) -> None:
        why = _unavailable(dict(self.strategies).get(name))
        if why is not None:  # TURN without a server: it would only fail, at every round
            log.debug("path_attempt_skipped", peer=state.info.name, strategy=name, reason=why)
            return
        state.numbers += 1
        number = state.numbers
        channel = self._channel(state, name, number)
        try:
            await self.membership.send_signal(
                state.info.peer_id, name, {"attempt": number, "begin": True}
            )
        except CloudBridgeError as error:
            state.attempts[name] = Attempt(name, number, "failed", error=error.message)
            return
        if name == TCP:
            await self._run_tcp(state, channel)
        elif name == RELAYED:
            await self._run_relayed(state, channel)
        else:
            await self._run(state, name, dict(self.strategies)[name], channel)

    async def _run(
        self, state: PeerState, name: str, strategy: NatStrategy, channel: AttemptChannel
    ) -> None:
        attempt = self._attempt_started(state, name, channel.attempt)
        within = self._attempt_timeout(state)
        try:
            path = await asyncio.wait_for(strategy.connect(state.info, channel), within)
        except (CloudBridgeError, OSError, TimeoutError) as error:
            self._attempt_failed(state, attempt, str(error) or f"no path within {within:g}s")
            attempt.details = error.details if isinstance(error, P2PConnectionFailed) else {}
            return
        finally:
            state.channels.pop((name, channel.attempt), None)
        attempt.state, attempt.ended_at = "established", time.time()
        state.reported.pop(attempt.strategy, None)  # a later failure is news again
        attempt.details = {"kind": path.kind, "endpoint": path.endpoint, **_details(path)}
        if self.metrics is not None:
            self.metrics.successes.labels(name).inc()
        if self.peers.get(state.info.peer_id) is not state:  # the peer left meanwhile
            await path.aclose()
            return
        before = state.session.current
        state.session.add_path(path)
        self._path_moved(state, before)
        if state.controlling and self._carrier_due(state, RELAYED):  # on DERP: at once
            self._spawn(self._begin(state, RELAYED))

    def _attempt_timeout(self, state: PeerState) -> float:
        """:data:`ATTEMPT_TIMEOUT`, or the upgrade interval when shorter and a path works
        (at least :data:`UPGRADE_ATTEMPT_FLOOR`):
        an attempt begun while the network was down (its STUN requests unanswered, so it
        holds no candidate that can reach the peer) cannot succeed once it is back, and
        the next upgrade attempt begins only when it has ended (with all UDP dropped and a
        10 s interval, the peers were back on stun 11.8-12.0 s after UDP returned in 2 of
        3 bench runs: the attempt under way ran its whole 15 s)."""
        if state.session.current is None:
            return ATTEMPT_TIMEOUT
        return min(ATTEMPT_TIMEOUT, max(self.settings.upgrade_interval, UPGRADE_ATTEMPT_FLOOR))

    async def _run_tcp(self, state: PeerState, channel: AttemptChannel) -> None:
        attempt = self._attempt_started(state, TCP, channel.attempt)
        runner = TcpAttempt(self._identity, state.info, channel, self.tcp_listener)
        state.tcp_attempt = runner
        try:
            link = await asyncio.wait_for(runner.run(), ATTEMPT_TIMEOUT)
        except (CloudBridgeError, OSError, TimeoutError) as error:
            state.failures[TCP] = state.failures.get(TCP, 0) + 1
            self._attempt_failed(
                state, attempt, str(error) or f"no TCP path within {ATTEMPT_TIMEOUT:g}s"
            )
            return
        finally:
            if state.tcp_attempt is runner:
                state.tcp_attempt = None
            state.channels.pop((TCP, channel.attempt), None)
        attempt.state, attempt.ended_at = "established", time.time()
        state.reported.pop(attempt.strategy, None)  # a later failure is news again
        attempt.details = {"kind": "direct", "endpoint": link.endpoint, "dialed": link.dialed}
        state.failures[TCP] = 0
        if self.metrics is not None:
            self.metrics.successes.labels(TCP).inc()
            self.metrics.path_changes.inc()
        if self.peers.get(state.info.peer_id) is not state:  # the peer left meanwhile
            await link.aclose()
            return
        state.session.attach_tcp(link)

    async def _run_relayed(self, state: PeerState, channel: AttemptChannel) -> None:
        attempt = self._attempt_started(state, RELAYED, channel.attempt)
        try:
            link = await asyncio.wait_for(
                self._relayed.connect(state.info, channel, state.controlling), ATTEMPT_TIMEOUT
            )
        except (CloudBridgeError, OSError, TimeoutError) as error:
            state.failures[RELAYED] = state.failures.get(RELAYED, 0) + 1
            self._attempt_failed(
                state, attempt, str(error) or f"no relayed stream within {ATTEMPT_TIMEOUT:g}s"
            )
            return
        finally:
            state.channels.pop((RELAYED, channel.attempt), None)
        attempt.state, attempt.ended_at = "established", time.time()
        state.reported.pop(attempt.strategy, None)  # a later failure is news again
        attempt.details = {
            "kind": "derp",
            "endpoint": link.endpoint,
            "dialed": link.dialed,
            "protocol": link.protocol,
        }
        state.failures[RELAYED] = 0
        if self.metrics is not None:
            self.metrics.successes.labels(RELAYED).inc()
        if self.peers.get(state.info.peer_id) is not state:  # the peer left meanwhile
            await link.aclose()
            return
        state.session.attach(RELAYED, link)

    def _attempt_started(self, state: PeerState, name: str, number: int) -> Attempt:
        attempt = state.attempts[name] = Attempt(name, number)
        if self.metrics is not None:
            self.metrics.attempts.labels(name).inc()
        return attempt

    @staticmethod
    def _attempt_failed(state: PeerState, attempt: Attempt, reason: str) -> None:
        attempt.state, attempt.ended_at, attempt.error = "failed", time.time(), reason
        repeated = state.reported.get(attempt.strategy) == reason
        state.reported[attempt.strategy] = reason
        (log.debug if repeated else log.info)(
            "path_attempt_failed", peer=state.info.name, strategy=attempt.strategy, reason=reason
        )

    def _tcp_verified(self, peer: PeerInfo, link: TcpLink) -> None:
        """A connection the peer dialed, its certificate verified: for the attempt under way."""
        state = self.peers.get(peer.peer_id)
        attempt = state.tcp_attempt if state is not None else None
        if attempt is None or not attempt.offer(link):
            link.abort()

    def _carrier_due(self, state: PeerState, carrier: str) -> bool:
        """A new attempt at a multiplexed carrier (``tcp``; ``relay-stream`` while QUIC
        is on DERP, where it would carry the streams otherwise): at once after one ended;
        after a failed one, within :data:`RETRY_WHEN_DOWN` for the first
        :data:`TCP_QUICK_RETRIES` (the peer may not have known this device yet), then every
        ``upgrade_interval`` (a peer that never answers is an older client, a relay that
        refuses an older relay)."""
        enabled = self._tcp_enabled if carrier == TCP else self._relayed_enabled
        session = state.session
        if not enabled or session.has(carrier):
            return False
        if carrier == RELAYED and (session.has(TCP) or session.current != "derp"):
            return False
        attempt = state.attempts.get(carrier)
        if attempt is None:
            return True
        if attempt.state == "trying":
            return False
        ended = attempt.ended_at or attempt.started_at
        lost = session.lost_at.get(carrier)
        if lost is not None and lost >= ended:
            return True
        quick = state.failures.get(carrier, 0) <= TCP_QUICK_RETRIES
        wait = RETRY_WHEN_DOWN if quick else self.settings.upgrade_interval
        return time.time() - ended >= wait

    def _path_moved(self, state: PeerState, before: str | None) -> None:
        if state.session.current != before:
            state.session.transmit()
            if self.metrics is not None:
                self.metrics.path_changes.inc()

    # ---- keeping up ----

    async def _keep_up(self) -> None:
        """Heartbeats over each session's path (a silent one is dropped for the next best),
        and, on the controlling side, new attempts at better paths."""
        last_beat = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, self.settings.heartbeat_interval)):
                    await self._nudge.wait()
            self._nudge.clear()
            now = time.monotonic()
            if now - last_beat >= self.settings.heartbeat_interval:
                last_beat = now
                self._heartbeats()
            for state in list(self.peers.values()):
                self._fail_stalled(state)
                state.session.probe_dropped()
            self._drop_departed(self.membership.peers)  # away from the relay, and unreachable
            for state in list(self.peers.values()):
                if state.controlling:
                    self._attempt_due(state)
                else:
                    self._ask_when_worse(state)
            if self.metrics is not None:
                self.metrics.observe(self.peers.values())

    def _attempt_due(self, state: PeerState) -> None:
        """On the controlling side: begin the attempts that are due."""
        for name, _ in self.strategies:
            if self._due(state, name):
                self._spawn(self._begin(state, name))
        for carrier in (TCP, RELAYED):
            if self._carrier_due(state, carrier):
                self._spawn(self._begin(state, carrier))

    def _heartbeats(self) -> None:
        """A ping for each peer, not awaited: one waits up to ``heartbeat_timeout``, and the
        loop must go on finding stalled paths meanwhile."""
        for state in self.peers.values():
            if state.info.peer_id not in self._beating:
                self._spawn(self._beat(state))

    def _fail_stalled(self, state: PeerState) -> None:
        """A path gone silent under a transfer is left for the next best within about
        :data:`STALL_AFTER` (or the heartbeat timeout, when shorter). What silenced it
        (a network that dropped UDP, a new address) may have silenced the relay session
        too, which DERP and every new attempt's signalling need: the link checks it now
        rather than at its next health check."""
        before = state.session.current
        if state.session.check_stalled(min(STALL_AFTER, self.settings.heartbeat_timeout)):
            self._link.check_soon()
        self._path_moved(state, before)

    def _ask_when_worse(self, state: PeerState) -> None:
        """On the side that only follows: when the session's path gets worse (or none is
        left), ask the controlling peer for attempts now (:data:`RETRY`), and again over
        each relay session joined since, until one begins or :data:`ATTEMPT_TIMEOUT` has
        passed: the path is often lost with the relay session the first ask goes over (a
        new address cuts both)."""
        before = state.held
        current = state.held = state.session.current
        now = time.time()
        if before is not None and (current is None or RANK[current] > RANK[before]):
            state.asking_since, state.asked_at = now, 0.0
            state.asked_for = f"{before} path lost"
        if state.asking_since is None:
            return
        if now - state.asking_since > ATTEMPT_TIMEOUT:
            state.asking_since = None  # an older peer, which does not know the signal
        elif state.asked_at < self.membership.joined_at or not state.asked_at:
            state.asked_at = now
            self._spawn(self._ask(state, state.asked_for))

    async def _ask(self, state: PeerState, reason: str) -> None:
        with contextlib.suppress(CloudBridgeError):  # a dead session: asked again on the next
            await self.membership.send_signal(state.info.peer_id, RETRY, {"reason": reason})

    async def _beat(self, state: PeerState) -> None:
        if not state.session.connected or state.session.current is None:
            return
        before = state.session.current
        self._beating.add(state.info.peer_id)
        try:
            with contextlib.suppress(CloudBridgeError):
                await state.session.ping(self.settings.heartbeat_timeout)
        finally:
            self._beating.discard(state.info.peer_id)
        self._path_moved(state, before)

    def _due(self, state: PeerState, name: str) -> bool:
        attempt = state.attempts.get(name)
        if attempt is None:
            return True
        if attempt.state == "trying":
            return False
        kind = attempt.details.get("kind")
        session = state.session
        if attempt.state == "established" and kind in session.paths and kind not in session.suspect:
            return False
        current = session.current
        if current is not None and kind is not None and RANK[kind] >= RANK[current]:
            return False  # no better than what works now
        ended = attempt.ended_at or attempt.started_at
        if attempt.state == "failed" and ended < self.membership.joined_at:
            return True  # its signalling may have gone over a relay session already dead
        return time.time() >= _retry_at(attempt, current is not None, self.settings)

    def _next_retry(self, state: PeerState) -> float | None:
        failed = [a for a in state.attempts.values() if a.ended_at and a.state == "failed"]
        if not failed or not state.controlling:
            return None
        upgrade = state.session.current is not None
        return max(0.0, min(_retry_at(a, upgrade, self.settings) for a in failed) - time.time())

    async def _discover(self) -> None:
        while True:
            await asyncio.sleep(self.settings.peer_discovery_interval)
            await self.membership.refresh()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _document(self, state: PeerState) -> dict[str, Any]:
        session = state.session
        seen = session.last_seen
        return {
            "name": state.info.name,
            "peer_id": state.info.peer_id,
            "path": session.path,
            "protocol": session.protocol,
            "endpoint": session.endpoint,
            "connected": session.connected,
            "rtt_seconds": round(session.rtt_seconds, 6) if session.rtt_seconds else None,
            # the same, deprecated: JSON says seconds
            "rtt_ms": round(session.rtt_seconds * 1000, 3) if session.rtt_seconds else None,
            "last_seen": _timestamp(seen),
            "bytes_sent": session.bytes_sent,
            "bytes_received": session.bytes_received,
            "paths": session.paths,
            "overlay_ip": state.info.overlay_ip or None,
        }


def _holds_without_relay(state: PeerState) -> bool:
    """A peer gone from the relay's list (its relay session dropped, or ours) is kept while
    a path that does not go through the relay still carries its session."""
    return state.session.connected and state.session.path not in (None, "derp")


def _strategies(config: Config, plugins: Plugins, mode: str) -> list[tuple[str, NatStrategy]]:
    if mode not in MODES:
        raise P2PConnectionFailed(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    found = list(plugins.nat_strategies().items())  # highest priority first
    fallback = config.get("p2p.fallback_enabled")
    chosen = []
    for name, spec in found:
        if mode == "relay-only" and name != "derp":
            continue
        if mode == "p2p-only" and name == "derp":
            continue
        if not fallback and name in ("turn", "derp"):
            continue
        settings = plugins.settings_for("nat_strategy", name, config.converted)
        chosen.append((name, spec.load(settings)))
    if not chosen:
        installed = ", ".join(n for n, _ in found) or "none"
        raise P2PConnectionFailed(f"no NAT strategy for mode {mode} (installed: {installed})")
    return chosen


def _unavailable(strategy: NatStrategy | None) -> str | None:
    """Why ``strategy`` cannot work now, when it says (an optional sync ``unavailable()``,
    as the TURN strategy has: no server configured and none issued by the relay)."""
    check = getattr(strategy, "unavailable", None)
    reason = check() if callable(check) else None
    return reason if isinstance(reason, str) else None


def _details(path: Any) -> dict[str, Any]:
    details = getattr(path, "details", None)
    return dict(details) if isinstance(details, Mapping) else {}


def _timestamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


def _summary(state: PeerState) -> str:
    current = state.session.path
    if current in ("direct", "stun"):
        return f"direct: {current} path over {state.session.protocol}"
    failed = [a for a in state.attempts.values() if a.state == "failed"]
    reasons = "; ".join(f"{a.strategy}: {a.error}" for a in failed) or "no attempt has failed"
    on = current or "no path"
    return f"not direct (on {on}): {reasons}"


def _retry_at(attempt: Attempt, upgrade: bool, settings: P2PSettings) -> float:
    """When a failed attempt is tried again: an upgrade (a path works meanwhile) every
    ``upgrade_interval`` from one start to the next, so that a path that comes back is
    found within about that interval even though an attempt that fails takes its whole
    :data:`ATTEMPT_TIMEOUT` (with all UDP dropped and a 10 s interval, attempts began 25 s
    apart and the peers were back on stun 12-15 s after UDP returned); with no path at
    all, :data:`RETRY_WHEN_DOWN` after the last one ended."""
    if upgrade:
        return attempt.started_at + settings.upgrade_interval
    return (attempt.ended_at or attempt.started_at) + RETRY_WHEN_DOWN
