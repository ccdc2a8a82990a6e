"""Typed, immutable settings: the validated config converted once (see ``sections``).

Frozen stdlib dataclasses rather than pydantic or msgspec: the JSON Schema already
validates, documents and holds every default, and a second validating model would be a
second source of truth to drift from it. The dataclasses only give the validated values
types (durations as float seconds) and immutability, and compare by value, so a reload
can tell which sections changed. They cost no dependency on small hosts.
"""

from cloudbridge_core.settings.build import Settings, build
from cloudbridge_core.settings.convert import convert
from cloudbridge_core.settings.sections import (
    AuthSettings,
    BreakerSettings,
    EgressRules,
    EgressSettings,
    LoggingSettings,
    MetricsSettings,
    OverlayAllowRule,
    OverlaySettings,
    P2PSettings,
    PerformanceSettings,
    PluginsSettings,
    RateLimitSettings,
    RateQuota,
    RateQuotas,
    RelaySettings,
    RelayTlsSettings,
    RetryOverride,
    RetrySettings,
    ServerOverlaySettings,
    ServerOverlayTenant,
    ServerSettings,
    ServiceSettings,
    TenantRateQuotas,
    TransportSettings,
    TunnelSettings,
    TurnSettings,
)

__all__ = [
    "AuthSettings",
    "BreakerSettings",
    "EgressRules",
    "EgressSettings",
    "LoggingSettings",
    "MetricsSettings",
    "OverlayAllowRule",
    "OverlaySettings",
    "P2PSettings",
    "PerformanceSettings",
    "PluginsSettings",
    "RateLimitSettings",
    "RateQuota",
    "RateQuotas",
    "RelaySettings",
    "RelayTlsSettings",
    "RetryOverride",
    "RetrySettings",
    "ServerOverlaySettings",
    "ServerOverlayTenant",
    "ServerSettings",
    "ServiceSettings",
    "Settings",
    "TenantRateQuotas",
    "TransportSettings",
    "TunnelSettings",
    "TurnSettings",
    "build",
    "convert",
]
