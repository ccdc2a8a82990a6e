"""CloudBridge's classified errors: one tree, each class with a stable ``code``.

The ``code`` is the same string in wire messages, logs, metrics labels and CLI output;
``retryable`` and ``retry_delay`` (seconds) say whether and when to try again;
``exit_code`` is what a one-shot CLI command exits with (see ``docs/errors.md``)::

    CloudBridgeError                     error             exit 1
    ├── UsageError                       usage             exit 2
    │   └── PluginSelectionError         plugin_unknown    exit 2
    ├── ConfigError                      config_invalid    exit 3
    ├── ProviderNotInstalled             provider_missing  exit 1
    ├── AddressInUse                     address_in_use    exit 1
    ├── FileMissing                      file_missing      exit 1
    ├── PermissionDenied                 permission_denied exit 1
    ├── AuthError                        auth_failed       exit 4
    │   ├── InvalidToken                 invalid_token     exit 4
    │   ├── TokenExpired                 token_expired     exit 4
    │   └── Unauthorized                 unauthorized      exit 4
    ├── RateLimitExceeded                rate_limited      exit 5  retry after 5s
    ├── ServerUnavailable                unavailable       exit 5  retry after 10s
    ├── ConnectionTimeout                timeout           exit 5  retry after 3s
    ├── HeartbeatFailed                  heartbeat_failed  exit 5  retry after 2s
    ├── CircuitOpen                      circuit_open      exit 5  retry after the breaker's reset
    ├── P2PConnectionFailed              p2p_failed        exit 1  retry after 5s
    ├── OverlayFailed                    overlay_failed    exit 1
    ├── TunnelClosed                     tunnel_closed     exit 1
    ├── EgressDenied                     egress_denied     exit 1
    ├── TargetUnreachable                unreachable       exit 1  retry after 2s
    ├── LimitExceeded                    limit_exceeded    exit 1  retry after 5s
    ├── TransportError                   transport_error   exit 1
    │   ├── TransportClosed              transport_closed  exit 5  retry after 1s
    │   ├── StreamAborted                stream_reset      exit 1
    │   ├── ProtocolViolation            protocol_error    exit 1
    │   └── TlsVerificationFailed        tls_verify_failed exit 4
    └── Unhealthy                        unhealthy         exit 6

Messages never contain secrets: callers pass names and paths, never token values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar


class ExitCode(IntEnum):
    """Exit codes of the ``cloudbridge`` command."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG_INVALID = 3
    AUTH = 4
    RELAY_UNAVAILABLE = 5
    UNHEALTHY = 6
    INTERRUPTED = 130


