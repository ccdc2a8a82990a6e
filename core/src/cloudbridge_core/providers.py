"""What plugins provide: typed provider specs and the interfaces of the providers.

Hooks are synchronous factories that return :class:`ProviderSpec` records. A spec is
cheap to build: its ``load`` callable imports the heavy library and returns the provider
object only when the core actually selects it. Every method that waits is ``async``;
long-lived objects are async resources with an idempotent ``aclose()``.

See ``docs/plugins/`` for worked examples of each interface.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from cloudbridge_core.transports.preauth import PreauthGate
    from cloudbridge_core.transports.sniff import RawSplices

ProviderT = TypeVar("ProviderT")

FAMILIES = ("transport", "auth_provider", "nat_strategy", "overlay", "exporter")


@dataclass(frozen=True)  # no slots: they break generic aliases' instantiation on 3.11
class ProviderSpec(Generic[ProviderT]):
    """One provider a plugin offers.

    ``name`` is the public name users select it by (``transport.mode: quic``).
    ``priority`` orders providers of one family: higher is preferred (TLS over WebSocket
    over gRPC over QUIC, by measured throughput; direct before TURN). ``load(settings)``
    builds the provider from the plugin's validated config section (``{}`` when it has
    none); it may import heavy libraries and may raise, which the core reports as a
    failure of that provider.
    """

    name: str
    load: Callable[[Mapping[str, Any]], ProviderT]
    priority: int = 0
    description: str = ""


@dataclass(frozen=True, slots=True)
class ConfigSection:
    """A plugin's own configuration section.

    ``path`` is dotted (``transport.quic``); ``schema`` is a JSON Schema (2020-12)
    fragment that validates the value found at that path.
    """

    path: str
    schema: Mapping[str, Any]


# ---- transports --------------------------------------------------------------------


class Stream(Protocol):
    """A reliable, ordered, bidirectional byte stream inside a :class:`Session`."""

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes``; ``b""`` once the peer has closed its side."""

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, waiting while the peer's window is full (flow control).

        The stream copies what it keeps, so the caller may reuse ``data``'s buffer.
        """

    async def close_write(self) -> None:
        """Half-close: the peer reads EOF, this side can still read."""

    async def aclose(self) -> None:
        """Close both directions; idempotent. Before the peer's EOF this is a reset."""

    async def reset(self) -> None:
        """Abortive close, the relayed form of a TCP RST: what is unsent is dropped, and
        the peer's reads fail with ``StreamAborted`` even after this side's EOF (a
        half-closed stream is reset too). Idempotent; a stream already finished or failed
        stays as it is."""


