"""Pushes a registry to a Pushgateway every ``push_interval``, and once more at shutdown.

Pushing is blocking HTTP (prometheus-client's), so it runs in a worker thread and never
holds up the event loop; failures are retried with backoff, counted, and logged without
the credentials.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudbridge_core.api import Backoff, build, get_logger
from prometheus_client import CollectorRegistry, Counter, delete_from_gateway, push_to_gateway

log = get_logger("exporter.pushgateway")

#: a failed push is retried after this, then twice as long each time (up to push_interval)
FIRST_RETRY_SECONDS = 1.0
RETRY_MULTIPLIER = 2.0
RETRY_JITTER_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class PushgatewaySettings:
    """``metrics.pushgateway`` as the core hands it over: validated, every default from
    ``hooks.SETTINGS_SCHEMA`` (so none here), durations in seconds."""

    enabled: bool
    push_url: str
    push_interval: float
    job: str
    instance: str | None
    delete_on_exit: bool
    username: str | None
    password: str | None = field(repr=False)
    ca_file: str | None
    timeout: float


class PushgatewayExporter:
    """Implements :class:`~cloudbridge_core.providers.Exporter`."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = build(PushgatewaySettings, settings)
        self._grouping = {"instance": self.settings.instance or socket.gethostname()}
        self._context = _context(self.settings.ca_file)
        self._backoff = Backoff(
            initial_delay=FIRST_RETRY_SECONDS,
            multiplier=RETRY_MULTIPLIER,
            max_delay=self.settings.push_interval,
            jitter=RETRY_JITTER_SECONDS,
            max_retries=0,  # not consulted: pushes are retried until one succeeds
        )
        self._registry: CollectorRegistry | None = None
        self._task: asyncio.Task[None] | None = None
        self.failures: Counter | None = None
        self.pushes = 0

    async def start(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self.failures = Counter(
            "cloudbridge_pushgateway_push_failures",
            "Pushes to the Pushgateway that failed (retried with backoff).",
            registry=registry,
        )
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await self._push_once()  # the final values, so short runs are seen too
        if self.settings.delete_on_exit:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._delete)

    async def _run(self) -> None:
        failures_in_a_row = 0
        while True:
            if await self._push_once():
                failures_in_a_row = 0
                await asyncio.sleep(self.settings.push_interval)
            else:
                await asyncio.sleep(self._backoff.delay_for(failures_in_a_row))
                failures_in_a_row += 1

    async def _push_once(self) -> bool:
        try:
            await asyncio.to_thread(self._push)
        except OSError as exc:  # urllib's URLError and HTTPError are OSErrors
            if self.failures is not None:
                self.failures.inc()
            log.warning(
                "push_failed", url=_without_credentials(self.settings.push_url), reason=str(exc)
            )
            return False
        self.pushes += 1
        return True

    def _push(self) -> None:
        assert self._registry is not None  # set by start()
        push_to_gateway(
            self.settings.push_url,
            job=self.settings.job,
            registry=self._registry,
            grouping_key=self._grouping,
            timeout=self.settings.timeout,
            handler=self._handler,
        )

    def _delete(self) -> None:
        delete_from_gateway(
            self.settings.push_url,
            job=self.settings.job,
            grouping_key=self._grouping,
            timeout=self.settings.timeout,
            handler=self._handler,
        )

    def _handler(
        self,
        url: str,
        method: str,
        timeout: float | None,
        headers: list[tuple[str, str]],
        data: bytes,
    ) -> Callable[[], None]:
        """One HTTP request: basic auth and a private CA when configured."""

        def handle() -> None:
            request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http(s) by schema
            for name, value in headers:
                request.add_header(name, value)
            if self.settings.username is not None:
                pair = f"{self.settings.username}:{self.settings.password or ''}".encode()
                request.add_header("Authorization", f"Basic {base64.b64encode(pair).decode()}")
            with urllib.request.urlopen(  # noqa: S310 - http(s) by schema
                request, timeout=timeout, context=self._context
            ) as response:
                if response.status >= 400:
                    raise OSError(f"{method} {url}: HTTP {response.status}")

        return handle


def _without_credentials(url: str) -> str:
    """The URL as it may be logged: ``user:password@`` in it is a secret."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _context(ca_file: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=ca_file) if ca_file else None
