"""The relay's session logic, independent of the transport that carried the session.

Every session authenticates on its control stream before anything else; every tunnel
stream is checked against the token's permissions and the egress policy; everything is
counted and bounded per tenant. A misbehaving session is closed without disturbing others.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

from cloudbridge_core.errors import (
    CloudBridgeError,
    ConnectionTimeout,
    InvalidToken,
    LimitExceeded,
    ProtocolViolation,
    ServerUnavailable,
    TargetUnreachable,
    TokenExpired,
    TransportError,
    Unauthorized,
)
from cloudbridge_core.log import debug_on, get_logger
from cloudbridge_core.protocol import derp, messages
from cloudbridge_core.providers import AuthProvider, Claims, Session, Stream
from cloudbridge_core.pump import PumpResult, abort, connect, prepare, pump, pump_dialled
from cloudbridge_core.relay.admission import HOLD, QUEUE, Admission, Turn
from cloudbridge_core.relay.cluster.links import ClusterLinks
from cloudbridge_core.relay.cluster.store import ClusterEvent, ClusterStore, Revocation
from cloudbridge_core.relay.egress import EgressPolicy
from cloudbridge_core.relay.ipam import Ipam
from cloudbridge_core.relay.mesh import Challenge, Member, Mesh, tell
from cloudbridge_core.relay.metrics import RelayMetrics
from cloudbridge_core.relay.pacing import Pacer
from cloudbridge_core.relay.ratelimit import RateLimiter
from cloudbridge_core.relay.revocations import REVOKED, Revocations, revocation_from
from cloudbridge_core.relay.splice import Arrival, Splicer
from cloudbridge_core.relay.tickets import TicketDesk
from cloudbridge_core.relay.turn import TurnIssuer
from cloudbridge_core.settings import (
    PerformanceSettings,
    RateLimitSettings,
    RateQuota,
    ServerSettings,
)
from cloudbridge_core.tenants import is_tenant_id
from cloudbridge_core.transports.mux_session import MuxSession, MuxStream
from cloudbridge_core.transports.preauth import PreauthGate, PreauthLimits
from cloudbridge_core.wire import MessageStream

log = get_logger("relay.server")
_debug = debug_on("relay.server")

CONNECT = "relay:connect"
#: what the relay takes of what a hello offers (said back in the welcome)
TAKEN = frozenset({messages.MESH_REPORT, messages.DEGRADED})
TUNNEL = "tunnel:create"
#: a tunnel's accept waits this long at most for the target's first bytes to go with it
ACCEPT_JOINS_DATA_WITHIN = 0.001
ACCEPT = messages.encode(messages.Accept())
#: how long a refused or redeeming client is given to read the answer and close
ANSWER_LINGER = 2.0
#: how often a session past its token's ``exp`` is checked for a refresh before it is sent
#: TURN credentials again (it ends ``server.token_expiry_grace`` after ``exp`` otherwise)
EXPIRED_RECHECK = 1.0


@dataclass(frozen=True)
class RelayLimits:
    """Named bounds, configurable under ``server`` (``buffer_size`` under ``performance``)."""

    handshake_timeout: float = 10.0
    preauth_timeout: float = 10.0
    preauth_max_per_address: int = 64
    preauth_max_connections: int = 1024
    connect_timeout: float = 10.0
    max_sessions_per_tenant: int = 100
    max_streams_per_session: int = 1024
    buffer_size: int = 65536
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 90.0
    drain_timeout: float = 10.0
    rate_limits: RateLimitSettings = field(kw_only=True)  # the schema holds its defaults
    admission: RateQuota = field(kw_only=True)
    token_expiry_grace: float = 10.0

    @classmethod
    def from_settings(cls, server: ServerSettings, performance: PerformanceSettings) -> RelayLimits:
        return cls(
            handshake_timeout=server.handshake_timeout,
            preauth_timeout=server.preauth_timeout,
            preauth_max_per_address=server.preauth_max_per_address,
            preauth_max_connections=server.preauth_max_connections,
            heartbeat_timeout=server.heartbeat_timeout,
            drain_timeout=server.drain_timeout,
            token_expiry_grace=server.token_expiry_grace,
            connect_timeout=server.connect_timeout,
            max_sessions_per_tenant=server.max_sessions_per_tenant,
            max_streams_per_session=server.max_streams_per_session,
            buffer_size=performance.buffer_size,
            rate_limits=server.rate_limits,
            admission=server.admission,
        )


async def _refuse(control: MessageStream, error: CloudBridgeError) -> NoReturn:
    """Answer the hello with ``error`` (and when to come back, if it says)."""
    retry_in = round(error.retry_after or 0.0, 3)
    with contextlib.suppress(TransportError):
        await control.send(messages.ErrorMessage(error.code, error.message, retry_in))
    raise _Answered(control.stream, error) from error


class _Answered(Exception):
    """The session's hello was answered with all it will get (an invite's redemption, or a
    refusal, ``error``) on ``control``, which the client has still to read."""

    def __init__(self, control: Stream, error: CloudBridgeError | None = None) -> None:
        super().__init__()
        self.control = control
        self.error = error


@dataclass(eq=False)  # one per session, kept in a set: identity is its equality
class _SessionState:
    """What a session holds: the rights of its latest token, its mesh membership."""

    claims: Claims
    challenge: Challenge = field(default_factory=Challenge)
    member: Member | None = None
    #: sends the member fresh TURN credentials before its last ones expire (``server.turn``)
    turn_renewal: asyncio.Task[None] | None = None
    #: set when the session's rights change (a refresh; a revocation that may cover it)
    rights_changed: asyncio.Event = field(default_factory=asyncio.Event)

    def expired(self) -> bool:
        return time.time() >= self.claims.expires_at


class Relay:
    """Serves sessions from any transport: ``await relay.handle(session)``.

    ``auth``, ``egress`` and ``limits`` may be replaced while the relay serves (a config
    reload): each is read where it is used, so a new one applies to the hellos, tunnels
    and streams that come next, while established sessions and open tunnels carry on.
    ``turn`` issues mesh members their tenant's TURN credentials; ``server.turn`` is set at
    start (it needs a restart, like the TURN server's shared secret it holds). ``ipam``
    leases overlay addresses to the mesh's devices (``server.overlay``, also set at start);
    ``cluster``, where state shared with other relays lives (``server.cluster``), too.
    """

    def __init__(
        self,
        auth: AuthProvider,
        egress: EgressPolicy,
        limits: RelayLimits,
        metrics: RelayMetrics | None = None,
        turn: TurnIssuer | None = None,
        ipam: Ipam | None = None,
        *,
        cluster: ClusterStore,
    ) -> None:
        self.auth = auth
        #: what the relays of a cluster share (``server.cluster``; a relay alone's in memory)
        self.cluster = cluster
        #: the links to the other relays of a cluster (set by the runner; None: alone)
        self.links: ClusterLinks | None = None
        #: the tokens no session may use any more (``relay token revoke``), from ``cluster``
        self.revocations = Revocations()
        self.egress = egress
        self.limits = limits
        self.metrics = metrics or RelayMetrics()
        self.turn = turn
        self.mesh = Mesh(self.metrics, cluster, ipam)
        #: joins the peer_splice streams of two peers of one tenant
        self.splicer = Splicer(self.mesh)
        #: joins their raw connections to the TLS port (``peer_ticket``)
        self.tickets = TicketDesk(
            self.mesh,
            self.splicer,
            self.metrics,
            lambda: self.limits.handshake_timeout,
            self._stream_activity,
        )
        #: the pre-auth budget transports hold strangers to; follows ``limits`` on reload
        self.preauth = PreauthGate(self._preauth_limits)
        #: exchanges an invite's code for a token and the client's config (set by the runner)
        self.redeemer: Callable[[str], Awaitable[messages.Redeemed]] | None = None
        self.sessions_by_tenant: Counter[str] = Counter()
        self.sessions_by_transport: Counter[str] = Counter()
        self.streams_active = 0
        self.reaped_sessions = 0
        self.rate_limiter = RateLimiter()
        #: paces new sessions relay-wide (``server.admission``); follows ``limits`` on reload
        self.admission = Admission(lambda: self.limits.admission)
        #: the live sessions by id, for a reconnecting client to name the one it lost
        self._sessions: dict[str, tuple[Claims, Session]] = {}
        self.draining = False
        #: wakes the clients held for their turn when a drain starts (they are told to go)
        self._drain_started = asyncio.Event()
        self._controls: set[MessageStream] = set()
        #: the open sessions' rights, for a revocation to end the ones it covers
        self._states: set[_SessionState] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._streams_idle = asyncio.Event()
        self._streams_idle.set()

    def _stream_activity(self, change: int) -> None:
        self.streams_active += change
        if self.streams_active:
            self._streams_idle.clear()
        else:
            self._streams_idle.set()

    def _preauth_limits(self) -> PreauthLimits:
        return PreauthLimits(
            self.limits.preauth_timeout,
            self.limits.preauth_max_per_address,
            self.limits.preauth_max_connections,
        )

    async def handle(self, session: Session, transport: str = "unknown") -> None:
        """Serve one session; ``transport`` names the transport it came over (for metrics)."""
        try:
            # one deadline for the control stream and the hello together (a transport
            # holding the pre-auth budget has started it at the accept already)
            async with asyncio.timeout(self.limits.preauth_timeout):
                control = MessageStream(await session.accept_stream())
                claims, hello, turn = await self._authenticate(control)
            # an authenticated client may send larger messages (its ``mesh_report``)
            control.allow(messages.MAX_CONTROL_MESSAGE_SIZE)
            # past the pre-auth deadline: a queued client waits longer than it allows
            session_id = await self._welcome(control, transport, session, claims, hello, turn)
        except TimeoutError:
            log.info("handshake_timeout")
            return
        except _Answered as answered:
            if answered.error is not None:
                self.metrics.auth_failures.labels(answered.error.code).inc()
                log.info(
                    "session_rejected", code=answered.error.code, reason=answered.error.message
                )
            await _until_read(answered.control)
            return
        except CloudBridgeError as error:
            self.metrics.auth_failures.labels(error.code).inc()
            log.info("session_rejected", code=error.code, reason=error.message)
            return
        tenant = claims.tenant_id
        self._sessions[session_id] = (claims, session)
        self.sessions_by_tenant[tenant] += 1
        self.sessions_by_transport[transport] += 1
        self.metrics.sessions_opened.labels(transport).inc()
        try:
            await self._serve(session, control, claims)
        finally:
            del self._sessions[session_id]
            with contextlib.suppress(ServerUnavailable):  # its entry lapses with the relay
                await self.cluster.close_session(tenant, session_id)
            self.sessions_by_tenant[tenant] -= 1
            if not self.sessions_by_tenant[tenant]:
                del self.sessions_by_tenant[tenant]
            self.sessions_by_transport[transport] -= 1
            if not self.sessions_by_transport[transport]:
                del self.sessions_by_transport[transport]
            log.info("session_closed", tenant_id=tenant, subject=claims.subject)

    def session_claims(self, tenant_id: str) -> list[Claims]:
        """What the tenant's sessions here hold now (refreshed tokens included)."""
        return [state.claims for state in self._states if state.claims.tenant_id == tenant_id]

    async def drain(self) -> None:
        """Refuse new sessions and tunnels, tell every session the relay is restarting (its
        client then waits for the restart instead of opening tunnels here), and wait
        (bounded) for open tunnels to finish."""
        self.draining = True
        self._drain_started.set()
        started = time.monotonic()
        goaway = messages.Goaway("restarting", self._comeback_window())
        notices = [tell(control, goaway) for control in list(self._controls)]
        for failed in await asyncio.gather(
            *notices, self.mesh.restarting(), return_exceptions=True
        ):
            if isinstance(failed, Exception):  # a notice is best effort; the drain goes on
                log.info("goaway_not_sent", reason=str(failed) or type(failed).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._streams_idle.wait(), self.limits.drain_timeout)
        log.info(
            "shutdown",
            streams_left=self.streams_active,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _wait_unless_draining(self, seconds: float) -> None:
        if seconds:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._drain_started.wait()

    def _check_room(self, claims: Claims) -> None:
        """Raise why the relay has no room for a session of ``claims`` now, if it has none."""
        if self.draining:
            raise self._restarting()
        if self.sessions_by_tenant[claims.tenant_id] >= self.limits.max_sessions_per_tenant:
            raise LimitExceeded(
                f"tenant already holds {self.limits.max_sessions_per_tenant} sessions"
            )

    async def _count_in_cluster(self, tenant_id: str, session_id: str) -> None:
        """Count the session against its tenant's limit across the cluster (a relay alone
        counts its own, as :meth:`_check_room` did); while the cluster's store cannot be
        reached, this relay's own count is the limit."""
        limit = self.limits.max_sessions_per_tenant
        try:
            counted = await self.cluster.open_session(tenant_id, session_id, limit)
        except ServerUnavailable as error:
            log.warning("cluster_degraded", operation="open_session", reason=error.message)
            return
        if not counted:
            raise LimitExceeded(f"tenant already holds {limit} sessions across the cluster")

    def _restarting(self) -> ServerUnavailable:
        return ServerUnavailable(
            "the relay is restarting",
            retry_after=random.uniform(0, self._comeback_window()),  # noqa: S311
        )

    def _comeback_window(self) -> float:
        """The seconds over which this relay's clients should spread their return."""
        return round(self.admission.spread_window(len(self._sessions)), 3)

    async def _authenticate(self, control: MessageStream) -> tuple[Claims, messages.Hello, Turn]:
        """The hello's claims, checked, and the turn admission gives it (or ``_Answered``)."""
        hello = await control.expect(messages.Hello, messages.Redeem)
        if isinstance(hello, messages.Redeem):
            await self._redeem(control, hello)
            raise _Answered(control.stream)
        assert isinstance(hello, messages.Hello)  # expect() checked the kind
        try:
            claims = await self.auth.validate(hello.token)
            if not is_tenant_id(claims.tenant_id):  # from any provider: checked before any use
                raise InvalidToken("the token's tenant claim is not a tenant id")
            _check_not_expired(claims)
            self.revocations.check(claims)
            if CONNECT not in claims.permissions:
                raise Unauthorized(f"token lacks the {CONNECT} permission")
            self._check_room(claims)
        except CloudBridgeError as error:
            await _refuse(control, error)
        turn = self.admission.admit(hello.slot, can_wait=QUEUE in hello.capabilities)
        if turn.retry_in:  # not a failure: the client comes back at its slot (no error)
            self.metrics.sessions_deferred.inc()
            deferred = messages.ErrorMessage(
                ServerUnavailable.code,
                f"the relay admits {self.limits.admission.rate:g} new sessions a second:"
                f" come back in {turn.retry_in:.1f}s",
                round(turn.retry_in, 3),
                turn.slot,
            )
            with contextlib.suppress(TransportError):
                await control.send(deferred)
            raise _Answered(control.stream)
        return claims, hello, turn

    async def _welcome(
        self,
        control: MessageStream,
        transport: str,
        session: Session,
        claims: Claims,
        hello: messages.Hello,
        turn: Turn,
    ) -> str:
        """Open the session once its turn has come; its id. A client held longer than
        :data:`HOLD` is told so first (``queued``): it waits past its connect timeout."""
        # authenticated: it no longer counts against the pre-auth budget, and the client
        # may open streams as soon as it reads the welcome
        lift: Callable[[], None] | None = getattr(session, "authenticated", None)
        if lift is not None:  # transports older than Session.authenticated lack it
            lift()
        if turn.hold > HOLD:
            self.metrics.sessions_queued.inc()
            await control.send(messages.Queued(round(turn.hold, 3)))
        await self._wait_unless_draining(turn.hold)
        while not self.draining and (wait := self.admission.room_to_start()):
            await self._wait_unless_draining(wait)
        session_id = secrets.token_urlsafe(12)
        try:  # again after the wait: a drain may have begun, sessions opened, time passed
            _check_not_expired(claims)
            self._check_room(claims)
            await self._count_in_cluster(claims.tenant_id, session_id)
        except CloudBridgeError as error:
            await _refuse(control, error)
        if hello.replaces:
            self._close_replaced(hello.replaces, claims)
        taken = tuple(c for c in hello.capabilities if c in TAKEN)
        welcome = messages.Welcome(
            session_id=session_id,
            tenant_id=claims.tenant_id,
            heartbeat_interval_seconds=self.limits.heartbeat_interval,
            server_time=time.time(),
            capabilities=taken or None,
            degraded=(self.degraded() or None) if messages.DEGRADED in taken else None,
        )
        try:
            await control.send(welcome)
        except BaseException:  # a client gone before its welcome holds no session
            with contextlib.suppress(ServerUnavailable):
                await self.cluster.close_session(claims.tenant_id, session_id)
            raise
        log.info(
            "session_opened",
            tenant_id=claims.tenant_id,
            subject=claims.subject,
            session_id=session_id,
            transport=transport,
        )
        return session_id

    def degraded(self) -> tuple[str, ...]:
        """What this relay cannot do now while it serves its sessions (the welcome's
        ``degraded``): the cluster-wide part while its cluster store cannot be reached."""
        return () if self.cluster.healthy else (messages.CLUSTER_BACKEND,)

    def _close_replaced(self, session_id: str, claims: Claims) -> None:
        """Close the session a reconnecting client lost, if this relay still holds it for
        the same tenant and subject: a black-holed session would otherwise linger until its
        heartbeat timeout, beside the new one. An unknown id is ignored alike."""
        held = self._sessions.get(session_id)
        if held is None or (held[0].tenant_id, held[0].subject) != (
            claims.tenant_id,
            claims.subject,
        ):
            return
        self.metrics.sessions_replaced.inc()
        log.info("session_replaced", tenant_id=claims.tenant_id, session_id=session_id)
        closing = asyncio.get_running_loop().create_task(_close_quietly(held[1]))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _redeem(self, control: MessageStream, request: messages.Redeem) -> None:
        """An invite's code for a token and where to reach the relay (``cloudbridge join``)."""
        try:
            if self.redeemer is None:
                raise Unauthorized("this relay does not take invites")
            redeemed = await self.redeemer(request.code)
        except CloudBridgeError as error:
            self.metrics.auth_failures.labels(error.code).inc()
            log.info("invite_refused", code=error.code, reason=error.message)
            with contextlib.suppress(TransportError):
                await control.send(messages.ErrorMessage(error.code, error.message))
            return
        log.info("invite_redeemed", tenant_id=redeemed.tenant_id)
        with contextlib.suppress(TransportError):
            await control.send(redeemed)

    async def _serve(self, session: Session, control: MessageStream, claims: Claims) -> None:
        streams: set[asyncio.Task[None]] = set()
        state = _SessionState(claims)
        await tell(control, state.challenge.message)
        limiter = self.rate_limiter.session(claims.tenant_id, _source_address(session))
        pacer = Pacer(limiter, lambda: self.limits.rate_limits, session, control, self.metrics)
        if isinstance(session, MuxSession):  # it answers PINGs itself: it lets the relay pace them
            session.pace_pings = lambda count: pacer.pace("mux_pings", count)
        controller = asyncio.create_task(self._control_loop(session, control, claims, state, pacer))
        self._states.add(state)
        expiry = asyncio.create_task(self._end_with_rights(session, control, state))
        self._controls.add(control)
        try:
            while True:
                try:
                    stream = await session.accept_stream()
                except TransportError:
                    return
                await pacer.pace("stream_opens")
                if len(streams) >= self.limits.max_streams_per_session:
                    await _reject(stream, LimitExceeded("too many streams in this session"))
                    continue
                task = asyncio.create_task(self._tunnel(stream, claims, state))
                streams.add(task)
                task.add_done_callback(streams.discard)
        finally:
            self._controls.discard(control)
            self._states.discard(state)
            controller.cancel()
            expiry.cancel()  # not awaited: freeing the session waits for no extra loop turns
            for task in list(streams):
                task.cancel()
            await asyncio.gather(controller, *streams, return_exceptions=True)
            if state.turn_renewal is not None:
                state.turn_renewal.cancel()
            if state.member is not None:
                await self.mesh.leave(state.member)
            limiter.close()

    async def _end_with_rights(
        self, session: Session, control: MessageStream, state: _SessionState
    ) -> None:
        """End the session as soon as a revocation covers its token, or
        ``server.token_expiry_grace`` after its token's ``exp`` unless a refresh has moved
        ``exp`` on; tunnels opened meanwhile are refused (``_tunnel``)."""
        while True:
            state.rights_changed.clear()
            if self.revocations.covers(state.claims):  # also one that came before _serve
                event, ending = "session_revoked", messages.ErrorMessage(InvalidToken.code, REVOKED)
                break
            ends_at = state.claims.expires_at + self.limits.token_expiry_grace
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.rights_changed.wait(), ends_at - time.time())
            if not state.rights_changed.is_set():
                self.metrics.sessions_expired.inc()
                event = "session_expired"
                ending = messages.ErrorMessage(TokenExpired.code, "the session's token expired")
                break
        claims = state.claims
        log.info(event, tenant_id=claims.tenant_id, subject=claims.subject)
        await tell(control, ending)
        with contextlib.suppress(CloudBridgeError):  # nobody awaits this task: _serve cancels it
            await session.aclose()  # ends _serve, which frees the session's streams

    async def on_cluster_event(self, event: ClusterEvent) -> None:
        """What the cluster's store delivers (another relay, or ``relay token revoke``)."""
        if event.kind == "revoked":
            try:
                revocation = revocation_from(event.body)
            except ValueError as error:
                log.warning("cluster_event_malformed", kind=event.kind, reason=str(error))
                return
            await self.on_revoked(revocation)
        else:  # a device of another relay: it joined, left, or signals one here
            await self.mesh.on_event(event)

    async def on_revoked(self, revocation: Revocation) -> None:
        """Refuse the tokens ``revocation`` covers from now on, and end their sessions."""
        if self.revocations.added(revocation) is not None:
            log.info("token_revoked", tenant_id=revocation.tenant_id)
            self._end_revoked([revocation])

    async def load_revocations(self) -> None:
        """Hold the revocations in force in the cluster's store, besides those held already
        (``ServerUnavailable`` when it cannot be reached); sessions of any this relay had
        missed end. What is held and the store lacks is written back: a Redis restarted
        without its data (no persistence) forgot it, and a revoked token must not be taken
        again, here nor at a relay started later. Nothing un-revokes a token, so a held
        revocation is never stale; it is forgotten only once every token it covers expired.
        """
        stored = {revocation.key: revocation for revocation in await self.cluster.revocations()}
        self._end_revoked(self.revocations.merge(stored.values()))
        for revocation in self.revocations.held():
            if stored.get(revocation.key) != revocation:
                await self.cluster.revoke(revocation)

    async def on_cluster_resynced(self) -> None:
        """The store is back after an outage: revocations made meanwhile apply now, and
        the meshes catch up with the other relays."""
        try:
            await self.load_revocations()
        except ServerUnavailable as error:  # the ones held stay enforced meanwhile
            log.warning("revocations_not_reloaded", reason=error.message)
        await self.mesh.resynced()

    async def on_relays_gone(self, relays: set[str]) -> None:
        """Relays whose presence lapsed: their devices leave the meshes, their links close."""
        log.info("cluster_relays_gone", relays=sorted(relays))
        if self.links is not None:
            self.links.forget(relays)
        await self.mesh.relays_gone(relays)

    def _end_revoked(self, revocations: list[Revocation]) -> None:
        for state in self._states:
            if any(revocation.covers(state.claims) for revocation in revocations):
                state.rights_changed.set()  # _end_with_rights sees the revocation and ends it

    async def _refresh(self, state: _SessionState, token: str) -> messages.Message:
        """Move the session onto a fresh token of the same tenant and subject."""
        old = state.claims
        try:
            claims = await self.auth.validate(token)
            _check_not_expired(claims)
            self.revocations.check(claims)
            if (claims.tenant_id, claims.subject) != (old.tenant_id, old.subject):
                raise Unauthorized("a refresh must be for the session's own tenant and subject")
            if CONNECT not in claims.permissions:
                raise Unauthorized(f"token lacks the {CONNECT} permission")
        except CloudBridgeError as error:
            self.metrics.auth_failures.labels(error.code).inc()
            log.info("refresh_refused", tenant_id=old.tenant_id, code=error.code)
            return messages.RefreshFailed(error.code, error.message)
        state.claims = claims
        state.rights_changed.set()
        log.info("session_refreshed", tenant_id=claims.tenant_id, subject=claims.subject)
        return messages.Refreshed(claims.expires_at)

    async def _control_loop(
        self,
        session: Session,
        control: MessageStream,
        claims: Claims,
        state: _SessionState,
        pacer: Pacer,
    ) -> None:
        """Answer heartbeats and mesh requests; a session silent for ``heartbeat_timeout``
        is dead, one that breaks the protocol is closed: either way it is freed."""
        try:
            while True:
                silence = self.limits.heartbeat_timeout  # a reload may change it meanwhile
                try:
                    message = await asyncio.wait_for(control.receive(), silence)
                except TimeoutError:
                    self.reaped_sessions += 1
                    self.metrics.sessions_reaped.inc()
                    log.info(
                        "session_reaped",
                        tenant_id=claims.tenant_id,
                        subject=claims.subject,
                        reason=f"no heartbeat for {silence:g}s",
                    )
                    await session.aclose()  # ends _serve, which frees the session's streams
                    return
                await pacer.pace("control_messages")
                await self._answer(control, claims, state, message)
        except ProtocolViolation as error:
            log.info("session_closed", tenant_id=claims.tenant_id, reason=error.message)
            await session.aclose()
        except TransportError:
            return

    async def _answer(
        self,
        control: MessageStream,
        claims: Claims,
        state: _SessionState,
        message: messages.Message,
    ) -> None:
        if isinstance(message, messages.Ping):
            await control.send(messages.Pong(message.nonce))
        elif isinstance(message, messages.Refresh):
            await control.send(await self._refresh(state, message.token))
        elif isinstance(message, messages.MeshReport):
            # kept from joined members only, like mesh_refresh; nothing new after exp
            if state.member is not None and not state.expired():
                self.mesh.report(state.member, message)
        elif isinstance(message, messages.MeshJoin | messages.MeshRefresh | messages.Signal):
            if state.expired():  # between exp and the session's end: nothing new
                await self._refuse_expired(control, claims, message)
            elif isinstance(message, messages.MeshJoin):
                await self._join(control, claims, state, message)
            elif isinstance(message, messages.MeshRefresh):
                if state.member is not None:
                    await self.mesh.refresh(state.member)
            else:
                await self.mesh.signal(state.member, claims.tenant_id, message)

    async def _refuse_expired(
        self,
        control: MessageStream,
        claims: Claims,
        message: messages.MeshJoin | messages.MeshRefresh | messages.Signal,
    ) -> None:
        self.mesh.rejected("token_expired", claims.tenant_id, f"{message.TYPE} after exp")
        reason = "the session's token expired: refresh it or reconnect"
        if isinstance(message, messages.Signal):
            await tell(control, messages.SignalFailed(message.peer_id, TokenExpired.code, reason))
        else:
            await tell(control, messages.ErrorMessage(TokenExpired.code, reason))

    async def _join(
        self,
        control: MessageStream,
        claims: Claims,
        state: _SessionState,
        request: messages.MeshJoin,
    ) -> None:
        """Join the session's device to its tenant's mesh (again: a session joins once at a
        time). With ``server.turn``, the member gets its TURN credentials before its peer
        list, so a client that knows it joined knows whether the relay issues them."""
        if state.member is not None:
            await self.mesh.leave(state.member)
            state.member = None
        if state.turn_renewal is not None:
            state.turn_renewal.cancel()
            state.turn_renewal = None
        issuer = self.turn
        credentials = None if issuer is None else issuer.issue(claims.tenant_id)
        try:
            state.member = await self.mesh.join(
                claims, control, request, state.challenge, credentials
            )
        except CloudBridgeError as error:  # the session stays; only the mesh is refused
            await control.send(messages.ErrorMessage(error.code, error.message))
            return
        if issuer is not None:
            self.metrics.turn_credentials.inc()
            state.turn_renewal = asyncio.create_task(self._renew_turn(control, state, issuer))

    async def _renew_turn(
        self, control: MessageStream, state: _SessionState, issuer: TurnIssuer
    ) -> None:
        """Fresh TURN credentials at half the lifetime of the last ones, for as long as the
        session lasts (``_serve`` cancels this task): a client never holds only expired
        ones. None between the token's ``exp`` and the session's end, unless a refresh
        comes: a session gets no new rights then."""
        delay = issuer.ttl / 2
        while True:
            await asyncio.sleep(delay)
            if state.expired():
                delay = EXPIRED_RECHECK
                continue
            await tell(control, issuer.issue(state.claims.tenant_id))
            self.metrics.turn_credentials.inc()
            delay = issuer.ttl / 2

    async def _tunnel(self, stream: Stream, claims: Claims, state: _SessionState) -> None:
        header = MessageStream(stream)
        try:
            # asyncio.timeout rather than wait_for, here and in _dial: no task per setup
            async with asyncio.timeout(self.limits.handshake_timeout):
                opened = await header.expect(
                    messages.Open, messages.PeerSplice, messages.PeerTicket
                )
        except (TimeoutError, CloudBridgeError) as error:
            log.info("stream_dropped", tenant_id=claims.tenant_id, reason=str(error) or "timeout")
            with contextlib.suppress(CloudBridgeError):
                await stream.aclose()
            return
        if state.expired():  # between exp and the session's end: nothing new
            self.metrics.tunnels_rejected.labels(TokenExpired.code).inc()
            expired = TokenExpired("the session's token expired: refresh it or reconnect")
            await _reject(stream, expired)
            return
        if not isinstance(opened, messages.Open) or opened.target == derp.TARGET:
            await self._for_peers(stream, header, claims, state.member, opened)
            return
        try:
            if TUNNEL not in state.claims.permissions:
                raise Unauthorized(f"token lacks the {TUNNEL} permission")
            if self.draining:
                raise ServerUnavailable("the relay is restarting")
            family, address = await self._resolve(claims.tenant_id, opened.target)
            if isinstance(stream, MuxStream) and stream.direct and _unscoped(address):
                await self._carry_dialled(stream, header, claims, opened.target, address)
                return
            target = await self._dial(opened.target, family, address)
        except CloudBridgeError as error:
            self.metrics.tunnels_rejected.labels(error.code).inc()
            log.info(
                "tunnel_rejected", tenant_id=claims.tenant_id, target=opened.target, code=error.code
            )
            await _reject(stream, error)
            return
        try:
            early = await _accept(stream, header, target)
        except (TransportError, OSError):
            abort(target)
            return
        except asyncio.CancelledError:  # the session ended: the pump never got the socket
            abort(target)
            raise
        self.metrics.streams.inc()
        started_at = time.monotonic()
        self.streams_active += 1
        self._streams_idle.clear()
        try:
            # what came with the open (sent above) counts as carried to the target too
            result = PumpResult(received=early)
            await pump(stream, target, buffer_size=self.limits.buffer_size, result=result)
        finally:
            self.streams_active -= 1
            if not self.streams_active:
                self._streams_idle.set()
        self._tunnel_closed(claims, opened.target, result, started_at)

    async def _carry_dialled(
        self,
        stream: MuxStream,
        header: MessageStream,
        claims: Claims,
        target: str,
        address: tuple[Any, ...],
    ) -> None:
        """Connect to the target and carry the tunnel in one (:func:`pump_dialled`).

        Raises ``ConnectionTimeout`` or ``TargetUnreachable`` when the connection fails;
        nothing has been accepted then.
        """
        first = header.take_buffered()
        # what came with the open counts as carried to the target too
        result = PumpResult(received=len(first))

        def connected() -> None:
            # the client does not wait for it (client/opening.py): it goes out with the
            # target's first bytes, in one record, when they come soon enough
            stream.send_soon(ACCEPT, ACCEPT_JOINS_DATA_WITHIN)
            self.metrics.streams.inc()

        started_at = time.monotonic()
        self.streams_active += 1
        self._streams_idle.clear()
        try:
            await pump_dialled(
                stream,
                address,
                first=first,
                connected=connected,
                connect_within=self.limits.connect_timeout,
                result=result,
            )
        except TimeoutError as exc:
            raise ConnectionTimeout(f"{target} did not answer in time") from exc
        except OSError as exc:
            raise TargetUnreachable(f"cannot connect to {target}: {exc.strerror or exc}") from exc
        finally:
            self.streams_active -= 1
            if not self.streams_active:
                self._streams_idle.set()
        self._tunnel_closed(claims, target, result, started_at)

    def _tunnel_closed(
        self, claims: Claims, target: str, result: PumpResult, started_at: float
    ) -> None:
        self.metrics.bytes_to_target.inc(result.received)
        self.metrics.bytes_from_target.inc(result.sent)
        if _debug():
            log.debug(
                "tunnel_closed",
                tenant_id=claims.tenant_id,
                target=target,
                sent=result.sent,
                received=result.received,
                error=result.error,
                duration_ms=round((time.monotonic() - started_at) * 1000, 1),
            )

    async def _derp(
        self, stream: Stream, header: MessageStream, claims: Claims, member: Member | None
    ) -> None:
        if member is None:
            self.mesh.rejected("not_joined", claims.tenant_id, "DERP channel before mesh_join")
            await _reject(stream, Unauthorized("join the mesh (mesh_join) before opening DERP"))
            return
        with contextlib.suppress(TransportError):
            await header.send(messages.Accept())
            await self.mesh.serve_derp(member, stream, header.take_buffered())

    async def _for_peers(
        self,
        stream: Stream,
        header: MessageStream,
        claims: Claims,
        member: Member | None,
        opened: messages.Message,
    ) -> None:
        """A stream of the mesh's: the DERP channel, a peer_splice or a peer_ticket."""
        if isinstance(opened, messages.PeerSplice):
            await self._splice(stream, header, claims, member, opened)
        elif isinstance(opened, messages.PeerTicket):
            await self._ticket(stream, header, claims, member, opened)
        else:
            await self._derp(stream, header, claims, member)

    async def _splice(
        self,
        stream: Stream,
        header: MessageStream,
        claims: Claims,
        member: Member | None,
        request: messages.PeerSplice,
    ) -> None:
        """Join this stream to the one the named peer opens for it (``relay/splice.py``)."""
        arrival = Arrival(stream, header)
        try:
            if member is None:
                self.mesh.rejected("not_joined", claims.tenant_id, "peer_splice before mesh_join")
                raise Unauthorized("join the mesh (mesh_join) before peer_splice")
            if self.draining:
                raise ServerUnavailable("the relay is restarting")
            pairing = await self.splicer.meet(
                member, request, arrival, self.limits.handshake_timeout
            )
        except CloudBridgeError as error:
            self.metrics.tunnels_rejected.labels(error.code).inc()
            log.info("peer_splice_rejected", tenant_id=claims.tenant_id, code=error.code)
            await _reject(stream, error)
            return
        if pairing is None:  # the peer's side ran the copy
            return
        self.streams_active += 1
        self._streams_idle.clear()
        try:
            clean = await self.splicer.join(pairing, self.limits.buffer_size)
        finally:
            self.streams_active -= 1
            if not self.streams_active:
                self._streams_idle.set()
        self.metrics.derp_bytes.inc(sum(pairing.moved))
        log.debug(
            "peer_splice_closed",
            tenant_id=claims.tenant_id,
            moved=pairing.moved,
            clean=clean,
        )

    async def _resolve(self, tenant: str, target: str) -> tuple[int, tuple[Any, ...]]:
        decided = self.egress.decided(tenant, target)
        if decided is not None:
            return decided
        try:
            # resolved once and checked address by address: the address dialled is one
            # the policy judged, never the name again (which could re-resolve elsewhere)
            async with asyncio.timeout(self.limits.connect_timeout):
                return await self.egress.resolve(tenant, target)
        except TimeoutError as exc:
            raise TargetUnreachable(f"cannot resolve {target} in time") from exc

    async def _ticket(
        self,
        stream: Stream,
        header: MessageStream,
        claims: Claims,
        member: Member | None,
        request: messages.PeerTicket,
    ) -> None:
        """A ticket for a raw connection to the TLS port (``relay/tickets.py``)."""
        try:
            if member is None:
                self.mesh.rejected("not_joined", claims.tenant_id, "peer_ticket before mesh_join")
                raise Unauthorized("join the mesh (mesh_join) before peer_ticket")
            if self.draining:
                raise ServerUnavailable("the relay is restarting")
            ticket = self.tickets.issue(member, request)
        except CloudBridgeError as error:
            self.metrics.tunnels_rejected.labels(error.code).inc()
            log.info("peer_ticket_rejected", tenant_id=claims.tenant_id, code=error.code)
            await _reject(stream, error)
            return
        with contextlib.suppress(TransportError):
            await header.send(ticket)
            await stream.close_write()

    async def _dial(self, target: str, family: int, address: tuple[Any, ...]) -> socket.socket:
        sock = prepare(socket.socket(family, socket.SOCK_STREAM))
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                await connect(sock, address)
        except TimeoutError as exc:
            sock.close()
            raise ConnectionTimeout(f"{target} did not answer in time") from exc
        except OSError as exc:
            sock.close()
            raise TargetUnreachable(f"cannot connect to {target}: {exc.strerror or exc}") from exc
        return sock


def _source_address(session: Session) -> str | None:
    """The session's source address where its transport knows it (rates are also limited
    per address)."""
    address = getattr(session, "peer_address", None)
    return address if isinstance(address, str) else None


def _unscoped(address: tuple[Any, ...]) -> bool:
    """Whether ``address`` is whole as a host and a port: not an IPv6 address with a scope
    id (a link-local one), which the loop's ``create_connection`` would drop."""
    return len(address) == 2 or not address[3]


def _check_not_expired(claims: Claims) -> None:
    """A token the validator let through within its clock-skew leeway but past ``exp`` here
    gives a session no rights: refused now rather than ended right after the welcome."""
    now = time.time()
    if claims.expires_at <= now:
        raise TokenExpired(
            f"token expired at {_utc(claims.expires_at)}; relay time is {_utc(now)}",
            hint="obtain a new token",
        )


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _accept(stream: Stream, header: MessageStream, target: socket.socket) -> int:
    """Accept a tunnel and send its target what came with the open; return how much."""
    if isinstance(stream, MuxStream) and stream.direct:
        # the client does not wait for it (client/opening.py): it goes out with the
        # target's first bytes, in one record, when they come soon enough
        stream.send_soon(ACCEPT, ACCEPT_JOINS_DATA_WITHIN)
    else:
        await header.send(messages.Accept())
    early = header.take_buffered()
    if early:
        await asyncio.get_running_loop().sock_sendall(target, early)
    return len(early)


async def _close_quietly(session: Session) -> None:
    with contextlib.suppress(CloudBridgeError):  # it is going anyway: nothing to report
        await session.aclose()


async def _until_read(control: Stream) -> None:
    """Until the client has read the relay's last answer and gone (a client closes its
    session on a refusal), for :data:`ANSWER_LINGER` at most: closing the session at once
    can overtake the answer (QUIC's close fails the stream's unread data, gRPC's cancels
    the call), and a refused token would then look like a lost connection, to be retried."""
    with contextlib.suppress(TransportError, TimeoutError):
        async with asyncio.timeout(ANSWER_LINGER):
            await control.close_write()
            while await control.read():
                pass


async def _reject(stream: Stream, error: CloudBridgeError) -> None:
    with contextlib.suppress(TransportError):
        await MessageStream(stream).send(messages.Reject(error.code, error.message))
        await stream.close_write()
