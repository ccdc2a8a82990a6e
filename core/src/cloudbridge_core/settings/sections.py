"""The core's settings, one frozen dataclass per config section.

Built once from a validated config (:func:`cloudbridge_core.settings.build`): every
default comes from the schema, durations are float seconds, sizes are bytes, paths are
absolute. The classes declare no defaults on purpose: the schema is the only place a
default lives, and a test checks that each class's fields match the schema's keys.

Sections owned by plugins (``auth.jwt``, ``transport.quic``, ``metrics.pushgateway``, ...)
are not typed here; a plugin receives its own section through its provider's ``load``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RelayTlsSettings:
    min_version: str
    verify_cert: bool
    ca_file: str | None


@dataclass(frozen=True, slots=True)
class RelaySettings:
    host: str
    hosts: tuple[str, ...]
    tls: RelayTlsSettings
    connect_timeout: float


@dataclass(frozen=True, slots=True)
class AuthSettings:
    type: str
    token: str | None
    token_storage: str
    token_file: str | None
    keyring_service: str


@dataclass(frozen=True, slots=True)
class P2PSettings:
    enabled: bool
    name: str | None
    expose: tuple[int, ...]
    heartbeat_interval: float
    heartbeat_timeout: float
    peer_discovery_interval: float
    max_connections: int
    fallback_enabled: bool
    upgrade_interval: float


@dataclass(frozen=True, slots=True)
class OverlayAllowRule:
    peers: tuple[str, ...]
    protocol: str
    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OverlaySettings:
    enabled: bool
    type: str
    interface: str | None
    mtu: int
    domain: str
    dns: bool
    allow: tuple[OverlayAllowRule, ...]


@dataclass(frozen=True, slots=True)
class TransportSettings:
    mode: str
    prefer_protocol: str
    fallback_enabled: bool
    fallback_on_certificate_error: bool
    connect_timeout: float
    race_head_start: float
    health_check_interval: float
    rtt_threshold: float


@dataclass(frozen=True, slots=True)
class TunnelSettings:
    """One entry of ``tunnels``; ``name`` defaults to ``tunnel-<local_port>``."""

    name: str | None
    local_host: str
    local_port: int
    remote_host: str
    remote_port: int


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    enabled: bool
    prometheus_host: str
    prometheus_port: int
    tenant_labels: bool
    allowed_hosts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: str
    format: str
    output: str
    max_bytes: int
    backup_count: int


@dataclass(frozen=True, slots=True)
class PerformanceSettings:
    buffer_size: int
    max_concurrent_tunnels: int


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    name: str
    description: str
    auto_restart: bool
    restart_delay: float
    user: str | None
    group: str | None


@dataclass(frozen=True, slots=True)
class RetryOverride:
    """``retry.per_error.<code>``: only what is set overrides ``retry``."""

    initial_delay: float | None
    multiplier: float | None
    max_delay: float | None
    jitter: float | None
    max_retries: int | None


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failure_threshold: int
    reset_timeout: float
    half_open_max_calls: int
    success_threshold: int


@dataclass(frozen=True, slots=True)
class RetrySettings:
    initial_delay: float
    multiplier: float
    max_delay: float
    jitter: float
    max_retries: int
    per_error: dict[str, RetryOverride]
    circuit_breaker: BreakerSettings


@dataclass(frozen=True, slots=True)
class EgressRules:
    allow: tuple[str, ...]
    deny: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EgressSettings:
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    tenants: dict[str, EgressRules]


@dataclass(frozen=True, slots=True)
class RateQuota:
    """A token bucket: ``rate`` requests a second, bursts of up to ``burst``."""

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class RateQuotas:
    control_messages: RateQuota
    mux_pings: RateQuota
    stream_opens: RateQuota


@dataclass(frozen=True, slots=True)
class TenantRateQuotas:
    """``server.rate_limits.tenants.<tenant>``: a kind left out keeps the relay's quota."""

    control_messages: RateQuota | None
    mux_pings: RateQuota | None
    stream_opens: RateQuota | None


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    disconnect_after: float
    control_messages: RateQuota
    mux_pings: RateQuota
    stream_opens: RateQuota
    per_address: RateQuotas
    tenants: dict[str, TenantRateQuotas]


@dataclass(frozen=True, slots=True)
class TurnSettings:
    """``server.turn``: the TURN credentials the relay issues per tenant."""

    secret_file: str | None
    urls: tuple[str, ...]
    credential_ttl: float


@dataclass(frozen=True, slots=True)
class ServerOverlayTenant:
    """``server.overlay.tenants.<tenant>``: the tenant's own pool."""

    pool: str


@dataclass(frozen=True, slots=True)
class ServerOverlaySettings:
    """``server.overlay``: the overlay addresses the relay leases per tenant (IPAM)."""

    pool: str
    release_after: float
    tenants: dict[str, ServerOverlayTenant]


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """``server.cluster``: where relay state lives, and this relay's part in a cluster."""

    backend: str
    redis_url: str | None
    redis_password_file: str | None
    redis_ca_file: str | None
    name: str
    member: str | None
    link_port: int
    link_host: str | None
    presence_ttl: float


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """``server.console``: the relay's web console."""

    enabled: bool
    host: str
    port: int
    tls_cert_file: str | None
    tls_key_file: str | None
    allowed_hosts: tuple[str, ...]
    session_ttl: float


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: str
    stun_port: int
    public_host: str | None
    state_dir: str | None
    tls_cert_file: str | None
    tls_key_file: str | None
    handshake_timeout: float
    preauth_timeout: float
    preauth_max_per_address: int
    preauth_max_connections: int
    heartbeat_timeout: float
    drain_timeout: float
    token_expiry_grace: float
    connect_timeout: float
    max_sessions_per_tenant: int
    max_streams_per_session: int
    admission: RateQuota
    token_ttl: float
    max_token_ttl: float
    egress: EgressSettings
    turn: TurnSettings
    overlay: ServerOverlaySettings
    cluster: ClusterSettings
    console: ConsoleSettings
    rate_limits: RateLimitSettings


@dataclass(frozen=True, slots=True)
class PluginsSettings:
    enabled: tuple[str, ...] | None
    disabled: tuple[str, ...]
