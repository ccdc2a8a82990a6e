"""Staying on the best transport to the relay: race to connect, watch the RTT, move, come back.

``transport.mode: auto`` starts the preferred transport first and the next one after a
short head start (Happy Eyeballs), so a blocked QUIC costs ``race_head_start``, not a
whole ``connect_timeout``. Every ``health_check_interval`` the link pings the relay:
a lost session is replaced; an RTT above ``rtt_threshold`` makes it probe the other
transports and move to one that is clearly better (hysteresis); while on a fallback it
tries the preferred transports again and moves back when they work (fall-forward).
New tunnelled connections go to the new session; open ones finish on the old one.

With several relays (``relay.hosts``) every race is also across relays (see
:mod:`~cloudbridge_core.client.race`): a lost session is replaced on whichever relay
answers first, so the client fails over to another relay and back without a restart.

A session lasts as long as its token: before ``exp`` the link presents a newer token on it
(``refresh``) when its token source has one; otherwise the relay ends the session and the
link reconnects with whatever token there is then — an expired one is reported, with how
to get another.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from cloudbridge_core.breaker import BreakerState, CircuitBreaker
from cloudbridge_core.client.connection import (
    FIRST_TIME,
    Comeback,
    RelayConnection,
    attempt,
    relay_hosts,
    transport_order,
)
from cloudbridge_core.client.metrics import ClientMetrics
from cloudbridge_core.client.race import Candidate, race_relays
from cloudbridge_core.client.tokens import ONBOARDING_HINT, TokenSupply, token_exp
from cloudbridge_core.config import Config
from cloudbridge_core.config.changes import ConfigChanges
from cloudbridge_core.errors import (
    AuthError,
    CircuitOpen,
    CloudBridgeError,
    HeartbeatFailed,
    ServerUnavailable,
    TlsVerificationFailed,
    TokenExpired,
    TransportClosed,
    TransportError,
)
from cloudbridge_core.log import get_logger
from cloudbridge_core.plugins import Plugins, transport_port
from cloudbridge_core.providers import ProviderSpec, Transport
from cloudbridge_core.retry import reconnect_delay

log = get_logger("relay.link")

#: a probe must win by this much and be under this share of the current RTT to move
SWITCH_MARGIN_SECONDS = 0.010
SWITCH_RATIO = 2 / 3
#: pings per RTT measurement; the minimum is kept (queueing only ever adds delay)
PINGS_PER_MEASUREMENT = 3
SWITCH_HISTORY = 20
#: below this, QUIC in Python is CPU-bound well under the TCP-based transports
SMALL_DATAGRAMS = 4096
#: a session's token is refreshed this long before its exp (or at half its remaining life)
REFRESH_LEAD_SECONDS = 60.0
#: closer to exp than this, a refresh is not tried again: the relay is about to end the session
REFRESH_FLOOR_SECONDS = 0.5

SwitchListener = Callable[[str, str | None, str], None]


def clearly_better(probe_rtt: float, current_rtt: float) -> bool:
    """The hysteresis rule: at least 10 ms faster and under 2/3 of the current RTT."""
    return (
        probe_rtt <= current_rtt - SWITCH_MARGIN_SECONDS and probe_rtt < current_rtt * SWITCH_RATIO
    )


class RelayLink:
    """The client's connection to the relay, on whichever transport is best right now."""

    def __init__(
        self, config: Config, plugins: Plugins, metrics: ClientMetrics | None = None
    ) -> None:
        self._config = config
        self._plugins = plugins
        self.tokens = TokenSupply(config, plugins)
        self._metrics = metrics
        self._current: RelayConnection | None = None
        self._retired: set[RelayConnection] = set()
        self._switching = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self.reason = ""
        self.since = 0.0
        self.rtt_seconds: float | None = None
        self.switches: deque[dict[str, Any]] = deque(maxlen=SWITCH_HISTORY)
        self.probes: dict[str, dict[str, Any]] = {}
        self.last_error: str | None = None
        self.on_switch: list[SwitchListener] = []
        if metrics is not None:
            self.on_switch.append(metrics.transport_selected)
        self._closing: set[asyncio.Task[None]] = set()
        self._followers: set[asyncio.Task[None]] = set()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._refused = asyncio.Event()
        #: the relay's refusal of this client's token, once it came (nothing retries it)
        self.refusal: AuthError | None = None
        self.state = "connecting"

    # ---- lifecycle ----

    async def start(
        self,
        *,
        keep_trying: bool = False,
        waiting: Callable[[CloudBridgeError], None] | None = None,
    ) -> None:
        """Connect; a relay pacing its admissions is waited for (it said when).

        With ``keep_trying`` a retryable failure (nothing listens, no route, a timeout) is
        tried again with the reconnection's backoff until it works, as a client that boots
        before the network or the relay must; ``waiting`` hears each failure whose cause
        differs from the one before (to tell the user once what it waits for). Otherwise,
        and always for a refused token or any other non-retryable error, it is raised.
        """
        comeback = FIRST_TIME
        began = time.monotonic()
        cause = ""
        attempt = 0
        while True:
            try:
                connection, reason = await self._race(self._candidates(), comeback)
                break
            except AuthError:
                self.state = "refused"
                raise
            except CloudBridgeError as error:
                paced = error.retry_after is not None and not isinstance(error, CircuitOpen)
                if not paced and not (keep_trying and error.retryable):
                    raise
                attempt += 1
                comeback = Comeback(slot=error.slot)
                self.last_error = error.message
                delay = reconnect_delay(
                    error, time.monotonic() - began, self._config.settings.retry
                )
                now = _cause_of(error)
                if paced:
                    log.info("relay_busy", reason=error.message)
                elif now != cause:
                    # the caller tells the user these words itself: not twice on the terminal
                    (log.warning if waiting is None else log.debug)(
                        "relay_unreachable", code=error.code, reason=error.message
                    )
                    if waiting is not None:
                        waiting(error)
                else:
                    log.debug(
                        "connect_retry",
                        attempt=attempt,
                        code=error.code,
                        retry_in_seconds=round(delay, 3),
                    )
                cause = now
                await asyncio.sleep(delay)
        self._install(connection, reason)
        self._watcher = asyncio.create_task(self._watch())

    async def wait_refused(self) -> AuthError:
        """Until the relay refuses this client's token for good: what a long-running command
        stops with (exit 4), since no retry would change the answer."""
        await self._refused.wait()
        assert self.refusal is not None  # set before the event
        return self.refusal

    def lost(self, connection: RelayConnection) -> None:
        """A tunnel found the session dead: check now rather than at the next interval."""
        if connection is self._current:
            self._connected.clear()
            self._wake.set()

    def check_soon(self) -> None:
        """Something carried over the session went silent: check it now (a heartbeat within
        ``connect_timeout``) rather than at the next interval."""
        self._wake.set()

    def _going_away(self, connection: RelayConnection) -> None:
        """The relay announced a restart: new tunnelled connections wait for it to return
        instead of being refused by a draining relay; open ones go on until it closes."""
        if connection is not self._current or connection.going_away is None:
            return
        self._connected.clear()
        self.state = "reconnecting"
        self.last_error = f"the relay is {connection.going_away.reason}"
        log.info(
            "relay_going_away",
            transport=connection.transport,
            session_id=connection.welcome.session_id,
            reason=connection.going_away.reason,
            reconnect_in_seconds=connection.going_away.reconnect_in_seconds,
        )

    async def aclose(self) -> None:
        for task in (self._watcher, *self._followers):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._watcher, *self._followers) if t), return_exceptions=True
        )
        for connection in (*self._retired, *([self._current] if self._current else [])):
            await connection.aclose()
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._retired.clear()
        self._current = None

    async def apply(self, config: Config) -> None:
        """Take a reloaded config. A changed ``transport.mode``, relay address or TLS, or
        transport section moves the client to a new session now (open tunnelled
        connections finish on the old one); the rest applies from its next use (the next
        check, race, retry, token, and the circuit breakers' next decision)."""
        changes = ConfigChanges.between(self._config, config)
        self._config = config
        self.tokens = TokenSupply(config, self._plugins)
        for breaker in self._breakers.values():
            breaker.settings = config.settings.retry.circuit_breaker
        moved = [key for key in changes.changed if _moves_the_session(key)]
        if not moved:
            return
        mode = config.settings.transport.mode
        what = (
            f"transport.mode changed to {mode}"
            if "transport.mode" in moved
            else f"{', '.join(moved)} changed"
        )
        async with self._switching:
            try:
                connection, why = await self._race(self._candidates())
            except CloudBridgeError as error:
                self.last_error = error.message
                log.warning("reconnect_after_reload_failed", changed=moved, reason=error.message)
                return
            self._install(connection, f"{what}; {why}")

    # ---- what the rest of the client uses ----

    @property
    def current(self) -> RelayConnection:
        if self._current is None:
            raise TransportError("not connected to the relay")
        return self._current

    @property
    def tenant_id(self) -> str | None:
        """The tenant the relay put this client in (from its token)."""
        return self._current.welcome.tenant_id if self._current else None

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[RelayConnection]:
        """The current connection, held for one tunnelled connection.

        While the relay is away this waits up to ``relay.connect_timeout`` for it to return.
        """
        if not self._connected.is_set():
            wait = self._config.settings.relay.connect_timeout
            try:
                await asyncio.wait_for(self._connected.wait(), wait)
            except TimeoutError:
                raise ServerUnavailable(
                    f"the relay did not come back within {wait:g}s ({self.last_error})"
                ) from None
        connection = self.current
        async with connection.use():
            try:
                yield connection
            except TransportClosed:
                self.lost(connection)
                raise
        if connection in self._retired and connection.leases == 0:
            self._retired.discard(connection)
            await connection.aclose()

    def relay_status(self) -> dict[str, Any]:
        """The relays configured and the one the session is on, for ``status --json``."""
        current = self._current
        return {
            "hosts": list(relay_hosts(self._config.settings.relay)),
            "connected_to": {
                "host": current.relay,
                "address": current.address,
                "port": current.port,
            }
            if current
            else None,
        }

    def status(self) -> dict[str, Any]:
        """The ``transport`` object of ``cloudbridge status --json``."""
        current = self._current
        datagram_size = getattr(current.session, "datagram_size", None) if current else None
        return {
            "state": self.state,
            "name": current.transport if current else None,
            "reason": self.reason,
            "mode": self._config.settings.transport.mode,
            "since": self.since,
            "rtt_seconds": self.rtt_seconds,
            "session_id": current.welcome.session_id if current else None,
            "draining": [c.transport for c in self._retired],
            "switches": list(self.switches),
            "probes": self.probes,
            "last_error": self.last_error,
            "datagram_size": datagram_size,
            "note": _slow_quic_note(datagram_size),
            "circuits": {name: str(b.state) for name, b in self._breakers.items()},
        }

    # ---- health ----

    async def _watch(self) -> None:
        while True:
            interval = self._config.settings.transport.health_check_interval
            if self._current is not None:  # the relay reaps sessions that ping less often
                interval = min(interval, self._current.welcome.heartbeat_interval_seconds)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that
            # comes as the wait ends (aclose cancelling while a lost session wakes it), and
            # the link then reconnected forever after it was closed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with self._switching:
                    await self.check()
            except AuthError as error:  # reported once; retrying would only repeat it
                self.state = "refused"
                self.last_error = error.message
                self.refusal = type(error)(
                    f"the relay refused this client's token: {error.message}",
                    hint=error.hint or f"get a new token: {ONBOARDING_HINT}",
                )
                log.error(
                    "reconnect_refused",
                    code=error.code,
                    reason=error.message,
                    hint=self.refusal.hint,
                )
                self._refused.set()
                return
            except CloudBridgeError as error:
                self.last_error = error.message
                log.warning("health_check_failed", code=error.code, reason=error.message)

    async def check(self) -> None:
        """One health round: replace a lost session, or move to a better transport."""
        current = self.current
        try:
            self.rtt_seconds = await self._measure(current)
        except CloudBridgeError as error:
            self.last_error = f"{current.transport} session lost: {error.message}"
            log.warning("session_lost", transport=current.transport, reason=error.message)
            announced = current.going_away
            await self._reconnect(
                f"{current.transport} session lost",
                replaces=current.welcome.session_id,
                spread=announced.reconnect_in_seconds if announced else 0.0,
            )
            return
        if self._config.settings.transport.mode != "auto" or current.going_away is not None:
            return
        candidates = [c for c in self._candidates() if c[0] != current.transport]
        preferred = [c for c in candidates if self._rank(c[0]) < self._rank(current.transport)]
        slow = self.rtt_seconds > self._config.settings.transport.rtt_threshold
        for name, spec in candidates if slow else preferred:
            probe_rtt, probe = await self._probe(name, spec)
            if probe is None:
                continue
            if clearly_better(probe_rtt, self.rtt_seconds):
                why = "lower latency" if slow else "fall-forward: preferred and no slower"
                self._install(probe, f"{why} ({_ms(probe_rtt)} vs {_ms(self.rtt_seconds)})")
                self.rtt_seconds = probe_rtt
                return
            if not slow and not clearly_better(self.rtt_seconds, probe_rtt):
                self._install(probe, f"fall-forward: {name} works again ({_ms(probe_rtt)})")
                self.rtt_seconds = probe_rtt
                return
            await probe.aclose()

    async def _follow(self, connection: RelayConnection) -> None:
        """Notice at once when the relay closes the session (a restart, a reaped session,
        an expired token), instead of at the next heartbeat; keep its token fresh until then."""
        fresh = asyncio.get_running_loop().create_task(self._keep_fresh(connection))
        try:
            with contextlib.suppress(TransportError):
                while True:
                    stream = await connection.session.accept_stream()
                    await stream.aclose()  # the relay opens no streams towards clients
        finally:
            fresh.cancel()
            await asyncio.gather(fresh, return_exceptions=True)
        if connection is self._current:
            reason = connection.ended.message if connection.ended else None
            log.info("session_closed_by_relay", transport=connection.transport, reason=reason)
        self.lost(connection)

    async def _keep_fresh(self, connection: RelayConnection) -> None:
        """Before the session's token expires, move the session onto a newer token when the
        token source has one (OIDC renewal, a new token in the file or the keyring); tried
        again at half the remaining time until shortly before ``exp``."""
        while connection.token_expires_at is not None:
            remaining = connection.token_expires_at - time.time()
            if remaining < REFRESH_FLOOR_SECONDS:
                return
            await asyncio.sleep(remaining - min(REFRESH_LEAD_SECONDS, remaining / 2))
            try:
                token = await self.tokens.token()
            except CloudBridgeError:
                continue  # none to offer now: the reconnection will report it
            exp = token_exp(token)
            if exp is None or exp <= connection.token_expires_at:
                continue  # not newer than the one the session runs on
            timeout = self._config.settings.transport.connect_timeout
            try:
                expires_at = await connection.refresh(token, timeout)
            except AuthError as error:
                log.warning("refresh_refused", code=error.code, reason=error.message)
                continue
            except CloudBridgeError:
                return  # the session is going: the reconnection takes over
            log.info(
                "session_refreshed",
                transport=connection.transport,
                expires_in_seconds=round(expires_at - time.time()),
            )

    async def _measure(self, connection: RelayConnection) -> float:
        """The best of a few pings, all within one ``connect_timeout``: the session counts as
        dead when none is answered in it, so a silent relay is found within
        ``health_check_interval + connect_timeout`` (pings travel on a reliable stream: a
        later one cannot be answered before an earlier one)."""
        timeout = self._config.settings.transport.connect_timeout
        rtts: list[float] = []
        tried = 0
        try:
            async with asyncio.timeout(timeout):
                for tried in range(1, PINGS_PER_MEASUREMENT + 1):  # noqa: B007 - for metrics
                    rtts.append(await connection.ping(timeout))
        except (TimeoutError, HeartbeatFailed):  # the deadline, or a ping's own one
            if not rtts:
                raise HeartbeatFailed(
                    f"no pong over {connection.transport} in {timeout:g}s"
                ) from None
        except TransportError as error:  # the session itself is gone: no point retrying
            raise HeartbeatFailed(f"{connection.transport} session ended: {error}") from None
        finally:
            if self._metrics is not None and connection is self._current:
                self._metrics.heartbeats(rtts, tried - len(rtts))
        return min(rtts)

    async def _reconnect(self, why: str, replaces: str, spread: float) -> None:
        """Race again until a transport works (never giving up: tunnel listeners stay open
        meanwhile); a refused token stops it at once.

        The relay's clients must not all come back in the same second: after a goaway the
        first attempt waits a random time within the relay's ``spread`` window, and after a
        failure :func:`reconnect_delay` decides (the relay's word, else full jitter over the
        outage so far). The relay is told which session this one ``replaces``, so that it
        closes it at once if it still holds it.
        """
        self._connected.clear()
        lost_at = time.monotonic()
        if spread:
            self.state = "reconnecting"
            await asyncio.sleep(random.uniform(0, spread))  # noqa: S311 - spreading, no secret
        attempt = 0
        comeback = Comeback(replaces)
        while True:
            if self._metrics is not None:
                self._metrics.reconnection_attempts.inc()
            try:
                connection, reason = await self._race(self._candidates(), comeback)
            except AuthError as error:
                self.state = "refused"
                self.last_error = error.message
                raise
            except CloudBridgeError as error:
                # a relay pacing its admissions, or restarting, said when: not a failure
                told = error.retry_after is not None and not isinstance(error, CircuitOpen)
                if self._metrics is not None and not told:
                    self._metrics.errors.labels(error.code).inc()
                outage = time.monotonic() - lost_at
                delay = reconnect_delay(error, outage, self._config.settings.retry)
                comeback = Comeback(replaces, error.slot)
                self.state = "reconnecting"
                self.last_error = f"reconnect attempt {attempt + 1} failed: {error.message}"
                (log.info if told else log.warning)(
                    "relay_busy" if told else "reconnect_failed",
                    attempt=attempt + 1,
                    code=error.code,
                    reason=error.message,
                    retry_in_seconds=round(delay, 3),
                )
                await asyncio.sleep(delay)
                attempt += 1
                continue
            self._install(connection, f"{why}; {reason}")
            log.info(
                "reconnected",
                transport=connection.transport,
                relay=connection.relay,
                session_id=connection.welcome.session_id,
                tenant_id=connection.welcome.tenant_id,
                attempts=attempt + 1,
                duration_ms=round((time.monotonic() - lost_at) * 1000, 1),
            )
            return

    async def _probe(self, name: str, spec: ProviderSpec[Transport]) -> tuple[float, Any]:
        """Connect over another transport and measure it; the result is kept for ``status``."""
        try:
            token = await self.tokens.token()
            current = self.current  # the same relay: its address, its certificate's name
            probe = await attempt(
                self._config,
                name,
                spec,
                token,
                host=current.address or current.relay,
                server_name=current.relay if current.address != current.relay else None,
            )
            try:
                rtt = await self._measure(probe)
            except BaseException:  # a failed ping, or the link closing mid-probe
                await probe.aclose()
                raise
        except CloudBridgeError as error:
            # an untrusted certificate is an attack or a misconfiguration, not a slow path
            report = log.error if isinstance(error, TlsVerificationFailed) else log.debug
            report("probe_failed", transport=name, code=error.code, reason=error.message)
            self.probes[name] = {"at": time.time(), "rtt_seconds": None, "error": error.message}
            return 0.0, None
        self.probes[name] = {"at": time.time(), "rtt_seconds": rtt, "error": None}
        return rtt, probe

    # ---- connecting ----

    def _candidates(self) -> list[Candidate]:
        return transport_order(self._config, self._plugins)

    def _rank(self, name: str) -> int:
        names = [candidate[0] for candidate in self._candidates()]
        return names.index(name) if name in names else len(names)

    async def _race(
        self, candidates: list[Candidate], comeback: Comeback = FIRST_TIME
    ) -> tuple[RelayConnection, str]:
        head_start = self._config.settings.transport.race_head_start
        hosts = relay_hosts(self._config.settings.relay)
        names = {name for name, _ in candidates}
        # the endpoints dialled so far (a relay's name is dialled at each of its addresses)
        everyone = [b for e, b in self._breakers.items() if e.partition("://")[0] in names]
        if all(breaker.state is BreakerState.OPEN for breaker in everyone):
            for breaker in everyone:  # every endpoint failed: the caller spaces tries
                breaker.try_now()
        token = await self.tokens.token()
        try:
            return await race_relays(
                self._config,
                hosts,
                candidates,
                head_start,
                token,
                self._transport_failed,
                lambda where: {name: self._breaker(name, where) for name, _ in candidates},
                comeback,
            )
        except TokenExpired as error:
            raise TokenExpired(
                f"the token from {self.tokens.where()} has expired ({error.message})",
                hint=f"get a new one: {ONBOARDING_HINT}",
            ) from None

    def _breaker(self, transport: str, host: str) -> CircuitBreaker:
        """One circuit breaker per relay endpoint (transport, address or host, and port)."""
        endpoint = f"{transport}://{host}:{transport_port(transport, self._config.data)}"
        if endpoint not in self._breakers:
            settings = self._config.settings.retry.circuit_breaker
            self._breakers[endpoint] = CircuitBreaker(
                endpoint, settings, on_transition=_breaker_moved
            )
        return self._breakers[endpoint]

    def _transport_failed(self, name: str, error: CloudBridgeError) -> None:
        if self._metrics is not None:
            self._metrics.connection_failures.labels(name).inc()
            self._metrics.errors.labels(error.code).inc()

    def _install(self, connection: RelayConnection, reason: str) -> None:
        previous = self._current
        self._current = connection
        connection.on_goaway = self._going_away
        follower = asyncio.get_running_loop().create_task(self._follow(connection))
        self._followers.add(follower)
        follower.add_done_callback(self._followers.discard)
        self.state = "connected"
        self._connected.set()
        self.reason = reason
        self.since = time.time()
        self.switches.append(
            {
                "at": self.since,
                "from": previous.transport if previous else None,
                "to": connection.transport,
                "reason": reason,
            }
        )
        log.info(
            "transport_selected",
            transport=connection.transport,
            relay=connection.relay,
            previous=previous.transport if previous else None,
            reason=reason,
        )
        for listener in self.on_switch:
            listener(connection.transport, previous.transport if previous else None, reason)
        if previous is not None:
            if previous.leases:
                self._retired.add(previous)  # closed when its last tunnelled connection ends
            else:
                closing = asyncio.get_running_loop().create_task(previous.aclose())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        if connection.going_away is not None:  # told before it was installed
            self._going_away(connection)