class CloudBridgeError(Exception):
    """Base of every error CloudBridge raises on purpose."""

    code: ClassVar[str] = "error"
    retryable: ClassVar[bool] = False
    retry_delay: ClassVar[float | None] = None
    exit_code: ClassVar[ExitCode] = ExitCode.FAILURE

    def __init__(
        self, message: str, *, hint: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        #: seconds after which the other end asked to be tried again (a relay pacing its
        #: admissions gives each client its own); None: the client's own backoff decides
        self.retry_after = retry_after
        #: the slot the other end reserved for that time, to present when coming back
        self.slot = ""

    def to_dict(self) -> dict[str, Any]:
        """The ``{"code", "message", "hint"}`` object used in JSON output and wire errors."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        return out


class UsageError(CloudBridgeError):
    code = "usage"
    exit_code = ExitCode.USAGE


class PluginSelectionError(UsageError):
    """A plugin name given to select or disable plugins is not installed."""

    code = "plugin_unknown"


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One thing wrong with a configuration, located as precisely as we can.

    ``line`` and ``column`` count from 1, as editors do; ``column`` is only set with ``line``.
    """

    path: str
    message: str
    source: str | None = None
    line: int | None = None
    column: int | None = None

    def location(self) -> str:
        """``file:line:column`` as compilers write it (or ``file:line``, ``file``, ``env VAR``)."""
        where = self.source or ""
        if self.line is not None:
            where = f"{where}:{self.line}"
            if self.column is not None:
                where = f"{where}:{self.column}"
        return where

    def __str__(self) -> str:
        where = self.location()
        prefix = f"{where}: " if where else ""
        return f"{prefix}{self.path or '<root>'}: {self.message}"


class ConfigError(CloudBridgeError):
    """The configuration is invalid; ``issues`` lists every problem found."""

    code = "config_invalid"
    exit_code = ExitCode.CONFIG_INVALID

    def __init__(self, issues: list[ConfigIssue], *, hint: str | None = None) -> None:
        count = len(issues)
        summary = "; ".join(str(issue) for issue in issues[:3])
        more = f" (and {count - 3} more)" if count > 3 else ""
        super().__init__(
            f"configuration has {count} error{'s' if count != 1 else ''}: {summary}{more}",
            hint=hint,
        )
        self.issues = issues


class ProviderNotInstalled(CloudBridgeError):
    """A command needs a provider (``transport 'quic'``) that no active plugin offers."""

    code = "provider_missing"


class AddressInUse(CloudBridgeError):
    """A local address this command has to listen on is taken (``EADDRINUSE``): a tunnel's
    local port, a relay's transport port. Said before anything connects."""

    code = "address_in_use"


class FileMissing(CloudBridgeError):
    """A file or directory the command was given (a flag, a config key) does not exist."""

    code = "file_missing"


class PermissionDenied(CloudBridgeError):
    """The operating system refused this process a file, directory or socket it needs."""

    code = "permission_denied"


class AuthError(CloudBridgeError):
    code = "auth_failed"
    exit_code = ExitCode.AUTH


class InvalidToken(AuthError):
    code = "invalid_token"


class TokenExpired(AuthError):
    code = "token_expired"


class Unauthorized(AuthError):
    code = "unauthorized"


class RateLimitExceeded(CloudBridgeError):
    code = "rate_limited"
    retryable = True
    retry_delay = 5.0
    exit_code = ExitCode.RELAY_UNAVAILABLE


class ServerUnavailable(CloudBridgeError):
    code = "unavailable"
    retryable = True
    retry_delay = 10.0
    exit_code = ExitCode.RELAY_UNAVAILABLE


class ConnectionTimeout(CloudBridgeError):
    code = "timeout"
    retryable = True
    retry_delay = 3.0
    exit_code = ExitCode.RELAY_UNAVAILABLE


class HeartbeatFailed(CloudBridgeError):
    code = "heartbeat_failed"
    retryable = True
    retry_delay = 2.0
    exit_code = ExitCode.RELAY_UNAVAILABLE


class CircuitOpen(CloudBridgeError):
    """Calls are refused because the circuit breaker for an endpoint is open."""

    code = "circuit_open"
    retryable = True
    exit_code = ExitCode.RELAY_UNAVAILABLE

    retry_after: float

    def __init__(self, message: str, *, retry_after: float, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, retry_after=retry_after)


class P2PConnectionFailed(CloudBridgeError):
    """``details`` keeps what an attempt saw (ICE candidate pairs), for ``--explain``."""

    code = "p2p_failed"
    retryable = True
    retry_delay = 5.0

    def __init__(
        self, message: str, *, hint: str | None = None, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.details = dict(details or {})


class OverlayFailed(CloudBridgeError):
    """The overlay could not be brought up or changed: a missing capability
    (CAP_NET_ADMIN), program (wireguard-go) or kernel feature, or a refused pool."""

    code = "overlay_failed"


class TunnelClosed(CloudBridgeError):
    code = "tunnel_closed"


class EgressDenied(CloudBridgeError):
    """The relay's egress policy does not allow this tunnel target."""

    code = "egress_denied"


class TargetUnreachable(CloudBridgeError):
    """The relay could not connect to the tunnel target."""

    code = "unreachable"
    retryable = True
    retry_delay = 2.0


class LimitExceeded(CloudBridgeError):
    """A named limit (sessions per tenant, streams per session, ...) is reached."""

    code = "limit_exceeded"
    retryable = True
    retry_delay = 5.0


class TransportError(CloudBridgeError):
    """Something went wrong below the protocol: the pipe, a stream, TLS."""

    code = "transport_error"


class TransportClosed(TransportError):
    """The session is gone (peer closed it, or the connection dropped)."""

    code = "transport_closed"
    retryable = True
    retry_delay = 1.0
    exit_code = ExitCode.RELAY_UNAVAILABLE


class StreamAborted(TransportError):
    """The peer reset the stream."""

    code = "stream_reset"


class ProtocolViolation(TransportError):
    """The peer sent bytes that break the protocol; the connection is closed."""

    code = "protocol_error"


class TlsVerificationFailed(TransportError):
    """The peer's certificate is not trusted (wrong CA, name or pin).

    Exits like an auth problem: the relay could not prove who it is, which is an attack or
    a misconfiguration, never "relay unavailable"."""

    code = "tls_verify_failed"
    exit_code = ExitCode.AUTH


class Unhealthy(CloudBridgeError):
    code = "unhealthy"
    exit_code = ExitCode.UNHEALTHY


def error_for_code(
    code: str, message: str, retry_after: float | None = None, slot: str = ""
) -> CloudBridgeError:
    """Rebuild a classified error received on the wire (unknown codes stay generic)."""
    known = [
        c for c in all_error_classes() if c.code == code and c not in (ConfigError, CircuitOpen)
    ]
    error = known[0](message) if known else CloudBridgeError(message)
    if not known:
        error.message = f"{message} ({code})"
    error.retry_after, error.slot = retry_after, slot
    return error


def all_error_classes() -> list[type[CloudBridgeError]]:
    """Every class of the tree, base first; used to document and test the codes."""
    found: list[type[CloudBridgeError]] = []
    pending: list[type[CloudBridgeError]] = [CloudBridgeError]
    while pending:
        cls = pending.pop(0)
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found
