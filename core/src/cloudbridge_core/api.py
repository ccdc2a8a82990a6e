"""Everything a plugin may use from the core: one module, one page to read, kept stable.

A plugin's code imports from here and nowhere else in ``cloudbridge_core`` (a test checks
the plugins in this repository and the template's). Its tests may also use
:mod:`cloudbridge_core.testing` (the conformance kit, throwaway TLS, ``plugin_settings``).

- hooks: :data:`hookimpl` and the provider records (``TransportSpec``, ``ConfigSection``, ...)
- the provider interfaces (``Transport``, ``Session``, ``Stream``, ``AuthProvider``, ...)
- the classified errors (``errors``, and each class by name), mapped to at the plugin's boundary
- settings: :func:`build` types a plugin's section (which ``load`` receives validated, with
  the schema's defaults and durations in seconds) into the plugin's own frozen dataclass
- building blocks: logging, backoff, TLS helpers, the stream multiplexer and session runner
  (transports), the bounded QUIC session and its helpers (QUIC transports), the DERP framing
  and ICE paths (NAT strategies), the token store and the CLI runtime (auth providers with
  commands)

Names are imported when first used, so importing this module stays cheap: ``hooks``
modules import it while ``cloudbridge --help`` runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cloudbridge_core import errors
from cloudbridge_core.errors import (
    AuthError,
    CloudBridgeError,
    ConfigError,
    ConfigIssue,
    ConnectionTimeout,
    InvalidToken,
    OverlayFailed,
    P2PConnectionFailed,
    ProtocolViolation,
    ServerUnavailable,
    StreamAborted,
    TlsVerificationFailed,
    TokenExpired,
    TransportClosed,
    TransportError,
    UsageError,
)
from cloudbridge_core.hookspecs import hookimpl
from cloudbridge_core.providers import (
    AuthKeyStatistics,
    AuthProvider,
    AuthProviderSpec,
    BrowserLogin,
    Claims,
    ConfigSection,
    Endpoint,
    Exporter,
    ExporterSpec,
    KeyedAuthProvider,
    Listener,
    NatStrategy,
    NatStrategySpec,
    Overlay,
    OverlayInterface,
    OverlayPeer,
    OverlaySpec,
    OverlayState,
    PeerInfo,
    PeerPath,
    ProviderSpec,
    Session,
    SignalChannel,
    Stream,
    TlsMaterial,
    TokenSource,
    TokenStore,
    Transport,
    TransportSpec,
)

if TYPE_CHECKING:
    from cloudbridge_core.cli.output import message
    from cloudbridge_core.cli.runtime import config_option, runtime_of
    from cloudbridge_core.client.tokens import StoredTokens, token_expires_in
    from cloudbridge_core.log import get_logger
    from cloudbridge_core.overlay.capability import NO_NET_ADMIN, require_net_admin
    from cloudbridge_core.overlay.nft import nft_installed, run_nft
    from cloudbridge_core.p2p.ice import CLOSE_GRACE as ICE_CLOSE_GRACE
    from cloudbridge_core.p2p.ice import IcePath, ice_path
    from cloudbridge_core.protocol import derp
    from cloudbridge_core.protocol.messages import TurnCredentials
    from cloudbridge_core.protocol.mux import MuxLimits
    from cloudbridge_core.quic.flow import bound as bound_quic_connection
    from cloudbridge_core.quic.pmtu import forbid_fragmentation, path_payload_size
    from cloudbridge_core.quic.reset import StatelessResets
    from cloudbridge_core.quic.session import QuicSession
    from cloudbridge_core.retry import Backoff
    from cloudbridge_core.settings import build
    from cloudbridge_core.tenants import TENANT_ID_PATTERN, is_tenant_id
    from cloudbridge_core.tlsutil import ALPN, client_context
    from cloudbridge_core.transports.mux_session import MuxSession, PipeReceiver
    from cloudbridge_core.transports.preauth import Admission, PreauthGate
    from cloudbridge_core.transports.serving import run_session_handler
    from cloudbridge_core.transports.tls import TlsTransport

_LAZY = {
    "message": ("cloudbridge_core.cli.output", "message"),
    "config_option": ("cloudbridge_core.cli.runtime", "config_option"),
    "runtime_of": ("cloudbridge_core.cli.runtime", "runtime_of"),
    "StoredTokens": ("cloudbridge_core.client.tokens", "StoredTokens"),
    "token_expires_in": ("cloudbridge_core.client.tokens", "token_expires_in"),
    "get_logger": ("cloudbridge_core.log", "get_logger"),
    "NO_NET_ADMIN": ("cloudbridge_core.overlay.capability", "NO_NET_ADMIN"),
    "require_net_admin": ("cloudbridge_core.overlay.capability", "require_net_admin"),
    "nft_installed": ("cloudbridge_core.overlay.nft", "nft_installed"),
    "run_nft": ("cloudbridge_core.overlay.nft", "run_nft"),
    "ICE_CLOSE_GRACE": ("cloudbridge_core.p2p.ice", "CLOSE_GRACE"),
    "IcePath": ("cloudbridge_core.p2p.ice", "IcePath"),
    "ice_path": ("cloudbridge_core.p2p.ice", "ice_path"),
    "derp": ("cloudbridge_core.protocol.derp", None),
    "TurnCredentials": ("cloudbridge_core.protocol.messages", "TurnCredentials"),
    "MuxLimits": ("cloudbridge_core.protocol.mux", "MuxLimits"),
    "bound_quic_connection": ("cloudbridge_core.quic.flow", "bound"),
    "forbid_fragmentation": ("cloudbridge_core.quic.pmtu", "forbid_fragmentation"),
    "path_payload_size": ("cloudbridge_core.quic.pmtu", "path_payload_size"),
    "StatelessResets": ("cloudbridge_core.quic.reset", "StatelessResets"),
    "QuicSession": ("cloudbridge_core.quic.session", "QuicSession"),
    "Backoff": ("cloudbridge_core.retry", "Backoff"),
    "build": ("cloudbridge_core.settings", "build"),
    "TENANT_ID_PATTERN": ("cloudbridge_core.tenants", "TENANT_ID_PATTERN"),
    "is_tenant_id": ("cloudbridge_core.tenants", "is_tenant_id"),
    "ALPN": ("cloudbridge_core.tlsutil", "ALPN"),
    "client_context": ("cloudbridge_core.tlsutil", "client_context"),
    "MuxSession": ("cloudbridge_core.transports.mux_session", "MuxSession"),
    "PipeReceiver": ("cloudbridge_core.transports.mux_session", "PipeReceiver"),
    "Admission": ("cloudbridge_core.transports.preauth", "Admission"),
    "PreauthGate": ("cloudbridge_core.transports.preauth", "PreauthGate"),
    "run_session_handler": ("cloudbridge_core.transports.serving", "run_session_handler"),
    "TlsTransport": ("cloudbridge_core.transports.tls", "TlsTransport"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


__all__ = [
    "ALPN",
    "ICE_CLOSE_GRACE",
    "NO_NET_ADMIN",
    "TENANT_ID_PATTERN",
    "Admission",
    "AuthError",
    "AuthKeyStatistics",
    "AuthProvider",
    "AuthProviderSpec",
    "Backoff",
    "BrowserLogin",
    "Claims",
    "CloudBridgeError",
    "ConfigError",
    "ConfigIssue",
    "ConfigSection",
    "ConnectionTimeout",
    "Endpoint",
    "Exporter",
    "ExporterSpec",
    "IcePath",
    "InvalidToken",
    "KeyedAuthProvider",
    "Listener",
    "MuxLimits",
    "MuxSession",
    "NatStrategy",
    "NatStrategySpec",
    "Overlay",
    "OverlayFailed",
    "OverlayInterface",
    "OverlayPeer",
    "OverlaySpec",
    "OverlayState",
    "P2PConnectionFailed",
    "PeerInfo",
    "PeerPath",
    "PipeReceiver",
    "PreauthGate",
    "ProtocolViolation",
    "ProviderSpec",
    "QuicSession",
    "ServerUnavailable",
    "Session",
    "SignalChannel",
    "StatelessResets",
    "StoredTokens",
    "Stream",
    "StreamAborted",
    "TlsMaterial",
    "TlsTransport",
    "TlsVerificationFailed",
    "TokenExpired",
    "TokenSource",
    "TokenStore",
    "Transport",
    "TransportClosed",
    "TransportError",
    "TransportSpec",
    "TurnCredentials",
    "UsageError",
    "bound_quic_connection",
    "build",
    "client_context",
    "config_option",
    "derp",
    "errors",
    "forbid_fragmentation",
    "get_logger",
    "hookimpl",
    "ice_path",
    "is_tenant_id",
    "message",
    "nft_installed",
    "path_payload_size",
    "require_net_admin",
    "run_nft",
    "run_session_handler",
    "runtime_of",
    "token_expires_in",
]