class Session(Protocol):
    """One connection to a peer carrying many independent streams."""

    async def open_stream(self) -> Stream: ...

    async def accept_stream(self) -> Stream:
        """Wait for the peer to open a stream; raises ``TransportClosed`` when closed."""

    def authenticated(self) -> None:
        """The relay has authenticated the peer: lift the pre-auth budget (more streams,
        full windows, no pre-auth deadline). Called once, on server sessions; idempotent.

        Sessions of transports written before this method may lack it: the relay then
        calls nothing and bounds the time to the hello itself.
        """

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The PEM behind an endpoint's SSL context, for transports doing TLS themselves (QUIC, gRPC).

    A server has ``certificate`` (the chain) and ``key`` (a secret: never log it); a client
    has ``ca`` (``None``: the system trust store) and ``verify``.
    """

    certificate: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    verify: bool = True


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a transport connects to or listens on.

    ``tls`` serves transports built on Python's ``ssl`` module, ``material`` the others.
    ``documents`` (path -> (content type, body)) are answered to plain HTTP GETs by
    transports that speak HTTP anyway (WebSocket): the relay's ``/.well-known/jwks.json``.
    ``preauth`` (serving only) is the relay's pre-auth budget: ask it for an admission
    when a connection is accepted, close the connection at once without one, finish the
    handshake by the admission's deadline and hand it to the session (see
    :mod:`cloudbridge_core.transports.preauth`). ``raw_splices`` (serving only) takes
    peers' raw connections, told from TLS clients by their preamble, on a listener that
    can (the built-in TLS transport's; see :mod:`cloudbridge_core.transports.sniff`).
    ``reset_key`` (serving only) is a secret the relay keeps across restarts, for
    transports whose stateless resets need one (QUIC's; see
    :mod:`cloudbridge_core.quic.reset`).
    ``server_name`` (connecting only) is the name the relay's certificate is checked
    against, and sent as SNI and HTTP ``Host`` where the transport sends them, when
    ``host`` is one of that name's addresses (the client resolves a relay's name itself
    and races its addresses); None means ``host``. See :attr:`verified_name`.
    """

    host: str
    port: int
    tls: ssl.SSLContext
    connect_timeout: float = 5.0
    documents: Mapping[str, tuple[str, bytes]] = field(default_factory=dict)
    material: TlsMaterial | None = None
    preauth: PreauthGate | None = None
    raw_splices: RawSplices | None = None
    reset_key: bytes | None = field(default=None, repr=False)  # a secret
    server_name: str | None = None

    @property
    def verified_name(self) -> str:
        """The name the relay's certificate must carry: ``server_name``, else ``host``."""
        return self.server_name or self.host


class Listener(Protocol):
    """A running server side of a transport."""

    @property
    def port(self) -> int:
        """The bound port (useful when listening on port 0)."""

    async def aclose(self) -> None: ...


class Transport(Protocol):
    """Carries bytes between a client and the relay; everything above is shared code."""

    async def connect(self, endpoint: Endpoint) -> Session: ...

    async def serve(
        self, endpoint: Endpoint, handler: Callable[[Session], Awaitable[None]]
    ) -> Listener: ...


# ---- auth ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claims:
    """The validated identity a token carries. Everything is scoped to ``tenant_id``."""

    subject: str
    tenant_id: str
    permissions: frozenset[str]
    expires_at: float
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: the token's id (``jti``) and when it was issued (``iat``), when it says: what a
    #: revocation names (``cloudbridge relay token revoke``)
    token_id: str | None = None
    issued_at: float | None = None


class AuthProvider(Protocol):
    """Validates bearer tokens on the relay.

    ``validate`` raises ``InvalidToken``, ``TokenExpired`` or ``Unauthorized``
    from :mod:`cloudbridge_core.errors`.
    """

    async def validate(self, token: str) -> Claims: ...


@dataclass(frozen=True, slots=True)
class AuthKeyStatistics:
    """What an auth provider that fetches its keys knows about them.

    ``loaded``: tokens can be checked (keys and, for OIDC, the issuer's metadata are in);
    ``stale``: the keys in use are past their refresh time because the provider has not
    answered (they are still used until it does); ``refresh_failures``: fetches that
    failed or ran out of time since start; ``problem``: why, when not loaded or stale.
    """

    loaded: bool
    stale: bool
    refresh_failures: int
    problem: str = ""


@runtime_checkable
class KeyedAuthProvider(AuthProvider, Protocol):
    """An :class:`AuthProvider` whose keys come from elsewhere (a JWKS, OIDC discovery).

    The relay calls ``load_keys`` when it starts (and again, with backoff, until it
    succeeds; ``/readyz`` stays not ready until then); it raises ``ServerUnavailable``
    when the provider cannot be reached or answers something unusable. ``statistics``
    never waits.
    """

    async def load_keys(self) -> None: ...

    def statistics(self) -> AuthKeyStatistics: ...


class TokenStore(Protocol):
    """Where the client keeps the tokens of one relay: the OS keyring or a 0600 file.

    ``kind`` is ``access`` (the bearer token the relay checks) or ``refresh``.
    """

    def load(self, kind: str = "access") -> str | None: ...

    def save(self, token: str, kind: str = "access") -> None: ...


