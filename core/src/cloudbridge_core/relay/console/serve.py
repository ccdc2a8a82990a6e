"""Starting the console's listener from ``server.console``: loopback over HTTP, any other
address only over HTTPS (a login token and a session cookie must not cross a network in
the clear)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from cloudbridge_core.config import Config
from cloudbridge_core.errors import AddressInUse, ConfigError, ConfigIssue
from cloudbridge_core.httpd import LocalHttpServer
from cloudbridge_core.log import get_logger
from cloudbridge_core.relay.console.actions import ConsoleContext
from cloudbridge_core.relay.console.app import ConsoleApp
from cloudbridge_core.settings.sections import ConsoleSettings

log = get_logger("relay.console")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _tls(settings: ConsoleSettings) -> ssl.SSLContext | None:
    cert_file, key_file = settings.tls_cert_file, settings.tls_key_file
    if not cert_file and not key_file:
        if not _loopback(settings.host):
            raise ConfigError(
                [
                    ConfigIssue(
                        "server.console.tls_cert_file",
                        f"the console listens on {settings.host}, not loopback: it needs"
                        " tls_cert_file and tls_key_file (or host 127.0.0.1)",
                    )
                ]
            )
        return None
    if not (cert_file and key_file):
        missing = "server.console.tls_key_file" if cert_file else "server.console.tls_cert_file"
        raise ConfigError([ConfigIssue(missing, "tls_cert_file and tls_key_file go together")])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(Path(cert_file), Path(key_file))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            [ConfigIssue("server.console.tls_cert_file", f"unusable certificate or key: {reason}")]
        ) from None
    return context


@contextlib.asynccontextmanager
async def serving_console(config: Config, context: ConsoleContext) -> AsyncIterator[str | None]:
    """The console served while in the block; yields its URL (None when disabled)."""
    settings = config.settings.server.console
    if not settings.enabled:
        yield None
        return
    app = ConsoleApp(context, settings.session_ttl)
    server = LocalHttpServer({}, settings.allowed_hosts, app=app, tls=_tls(settings))
    explicit = config.origin(("server", "console", "port")).source != "default"
    try:
        base = await server.start(settings.host, settings.port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise ConfigError(
                [ConfigIssue("server.console.host", f"cannot listen: {exc.strerror or exc}")]
            ) from None
        if explicit:
            raise AddressInUse(
                f"server.console.port {settings.port} on {settings.host} is in use by another"
                " process",
                hint="set server.console.port to a free port, or remove it to let the relay"
                " pick one",
            ) from None
        base = await server.start(settings.host, 0)
        log.warning("console_port_busy", port=settings.port, using=base)
    sampler = asyncio.create_task(app.traffic.run())
    try:
        yield f"{base}/console/"
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await server.aclose()
