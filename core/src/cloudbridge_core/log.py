"""Structured logging: JSON or text, with ``component`` and ``event`` fields, secrets scrubbed.

Strings in a log line often come from strangers (tenant ids, peer names, tunnel targets,
error messages from the wire): control characters, ANSI escapes and bidi overrides in them
are written as visible escapes (``\x1b``, ``\n``), so that nobody can forge a log line,
recolour a terminal or hide text from whoever reads the log.

Everything goes through the standard library's ``logging`` (so library logs are formatted
the same way) with structlog rendering. Output is stderr by default because stdout
carries command data; ``stdout`` or a file path (rotated by size) can be chosen.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
REDACTED = "<redacted>"

#: keys whose values are never logged, whatever they hold
SECRET_KEY = re.compile(
    r"(^|_)(token|access_token|refresh_token|id_token|secret|client_secret|password|passwd|"
    r"credential|credentials|private_key|authorization|api_key)$",
    re.IGNORECASE,
)
#: secret-looking values inside any string: JWTs, bearer tokens, PEM private keys, URL passwords
SECRET_VALUE = re.compile(
    r"eyJ[\w-]+\.[\w-]+\.[\w-]*"
    r"|(?i:bearer)\s+[\w.~+/-]+=*"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(-----END [A-Z ]*PRIVATE KEY-----|$)"
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"
)

#: C0 and C1 controls, DEL, and the bidi embeddings, overrides and isolates
UNSAFE_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
#: the traceback keeps its lines (indented); anything else in it is escaped as elsewhere
_MULTILINE_KEYS = frozenset({"exception"})
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape(value: Any, multiline: bool = False) -> Any:
    """``value`` with every unsafe character in its strings (keys included) made visible."""
    if isinstance(value, str):
        if multiline:  # continuation lines indented: none can pass for a log line of its own
            first, *rest = (UNSAFE_CHARACTERS.sub(_escaped, line) for line in value.split("\n"))
            return "\n".join([first, *(f"  {line}" for line in rest)])
        return UNSAFE_CHARACTERS.sub(_escaped, value)
    if isinstance(value, Mapping):
        return {escape(k): escape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [escape(v) for v in value]
    return value


def _escape_event(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return {escape(key): escape(value, key in _MULTILINE_KEYS) for key, value in event.items()}


def scrub(value: Any, key: str = "") -> Any:
    """Replace secrets in ``value``: by key name, and secret-looking substrings anywhere."""
    if key and SECRET_KEY.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return SECRET_VALUE.sub(REDACTED, value)
    if isinstance(value, Mapping):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


def _scrub_event(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event):
        event[key] = scrub(event[key], key)
    return event


def _default_component(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # library loggers ("watchfiles.main") get their logger name as component
    record = event.get("_record")
    event.setdefault("component", record.name if record is not None else "cloudbridge")
    return event


#: libraries whose info lines are their internals (aioice's every ICE check, websockets'
#: "server listening" beside the relay's own line, aioquic's version and ALPN of every
#: peer session): shown at debug, as debug lines. aioquic logs as "quic" and "http3".
LIBRARY_LOGGERS = ("aioice", "aioquic", "quic", "http3", "websockets", "grpc")


class _DemoteLibraryInfo(logging.Filter):
    """Turns the info lines of :data:`LIBRARY_LOGGERS` into debug lines, dropped unless
    debug is on; their warnings and errors pass as they are."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.name.split(".", 1)[0] in LIBRARY_LOGGERS:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self._level <= logging.DEBUG
        return True


def configure_logging(
    *,
    level: str = "info",
    fmt: str = "text",
    output: str = "stderr",
    max_bytes: int = 100 * 1024 * 1024,
    backup_count: int = 5,
    color: bool = False,
) -> None:
    """Set up logging for the whole process; safe to call again (hot reload, tests)."""
    handler: logging.Handler
    if output == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    elif output == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    else:
        try:
            handler = logging.handlers.RotatingFileHandler(
                output, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
            )
        except OSError as exc:
            # losing the logs is worse than logging to the wrong place: say so, use stderr
            print(
                f"warning: cannot log to {output} ({exc.strerror}); logging to stderr",
                file=sys.stderr,
            )
            handler = logging.StreamHandler(sys.stderr)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=color)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                _default_component,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _scrub_event,
                _escape_event,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    handler.addFilter(_DemoteLibraryInfo(LEVELS[level]))
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # watchfiles reports every change at info: with the log file next to the config file
    # that would log its own writes forever; the reload watcher logs what matters
    logging.getLogger("watchfiles").setLevel(max(LEVELS[level], logging.WARNING))
    # HTTP clients (httpx2 under authlib) log every request at info: plugins log what matters
    for chatty in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(chatty).setLevel(max(LEVELS[level], logging.WARNING))
    structlog.configure(
        # filter first: a debug event on a busy path costs a level check when debug is off
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(component: str) -> structlog.stdlib.BoundLogger:
    """A logger whose events carry ``component`` (``config.reload``, ``relay.client``)."""
    # a lazy proxy: loggers made at import time still follow configure_logging() later
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(
        f"cloudbridge.{component}", component=component
    )
    return logger


def debug_on(component: str) -> Callable[[], bool]:
    """Whether ``component``'s debug events are logged now (it follows
    :func:`configure_logging`). An event per connection checks it first: a debug event
    made and then dropped costs about a hundred times this check (6 us: the lazy logger
    binds a new one for every event)."""
    logger = logging.getLogger(f"cloudbridge.{component}")
    return lambda: logger.isEnabledFor(logging.DEBUG)
