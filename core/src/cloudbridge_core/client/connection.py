"""Connecting to the relay: pick a transport, authenticate, open tunnel streams."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudbridge_core import __version__
from cloudbridge_core.client.opening import OpeningStream
from cloudbridge_core.client.tokens import token_exp
from cloudbridge_core.config import Config
from cloudbridge_core.errors import (
    CloudBridgeError,
    ConnectionTimeout,
    HeartbeatFailed,
    ProviderNotInstalled,
    TokenExpired,
    TransportClosed,
    error_for_code,
)
from cloudbridge_core.log import get_logger
from cloudbridge_core.plugins import Plugins, transport_port
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import (
    Endpoint,
    ProviderSpec,
    Session,
    Stream,
    TlsMaterial,
    Transport,
)
from cloudbridge_core.settings import RelaySettings, RelayTlsSettings
from cloudbridge_core.tlsutil import client_context
from cloudbridge_core.wire import MessageStream

log = get_logger("relay.client")

CAPABILITIES = ("mux", "tunnel", "queue", messages.MESH_REPORT, messages.DEGRADED)
#: how long a connected session's host may take to resolve for ``status`` (else its name)
RESOLVE_FOR_STATUS_SECONDS = 1.0
#: what ends a hello's wait
ANSWERS = (messages.Welcome, messages.ErrorMessage)


@dataclass(eq=False)
class RelayConnection:
    """An authenticated session with the relay.

    ``leases`` counts tunnelled connections using it, so that a connection the client has
    moved away from is closed only once they have finished. ``going_away`` is the relay's
    notice that it is about to restart; ``on_goaway`` hears it when it comes.
    ``token_expires_at`` is when the relay ends the session unless :meth:`refresh` gives it
    a newer token; ``ended`` is the relay's reason when it ended the session for that.
    ``turn_credentials`` are the latest TURN credentials the relay issued on this session
    (``server.turn``: sent with the answer to ``mesh_join``, then renewed). ``relay`` is the
    host (from ``relay.hosts``, or ``relay.host``) the session is with, ``address`` and
    ``port`` where that host was reached.
    """

    session: Session
    welcome: messages.Welcome
    transport: str
    control: MessageStream
    relay: str = ""
    address: str = ""
    port: int = 0
    leases: int = 0
    going_away: messages.Goaway | None = None
    on_goaway: Callable[[RelayConnection], None] | None = None
    #: hears every other message the relay sends on the control stream (the mesh's)
    on_message: Callable[[messages.Message], None] | None = None
    token_expires_at: float | None = None
    ended: TokenExpired | None = None
    turn_credentials: messages.TurnCredentials | None = None
    _pongs: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    _challenge: messages.MeshChallenge | None = None
    _challenged: asyncio.Event = field(default_factory=asyncio.Event)  # or the stream ended
    _refreshing: asyncio.Future[messages.Message] | None = None
    _reader: asyncio.Task[None] | None = None
    #: why the control stream ended (the session's own reason: a stateless reset, ICMP)
    _end_reason: str = ""

    def __post_init__(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read_control())

    async def mesh_challenge(self, within: float) -> messages.MeshChallenge:
        """The session's challenge, which a ``mesh_join`` has to answer (sent after welcome)."""
        try:
            await asyncio.wait_for(self._challenged.wait(), within)
        except TimeoutError:
            raise HeartbeatFailed(
                f"no mesh_challenge over {self.transport} in {within:g}s"
            ) from None
        if self._challenge is None:
            raise self._stream_ended()
        return self._challenge

    def _stream_ended(self) -> TransportClosed:
        why = f": {self._end_reason}" if self._end_reason else ""
        return TransportClosed(f"the {self.transport} session's control stream has ended{why}")

    async def refresh(self, token: str, within: float) -> float:
        """Move this session onto ``token`` (same tenant and subject); its new ``exp``.

        Raises the relay's classified refusal (``Unauthorized``, ``TokenExpired``,
        ``InvalidToken``) or ``HeartbeatFailed`` when no answer comes within ``within``.
        """
        if self._refreshing is not None:
            raise TransportClosed("a refresh is already under way on this session")
        self._refreshing = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(within):
                await self.control.send(messages.Refresh(token))
                reply = await self._refreshing
        except TimeoutError:
            raise HeartbeatFailed(f"no answer to refresh over {self.transport}") from None
        finally:
            self._refreshing = None
        if isinstance(reply, messages.RefreshFailed):
            raise error_for_code(reply.code, reply.message)
        assert isinstance(reply, messages.Refreshed)  # the reader resolves only these two
        self.token_expires_at = reply.expires_at
        return reply.expires_at

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[RelayConnection]:
        """Hold the connection for one tunnelled connection."""
        self.leases += 1
        try:
            yield self
        finally:
            self.leases -= 1

    async def ping(self, within: float) -> float:
        """The round-trip time to the relay over this session, in seconds."""
        if self._reader is None or self._reader.done():
            raise self._stream_ended()
        nonce = secrets.randbits(31)
        answered = asyncio.get_running_loop().create_future()
        self._pongs[nonce] = answered
        started = time.perf_counter()
        try:
            async with asyncio.timeout(within):
                await self.control.send(messages.Ping(nonce))
                await answered
        except TimeoutError:
            raise HeartbeatFailed(f"no pong over {self.transport} in {within:g}s") from None
        finally:
            del self._pongs[nonce]
        return time.perf_counter() - started

    async def _read_control(self) -> None:
        """Read the control stream until it ends, then fail the requests still waiting."""
        try:
            while True:
                self._dispatch(await self.control.receive())
        except CloudBridgeError as error:
            self._end_reason = error.message
            ended = self._stream_ended()
            waiting: list[asyncio.Future[Any]] = [*self._pongs.values()]
            if self._refreshing is not None:
                waiting.append(self._refreshing)
            for future in waiting:
                if not future.done():
                    future.set_exception(ended)
        finally:
            self._challenged.set()

    def _dispatch(self, message: messages.Message) -> None:
        """Pongs answer pings, refresh replies the refresh; a goaway, the mesh challenge, TURN
        credentials and the relay's token_expired are kept; the rest goes to ``on_message``."""
        if isinstance(message, messages.Pong):
            waiting = self._pongs.get(message.nonce)
            if waiting is not None and not waiting.done():
                waiting.set_result(None)
        elif isinstance(message, messages.Goaway):
            self.going_away = message
            if self.on_goaway is not None:
                self.on_goaway(self)
        elif isinstance(message, messages.MeshChallenge):
            self._challenge = message
            self._challenged.set()
        elif isinstance(message, messages.TurnCredentials):
            self.turn_credentials = message
            log.debug("turn_credentials", transport=self.transport, expires_at=message.expires_at)
        elif isinstance(message, messages.Refreshed | messages.RefreshFailed):
            if self._refreshing is not None and not self._refreshing.done():
                self._refreshing.set_result(message)
        elif isinstance(message, messages.ErrorMessage) and message.code == TokenExpired.code:
            self.ended = TokenExpired(message.message)  # the relay is closing the session
        elif self.on_message is not None:
            self.on_message(message)

    async def open_tunnel(self, target: str) -> tuple[Stream, bytes]:
        """A stream connected by the relay to ``target``; raises the relay's classified error."""
        stream = await self.session.open_stream()
        header = MessageStream(stream)
        await header.send(messages.Open(target))
        reply = await header.expect(messages.Accept, messages.Reject)
        if isinstance(reply, messages.Reject):
            with contextlib.suppress(CloudBridgeError):
                await stream.aclose()
            raise error_for_code(reply.code, reply.message)
        return stream, header.take_buffered()

    async def open_tunnel_at_once(
        self, target: str, first: bytes, accepted: Callable[[], None]
    ) -> OpeningStream:
        """A stream to ``target`` carrying ``first`` right behind its ``open``, without
        waiting for the relay's answer: the stream reads the answer off the front of what
        comes back, calls ``accepted`` on an accept and fails on a reject (see
        :mod:`~cloudbridge_core.client.opening`)."""
        stream = await self.session.open_stream()
        await stream.write(messages.encode(messages.Open(target)) + first)
        return OpeningStream(stream, accepted)

    async def aclose(self) -> None:
        await self.session.aclose()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


