"""Assembling a running relay from config: state, auth provider, transports, listeners."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import json
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudbridge_core import exporters
from cloudbridge_core.config import Config
from cloudbridge_core.errors import (
    AddressInUse,
    CloudBridgeError,
    ConfigError,
    ConfigIssue,
    ProviderNotInstalled,
    ServerUnavailable,
)
from cloudbridge_core.httpd import Handler
from cloudbridge_core.log import get_logger
from cloudbridge_core.plugins import Plugins, transport_port
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import (
    AuthProvider,
    AuthProviderSpec,
    BrowserLogin,
    Endpoint,
    Listener,
    TlsMaterial,
    Transport,
)
from cloudbridge_core.relay.auth_keys import AuthKeysCollector, key_statistics, load_keys
from cloudbridge_core.relay.cluster.backend import open_store
from cloudbridge_core.relay.cluster.links import ClusterLinks
from cloudbridge_core.relay.cluster.metrics import ClusterMetrics
from cloudbridge_core.relay.cluster.store import ClusterStore, Handlers, RelayRecord
from cloudbridge_core.relay.egress import EgressPolicy
from cloudbridge_core.relay.invites import digest
from cloudbridge_core.relay.ipam import Ipam
from cloudbridge_core.relay.metrics import RelayMetrics
from cloudbridge_core.relay.server import Relay, RelayLimits
from cloudbridge_core.relay.state import RelayState, default_state_dir, local_hostnames
from cloudbridge_core.relay.tokens import AUDIENCE, issue_token, jwks
from cloudbridge_core.relay.turn import TurnIssuer
from cloudbridge_core.settings import ServerSettings, Settings
from cloudbridge_core.tlsutil import KeyPair, server_context

log = get_logger("relay")

JWKS_PATH = "/.well-known/jwks.json"
#: tokens given for invites last this long (at most server.max_token_ttl); the machine then
#: needs a new invite or token
INVITE_TOKEN_TTL = 30 * 24 * 3600.0


@dataclass
class RunningRelay:
    state: RelayState
    relay: Relay
    #: where clients reach this relay (``server.public_host``, else ``relay.host``)
    public_host: str
    listeners: dict[str, Listener] = field(default_factory=dict)
    client_config: Path | None = None
    stun: asyncio.DatagramTransport | None = None
    keys_loader: asyncio.Task[None] | None = None

    closing: bool = False

    def load_auth_keys(self) -> None:
        """Load the auth provider's keys in the background (a reload calls it again for
        the provider it brings); ``/readyz`` is not ready until they are in."""
        if self.keys_loader is not None:
            self.keys_loader.cancel()
        self.keys_loader = asyncio.create_task(load_keys(self.relay.auth))

    async def aclose(self) -> None:
        """Graceful: refuse new work, let open tunnels finish (bounded), then close all.
        Idempotent."""
        if self.closing:
            return
        self.closing = True
        if self.keys_loader is not None:
            self.keys_loader.cancel()
        try:
            await self.relay.drain()
        finally:  # whatever the drain met, nothing keeps listening
            for listener in self.listeners.values():
                await listener.aclose()
            if self.stun is not None:
                self.stun.close()
            if self.relay.links is not None:
                await self.relay.links.aclose()
            await self.relay.cluster.aclose()

    def probes(self) -> dict[str, Handler]:
        """``/healthz`` and ``/readyz`` for orchestrators, served next to ``/metrics``."""
        return {"/healthz": self._health, "/readyz": self._readiness}

    def _cluster_degraded(self) -> str:
        """Why cross-relay features are degraded now, or ``""``: the relay still serves
        what it holds (live and ready), and says so."""
        if self.relay.cluster.healthy:
            return ""
        return " (cluster degraded: its Redis cannot be reached)"

    def _health(self) -> tuple[int, str, bytes]:
        degraded = self._cluster_degraded()
        return 200, "text/plain", (f"degraded{degraded}" if degraded else "ok").encode() + b"\n"

    def _readiness(self) -> tuple[int, str, bytes]:
        if self.closing or not self.listeners:
            return 503, "text/plain", b"closing\n"
        keys = key_statistics(self.relay.auth)
        if not keys.loaded:  # every login would fail: an orchestrator should not route here
            return 503, "text/plain", f"auth keys not loaded: {keys.problem}\n".encode()
        ready = f"ready: {', '.join(self.listeners)}{self._cluster_degraded()}\n"
        return 200, "text/plain", ready.encode()


async def _redeem(
    state: RelayState,
    store: ClusterStore,
    host: str,
    ports: dict[str, int],
    max_ttl: float,
    code: str,
) -> messages.Redeemed:
    invite = await store.take_invite(digest(code))
    token = issue_token(
        state.signing_key,
        issuer=state.issuer,
        tenant=invite.tenant_id,
        subject=f"invited-{secrets.token_hex(4)}",
        permissions=invite.permissions,
        ttl=min(INVITE_TOKEN_TTL, max_ttl),
        max_ttl=max_ttl,
    )
    return messages.Redeemed(token, invite.tenant_id, host, ports)


def _cannot_listen(name: str, listen: str, port: int, exc: OSError) -> CloudBridgeError:
    """A transport's port that cannot be had, said with the setting that moves it."""
    where = f"{listen}:{port}"
    if _in_use(exc):
        return AddressInUse(
            f"the relay cannot listen for {name} on {where}: the port is already in use",
            hint=f"is another relay running? stop it, or set transport.{name}.port",
        )
    return CloudBridgeError(
        f"the relay cannot listen for {name} on {where}: {exc.strerror or exc}",
        hint=f"check server.listen and transport.{name}.port",
    )