class TokenSource(Protocol):
    """Client side of an auth provider that obtains and renews tokens itself (OIDC).

    The client calls it before each connection; it returns the stored access token, a
    renewed one (refresh token, client credentials) when that one is about to expire, or
    ``None`` when it has nothing (the user has to log in).
    """

    async def obtain_token(self, store: TokenStore) -> str | None: ...


class BrowserLogin(Protocol):
    """A person's login in a browser, for the relay's web console: the authorization code
    flow with PKCE (RFC 7636) against the auth provider's issuer.

    ``authorization_url`` is where the browser goes (carrying ``state`` and the challenge
    of ``code_verifier``); ``exchange`` trades the code the browser brings back for an access
    token, which the relay then validates like any other. Both raise classified errors
    (``AuthError``, ``ServerUnavailable``), never a library's.
    """

    async def authorization_url(self, redirect_uri: str, state: str, code_verifier: str) -> str: ...

    async def exchange(self, code: str, redirect_uri: str, code_verifier: str) -> str: ...


# ---- NAT traversal -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A peer of the same tenant, as the relay announces it; ``overlay_ip`` and
    ``overlay_key`` (its WireGuard public key) when it holds an overlay address."""

    peer_id: str
    name: str
    public_key: str
    endpoints: Sequence[str] = ()
    certificate: str = ""
    instance: str = ""
    overlay_ip: str = ""
    overlay_key: str = ""


class SignalChannel(Protocol):
    """What a NAT strategy has to reach one peer: signalling via the relay (ICE credentials,
    candidates), the ICE role, sealing for relayed packets, and streams to the relay.

    Both peers run each strategy at the same time; ``controlling`` is true on exactly one.
    The core's channel also has ``async turn_credentials() -> TurnCredentials | None`` (the
    relay-issued TURN credentials, ``server.turn``) and ``overlay_addresses() -> set[str]``
    (the tenant's overlay addresses, which no path may use); other channels may not, so
    strategies ask for them with ``getattr``.
    """

    @property
    def controlling(self) -> bool: ...

    async def send(self, message: Mapping[str, Any]) -> None: ...

    async def receive(self) -> Mapping[str, Any]: ...

    def seal(self, packet: bytes) -> bytes:
        """Encrypt a packet so that only the peer can read it (X25519, ChaCha20-Poly1305)."""

    def open(self, sealed: bytes) -> bytes:
        """Decrypt a packet from the peer; raises ``ProtocolViolation`` if it is not."""

    @property
    def local_key(self) -> bytes:
        """This device's X25519 public key (32 bytes), as the relay knows it."""

    async def open_relay_stream(self, target: str) -> Stream:
        """A stream to the relay over the client's current session (``derp``: DERP)."""


class PeerPath(Protocol):
    """A datagram path to a peer, as established by a NAT strategy.

    A path whose sends never wait (a UDP socket) may also offer a synchronous
    ``send_batch(datagrams: Sequence[bytes]) -> None`` that sends them all at once, in
    order, dropping what the network cannot take now (QUIC resends it); the peer session
    then hands it each transmit's datagrams directly. Without it, the session calls
    ``send`` for each, in order, from one task.

    Likewise a path may offer ``deliver_to(receiver: Callable[[bytes], None]) -> None``:
    from then on it calls ``receiver`` with each datagram as it arrives, and ``receive``
    returns only what arrived before and raises when the path ends.
    """

    @property
    def kind(self) -> str:
        """One of ``direct``, ``stun``, ``turn``, ``derp``."""

    @property
    def endpoint(self) -> str:
        """Where datagrams go, for ``status`` (``203.0.113.12:40000``, ``relay``)."""

    async def send(self, datagram: bytes) -> None: ...

    async def receive(self) -> bytes: ...

    async def aclose(self) -> None: ...


class NatStrategy(Protocol):
    """One way through NAT. Strategies are tried by descending ``priority``.

    A strategy may also offer a synchronous ``unavailable() -> str | None``: why it cannot
    work now (TURN without a server), or None. The peer manager then skips its attempts,
    saying why once at debug, instead of failing one every upgrade interval.
    """

    async def connect(self, peer: PeerInfo, signal: SignalChannel) -> PeerPath: ...


# ---- overlays and exporters ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OverlayInterface:
    """What the client asks an overlay to bring up: an interface ``name`` (at most 15
    characters, unique per tenant and device on the host), its ``addresses`` with the
    pool's prefix (``100.64.0.5/10``: the whole pool routes through it), this device's
    overlay ``private_key`` (base64 X25519; it never leaves the device and is never
    logged) and the ``mtu``."""

    name: str
    addresses: Sequence[str]
    private_key: str = field(repr=False)
    mtu: int = 1420


@dataclass(frozen=True, slots=True)
class OverlayPeer:
    """One peer as the overlay should hold it.

    ``endpoint`` is where its packets go now (``None``: no path yet). ``source_port``,
    when set, is the local UDP port they must leave from and arrive on: the port a NAT
    strategy punched (direct and STUN paths), which the overlay shares with the peer
    session's own datagrams (an overlay's packets are told apart by :meth:`Overlay.carries`).
    Without it the overlay sends from its own port: ``endpoint`` is then the client's
    local proxy for a path that passes through Python (TURN, DERP).
    """

    public_key: str
    allowed_ips: Sequence[str]
    endpoint: tuple[str, int] | None = None
    source_port: int | None = None
    keepalive_seconds: int = 25


@dataclass(frozen=True, slots=True)
class OverlayState:
    """What ``up`` brought up: the interface, how (``kernel``, ``wireguard-go``), and the
    local UDP port the overlay listens on (the client's proxies send to it)."""

    interface: str
    backend: str
    listen_port: int


class Overlay(Protocol):
    """An L3 overlay (WireGuard) over the paths to peers, driven by the client.

    Failures are raised as :class:`~cloudbridge_core.errors.OverlayFailed` naming what is
    missing (a capability, a program) or what failed; never a library's exception.
    """

    async def up(self, interface: OverlayInterface) -> OverlayState:
        """Create the interface, give it its addresses and routes, and bring it up. An
        interface of the same name left by an earlier run (one killed before ``down``) is
        removed first, with everything that run created for it."""

    async def update_peers(self, peers: Sequence[OverlayPeer]) -> None:
        """Make the overlay's peers exactly ``peers``: add the new, change the changed
        (a new endpoint keeps the peer's tunnel and the connections inside it), remove
        the rest."""

    def carries(self, datagram: bytes) -> bool:
        """Whether a datagram that arrived on a peer path is one of the overlay's own."""

    async def down(self) -> None:
        """Remove everything ``up`` and ``update_peers`` created; idempotent."""


class Exporter(Protocol):
    """Ships metrics from a prometheus-client registry somewhere."""

    async def start(self, registry: CollectorRegistry) -> None: ...

    async def stop(self) -> None:
        """Flush and stop; idempotent."""


@dataclass(frozen=True)
class AuthProviderSpec(ProviderSpec[AuthProvider]):
    """An auth provider: ``load`` builds the relay's validator; ``token_source``, when the
    provider can obtain tokens itself (OIDC), builds the client's side from the same
    settings section; ``browser_login``, when people can log in to the relay's console
    through it."""

    token_source: Callable[[Mapping[str, Any]], TokenSource] | None = None
    #: the relay console's browser login from the same settings section, or None when
    #: those settings name no client for it
    browser_login: Callable[[Mapping[str, Any]], BrowserLogin | None] | None = None


TransportSpec = ProviderSpec[Transport]
NatStrategySpec = ProviderSpec[NatStrategy]
OverlaySpec = ProviderSpec[Overlay]
ExporterSpec = ProviderSpec[Exporter]