def tls_for(tls: RelayTlsSettings) -> tuple[ssl.SSLContext, TlsMaterial]:
    """The relay's TLS context and material; the CA file is read again each time (a new
    CA applies at the next connection), the context is built once per CA and settings."""
    ca = Path(tls.ca_file).read_bytes() if tls.ca_file else None
    if not tls.verify_cert:
        log.warning(
            "tls_verification_disabled",
            note="relay.tls.verify_cert is false: anyone can impersonate the relay",
        )
    return _client_context(ca, tls.min_version, tls.verify_cert), TlsMaterial(
        ca=ca, verify=tls.verify_cert
    )


@functools.lru_cache(maxsize=8)
def _client_context(ca: bytes | None, min_version: str, verify: bool) -> ssl.SSLContext:
    """Built once: loading the system's CAs took 23 ms of CPU, each reconnection attempt."""
    context = client_context(ca)
    if min_version == "1.2":
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def relay_hosts(relay: RelaySettings) -> tuple[str, ...]:
    """The relays to try, in order: ``relay.hosts`` when set, else ``relay.host`` (a host
    listed twice is tried once)."""
    return tuple(dict.fromkeys(relay.hosts or (relay.host,)))


def transport_order(config: Config, plugins: Plugins) -> list[tuple[str, ProviderSpec[Transport]]]:
    """The transports to try, best first: the one configured, or every installed one.

    Raises ``ConfigError`` naming ``transport.<name>.port`` for one without a port.
    """
    mode = config.settings.transport.mode
    if mode != "auto":
        spec = plugins.require("transport", mode)
        transport_port(mode, config.data)
        return [(mode, spec)]
    preferred = config.settings.transport.prefer_protocol
    candidates = list(plugins.transports().items())
    candidates.sort(key=lambda item: item[0] != preferred)
    if not candidates:
        raise ProviderNotInstalled("no transport is installed and enabled")
    for name, _spec in candidates:
        transport_port(name, config.data)
    return candidates