async def _serve(transport: Transport, name: str, endpoint: Endpoint, relay: Relay) -> Listener:
    """``transport`` listening at ``endpoint``; a port that cannot be had is said in words."""
    try:
        listener = await transport.serve(endpoint, functools.partial(relay.handle, transport=name))
    except OSError as exc:
        raise _cannot_listen(name, endpoint.host, endpoint.port, exc) from exc
    # the serve command announces each listener to the user: this is only its debug echo
    log.debug("listening", transport=name, address=endpoint.host, port=listener.port)
    return listener


def _in_use(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was caused by, ``EADDRINUSE`` (uvloop wraps a UDP bind's)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def state_dir_of(config: Config, override: Path | None) -> Path:
    configured = config.settings.server.state_dir
    return override or (Path(configured) if configured else default_state_dir())


def _server_pair(server: ServerSettings, state: RelayState) -> KeyPair:
    """The configured certificate and key, or the one the relay's own CA signed."""
    cert_file, key_file = server.tls_cert_file, server.tls_key_file
    if not cert_file and not key_file:
        return state.server
    if not (cert_file and key_file):
        missing = "server.tls_key_file" if cert_file else "server.tls_cert_file"
        raise ConfigError([ConfigIssue(missing, "tls_cert_file and tls_key_file go together")])
    try:
        return KeyPair(Path(cert_file).read_bytes(), Path(key_file).read_bytes())
    except OSError as exc:
        raise ConfigError([ConfigIssue("server.tls_cert_file", f"cannot read: {exc}")]) from None


def auth_settings(
    config: Config, plugins: Plugins, state: RelayState
) -> tuple[str, Mapping[str, Any]]:
    """The auth provider and its settings; by default JWTs are checked with the relay's own key."""
    kind = config.get("auth.type")
    settings = dict(plugins.settings_for("auth_provider", kind, config.converted))
    if kind == "jwt" and not settings.get("public_key_file") and not settings.get("jwks_url"):
        settings.update(
            public_key_file=str(state.public_key_file),
            issuer=state.issuer,
            audience=AUDIENCE,
            # the relay's own tokens: what it may issue is what it accepts
            max_token_lifetime=config.settings.server.max_token_ttl,
        )
    return kind, settings


def browser_login(config: Config, plugins: Plugins, state: RelayState) -> BrowserLogin | None:
    """How people log in to the console at the auth provider's issuer, when it offers a
    way and its settings name a client for it (``auth.oidc.console_client_id``)."""
    kind, settings = auth_settings(config, plugins, state)
    spec = plugins.require("auth_provider", kind)
    if not isinstance(spec, AuthProviderSpec) or spec.browser_login is None:
        return None
    return spec.browser_login(settings)


def load_auth(config: Config, plugins: Plugins, state: RelayState) -> AuthProvider:
    """The configured auth provider, loaded; raises :class:`ConfigError` naming its
    section when the provider rejects its settings."""
    kind, settings = auth_settings(config, plugins, state)
    try:
        auth: AuthProvider = plugins.require("auth_provider", kind).load(settings)
    # the provider's own check of its settings, or a key file it cannot read
    except (ValueError, OSError) as exc:
        section = plugins.section_path("auth_provider", kind) or f"auth.{kind}"
        raise ConfigError([ConfigIssue(section, str(exc))]) from None
    return auth


async def _join_cluster(
    relay: Relay, server: ServerSettings, public_host: str, state: RelayState
) -> None:
    """Start the cluster's store (``server.cluster``), its events delivered to ``relay``,
    then take in the revocations in force: no session is served before they are held (a
    store that cannot be reached stops the start, ``ServerUnavailable``). A relay of a
    cluster (backend redis) also listens for the other relays' links."""
    cluster = server.cluster
    link = f"{cluster.link_host or public_host}:{cluster.link_port}"
    handlers = Handlers(relay.on_cluster_event, relay.on_cluster_resynced, relay.on_relays_gone)
    if cluster.backend != "memory":
        relay.links = await ClusterLinks.start(
            relay.cluster,
            state.ca,
            (server.listen, cluster.link_port),
            relay.mesh.deliver_remote,
            relay.metrics.registry,
        )
        relay.mesh.remote_packets = relay.links.send
    # started first: a revocation made while they load is then delivered, not missed
    await relay.cluster.start(handlers, RelayRecord(public_host, link))
    try:
        await relay.load_revocations()
    except ServerUnavailable as error:
        raise ServerUnavailable(
            error.message,
            hint="start Redis, or check server.cluster.redis_url: a relay of a cluster"
            " starts once it holds the revocations in force",
        ) from None


async def _cluster_hosts(relay: Relay) -> list[str]:
    """Where clients reach the live relays of the cluster (none when its store cannot be
    reached: the client config then names this relay alone)."""
    try:
        return [record.host for record in (await relay.cluster.relays()).values()]
    except ServerUnavailable:
        return []


def _relay_of(settings: Settings, auth: AuthProvider, state: RelayState, *, dev: bool) -> Relay:
    """The relay the settings describe, not yet serving."""
    metrics = RelayMetrics()
    cluster = settings.server.cluster
    cluster_metrics = ClusterMetrics(metrics.registry) if cluster.backend != "memory" else None
    store = open_store(cluster, state.directory, cluster_metrics)
    return Relay(
        auth,
        EgressPolicy.from_settings(settings.server.egress, dev=dev),
        RelayLimits.from_settings(settings.server, settings.performance),
        metrics,
        turn=TurnIssuer.from_settings(settings.server.turn),
        ipam=Ipam(store, settings.server.overlay),
        cluster=store,
    )


async def start_relay(
    config: Config,
    plugins: Plugins,
    *,
    state_dir: Path | None = None,
    dev: bool = False,
    port_override: int | None = None,
) -> RunningRelay:
    """Start listening on every installed transport, each on its section's ``port``."""
    settings = config.settings
    public_host = settings.server.public_host or settings.relay.host
    state = RelayState.load_or_create(
        state_dir_of(config, state_dir), [public_host, *local_hostnames()]
    )
    relay = _relay_of(settings, load_auth(config, plugins, state), state, dev=dev)
    relay.metrics.watch(relay, tenant_labels=settings.metrics.tenant_labels)
    relay.metrics.registry.register(AuthKeysCollector(relay))
    running = RunningRelay(state, relay, public_host)
    running.load_auth_keys()
    pair = _server_pair(settings.server, state)
    material = TlsMaterial(certificate=pair.certificate, key=pair.key)
    try:
        tls: ssl.SSLContext = server_context(pair)
    except ssl.SSLError as exc:
        raise ConfigError(
            [ConfigIssue("server.tls_cert_file", f"unusable certificate or key: {exc.reason}")]
        ) from None
    listen = settings.server.listen
    transports = plugins.transports()
    if not transports:
        raise ProviderNotInstalled("no transport is installed and enabled")
    ports = {
        name: transport_port(name, config.data) if port_override is None else port_override
        for name in transports
    }
    documents = {JWKS_PATH: ("application/json", json.dumps(jwks(state.signing_key)).encode())}
    reset_key = state.reset_key
    try:
        await _join_cluster(relay, settings.server, public_host, state)
        for name, spec in transports.items():
            transport = spec.load(plugins.settings_for("transport", name, config.converted))
            endpoint = Endpoint(
                listen,
                ports[name],
                tls,
                documents=documents,
                material=material,
                preauth=relay.preauth,
                raw_splices=relay.tickets,
                reset_key=reset_key,
            )
            running.listeners[name] = await _serve(transport, name, endpoint, relay)
    except BaseException:
        await running.aclose()
        raise
    actual = {name: listener.port for name, listener in running.listeners.items()}
    # aioice, for its STUN codec, is imported only by a relay that starts, not by every command
    from cloudbridge_core.relay.stun import serve_stun

    stun_port = port_override if port_override is not None else config.get("server.stun_port")
    try:
        running.stun = await serve_stun(listen, stun_port, relay.metrics.stun_requests)
    except OSError as exc:  # the tunnels matter more; clients can use other STUN servers
        log.warning("stun_not_served", port=stun_port, reason=exc.strerror or str(exc))
    else:
        stun_port = running.stun.get_extra_info("sockname")[1]
        log.info("listening", transport="stun", address=listen, port=stun_port)
    stun_url = f"stun:{public_host}:{stun_port}" if running.stun else None
    # a tenant must not tunnel into the relay itself, on any of its addresses
    metrics_port, _ = exporters.metrics_port(config, default=exporters.RELAY_METRICS_PORT)
    own_ports = {*actual.values(), stun_port, metrics_port}
    relay.egress = dataclasses.replace(relay.egress, own_ports=frozenset(own_ports))
    running.client_config = state.write_client_config(
        public_host, actual, stun_url, await _cluster_hosts(relay)
    )
    relay.redeemer = functools.partial(
        _redeem, state, relay.cluster, public_host, actual, settings.server.max_token_ttl
    )
    return running
