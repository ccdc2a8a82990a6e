"""Typed, immutable settings: the validated config converted once (see ``sections``)."""

from cloudbridge_core.settings.build import Settings, build
from cloudbridge_core.settings.convert import convert
from cloudbridge_core.settings.sections import (
    AuthSettings,
    BreakerSettings,
    EgressRules,
    EgressSettings,
    LoggingSettings,
    MetricsSettings,
    P2PSettings,
    PerformanceSettings,
    PluginsSettings,
    RelaySettings,
    RelayTlsSettings,
    RetryOverride,
    RetrySettings,
    ServerSettings,
    ServiceSettings,
    TransportSettings,
    TunnelSettings,
)

__all__ = [
    "AuthSettings",
    "BreakerSettings",
    "EgressRules",
    "EgressSettings",
    "LoggingSettings",
    "MetricsSettings",
    "P2PSettings",
    "PerformanceSettings",
    "PluginsSettings",
    "RelaySettings",
    "RelayTlsSettings",
    "RetryOverride",
    "RetrySettings",
    "ServerSettings",
    "ServiceSettings",
    "Settings",
    "TransportSettings",
    "TunnelSettings",
    "build",
    "convert",
]