@functools.lru_cache(maxsize=16)
def _loaded(spec: ProviderSpec[Transport], settings: str) -> Transport:
    """One transport object per provider and settings, kept across reconnections: what it
    learns (QUIC's session tickets, for resumption) serves the next attempt."""
    return spec.load(json.loads(settings))


@dataclass(frozen=True)
class Comeback:
    """What a client coming back tells the relay in its hello: the session it lost
    (``replaces``) and the slot the relay reserved for it when pacing its admissions."""

    replaces: str = ""
    slot: str = ""


FIRST_TIME = Comeback()


async def attempt(
    config: Config,
    name: str,
    spec: ProviderSpec[Transport],
    token: str,
    comeback: Comeback = FIRST_TIME,
    on_queued: Callable[[], None] | None = None,
    host: str | None = None,
    server_name: str | None = None,
) -> RelayConnection:
    """Connect over one transport to ``host`` (default ``relay.host``) and authenticate,
    within ``transport.connect_timeout`` (and the wait a relay pacing its admissions names,
    ``queued``: ``on_queued`` hears it). Every relay of a cluster shares the CA
    (``relay.tls.ca_file``); the name checked in the certificate is ``server_name`` (the
    relay's name, when ``host`` is one of its addresses), else ``host``."""
    context, material = tls_for(config.settings.relay.tls)
    timeout = config.settings.transport.connect_timeout
    settings = json.dumps(config.section(f"transport.{name}"), sort_keys=True)
    transport = _loaded(spec, settings)
    port = transport_port(name, config.data)
    host = host or config.settings.relay.host
    endpoint = Endpoint(host, port, context, timeout, material=material, server_name=server_name)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            session = await transport.connect(endpoint)
    except TimeoutError:
        raise ConnectionTimeout(
            f"no {name} connection to the relay in {timeout:g}s",
            hint=f"nothing answered at {host}:{port}: a host that is down or a firewall that"
            f" drops the packets looks like this; check relay.host and transport.{name}.port",
        ) from None
    hello = messages.Hello(
        token=token,
        client_version=__version__,
        capabilities=CAPABILITIES,
        replaces=comeback.replaces,
        slot=comeback.slot,
    )
    remaining = timeout - (time.perf_counter() - started)
    reply, control = await _introduce(session, hello, name, remaining, timeout, on_queued)
    try:
        address = await _address_of(host)
    except BaseException:  # cancelled: this attempt lost its race
        await session.aclose()
        raise
    relay = server_name or host
    log.info(
        "connected",
        transport=name,
        relay=relay,
        tenant_id=reply.tenant_id,
        session_id=reply.session_id,
        latency_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    return RelayConnection(
        session,
        reply,
        name,
        control,
        relay=relay,
        address=address,
        port=port,
        token_expires_at=token_exp(token),
    )


async def _address_of(host: str) -> str:
    """The address ``host`` names, for ``status`` (the transport resolved it itself when it
    connected: this asks the resolver again, which answers from its cache)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_FOR_STATUS_SECONDS):
            found = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        return host
    return str(found[0][4][0]) if found else host


async def _introduce(
    session: Session,
    hello: messages.Hello,
    transport: str,
    within: float,
    patience: float,
    on_queued: Callable[[], None] | None,
) -> tuple[messages.Welcome, MessageStream]:
    """Send ``hello`` and wait ``within`` seconds for the welcome, or the wait the relay
    names (``queued``) plus ``patience``; a relay that takes the connection and never
    answers (hung past its accept loop) would otherwise hold the client forever."""
    started = time.perf_counter()
    try:
        try:
            async with asyncio.timeout(within) as limit:
                control = MessageStream(
                    await session.open_stream(), messages.MAX_RELAY_MESSAGE_SIZE
                )
                await control.send(hello)
                reply = await control.expect(*ANSWERS, messages.Queued)
                if isinstance(reply, messages.Queued):  # held by the relay until its turn
                    log.info("relay_queued", transport=transport, wait_seconds=reply.wait_seconds)
                    if on_queued is not None:
                        on_queued()
                    now = asyncio.get_running_loop().time()
                    limit.reschedule(now + reply.wait_seconds + patience)
                    reply = await control.expect(*ANSWERS)
        except TimeoutError:
            raise ConnectionTimeout(
                f"the relay took the {transport} connection but sent no answer to its hello"
                f" in {time.perf_counter() - started:.1f}s",
                # what answers there may speak TLS without being this transport's listener
                hint=f"is transport.{transport}.port the port the relay prints for"
                f" {transport}? (a relay too busy to answer looks alike)",
            ) from None
        if isinstance(reply, messages.ErrorMessage):
            raise error_for_code(
                reply.code, reply.message, reply.retry_in_seconds or None, reply.slot
            )
    except BaseException:
        await session.aclose()
        raise
    assert isinstance(reply, messages.Welcome)  # expect() allowed only these kinds
    return reply, control