def _cause_of(error: CloudBridgeError) -> str:
    """What a failure says without its numbers (durations, attempt counts): a retry that
    fails the same way is not reported again."""
    return f"{error.code}:{re.sub(r'[0-9.]+', '#', error.message)}"


def _moves_the_session(key: str) -> bool:
    """Whether a changed key alters where or how the client reaches the relay: its address
    and TLS, the transport mode, or a transport's own section (``transport.quic.port``)."""
    return (
        key in ("relay.host", "relay.hosts", "transport.mode")
        or key.startswith("relay.tls.")
        or (key.startswith("transport.") and key.count(".") >= 2)
    )


def _breaker_moved(endpoint: str, before: BreakerState, after: BreakerState) -> None:
    """Opening and closing are news; the trial cycle of a relay that stays away (open,
    half-open, open again at every retry) is not: at debug, or a waiting client repeats
    a line per transport at each attempt."""
    trial = BreakerState.HALF_OPEN in (before, after) and BreakerState.CLOSED not in (before, after)
    (log.debug if trial else log.info)(
        "circuit_changed", endpoint=endpoint, previous=str(before), state=str(after)
    )


def _slow_quic_note(datagram_size: int | None) -> str | None:
    """Said in ``status`` because it is not obvious: QUIC's cost in Python is per packet."""
    if datagram_size is None or datagram_size >= SMALL_DATAGRAMS:
        return None
    return (
        f"QUIC with {datagram_size}-byte datagrams (the path MTU) moves several times fewer"
        " bytes per CPU second than tls, websocket or grpc; for bulk transfers set"
        " transport.mode: tls"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"
