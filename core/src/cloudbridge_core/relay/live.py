"""A serving relay following its config file: what a reload changes at once, what waits.

Applied live, to what comes next (new hellos, sessions, tunnels and streams), while the
sessions and tunnels already open carry on: ``server.egress``, the limits and timeouts of
:class:`~cloudbridge_core.relay.server.RelayLimits`, ``metrics.tenant_labels`` and the
auth provider's own section (``auth.jwt``: keys, JWKS URL, issuer, audience). A part the
relay cannot use (an egress rule it cannot parse, an auth section its provider rejects) is
refused alone, logged naming the section at fault, and the part in force stays in force.

Everything else the relay reads is set up once, at start. The schema marks those keys
``"x-restart-required": true`` and the watcher logs a change to one as ``restart_required``;
this module does the same for what the schema cannot mark because a client applies it
live: ``auth.type`` (a client takes a new token source at once) and ``relay.host`` (the
relay's public host while ``server.public_host`` is unset), and for the section of a
transport the relay serves (a plugin's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cloudbridge_core.config import Config
from cloudbridge_core.config.reload import ConfigWatcher
from cloudbridge_core.errors import ConfigError
from cloudbridge_core.log import get_logger
from cloudbridge_core.plugins import Plugins
from cloudbridge_core.relay.egress import EgressPolicy
from cloudbridge_core.relay.runner import RunningRelay, load_auth
from cloudbridge_core.relay.server import RelayLimits

log = get_logger("relay.reload")


class LiveConfig:
    """Applies each reloaded config to ``running`` (a :class:`ConfigWatcher` subscriber);
    ``config`` is the one the relay started with."""

    def __init__(
        self, running: RunningRelay, config: Config, plugins: Plugins, *, dev: bool
    ) -> None:
        self._running = running
        self._started = config
        self._previous = config
        self._plugins = plugins
        self._dev = dev
        self._egress = config.settings.server.egress
        self._tenant_labels = config.settings.metrics.tenant_labels
        self._auth_section = self._auth_section_of(config)

    def apply(self, config: Config) -> list[str]:
        """Apply what can be applied now; return those keys (for the ``reloaded`` line)."""
        live = [*self._apply_egress(config), *self._apply_limits(config)]
        labels = config.settings.metrics.tenant_labels
        if labels != self._tenant_labels:
            self._running.relay.metrics.label_tenants(labels)
            self._tenant_labels = labels
            live.append("metrics.tenant_labels")
        live += self._apply_auth(config)
        waiting = self._restart_required(self._previous, config)
        self._previous = config
        if waiting:
            log.warning(
                "restart_required",
                keys=waiting,
                note="the relay serves with the values it started with until it restarts",
            )
        return live

    def _apply_egress(self, config: Config) -> list[str]:
        egress = config.settings.server.egress
        if egress == self._egress:
            return []
        try:
            policy = EgressPolicy.from_settings(
                egress, dev=self._dev, own_ports=self._running.relay.egress.own_ports
            )
        except ConfigError as error:
            _refused("server.egress", error, "the egress policy in force stays")
            return []
        self._running.relay.egress = policy
        self._egress = egress
        return ["server.egress"]

    def _apply_limits(self, config: Config) -> list[str]:
        relay = self._running.relay
        limits = RelayLimits.from_settings(config.settings.server, config.settings.performance)
        changed = [
            "performance.buffer_size" if field.name == "buffer_size" else f"server.{field.name}"
            for field in dataclasses.fields(RelayLimits)
            if getattr(limits, field.name) != getattr(relay.limits, field.name)
        ]
        relay.limits = limits
        return changed

    def _apply_auth(self, config: Config) -> list[str]:
        if config.settings.auth.type != self._started.settings.auth.type:
            return []  # another provider takes a restart (logged as restart_required)
        path, section = self._auth_section_of(config)
        if section == self._auth_section[1]:
            return []
        try:
            provider = load_auth(config, self._plugins, self._running.state)
        except ConfigError as error:
            _refused(path, error, "the auth provider in force stays; sessions are unaffected")
            return []
        self._running.relay.auth = provider
        self._running.load_auth_keys()
        self._auth_section = path, section
        return [path]

    def _auth_section_of(self, config: Config) -> tuple[str, Mapping[str, Any]]:
        kind = config.settings.auth.type
        path = self._plugins.section_path("auth_provider", kind) or f"auth.{kind}"
        return path, config.section(path)

    def _restart_required(self, before: Config, after: Config) -> list[str]:
        keys = ["auth.type"] if after.settings.auth.type != before.settings.auth.type else []
        for name in self._running.listeners:
            path = self._plugins.section_path("transport", name)
            if path and before.section(path) != after.section(path):
                keys.append(path)
        settings, earlier = after.settings, before.settings
        if settings.server.public_host is None and settings.relay.host != earlier.relay.host:
            keys.append("relay.host")  # the relay's public host while server.public_host is unset
        return keys


def follow(
    running: RunningRelay,
    config: Config,
    plugins: Plugins,
    load: Callable[[], Config],
    path: Path,
    *,
    dev: bool,
) -> ConfigWatcher:
    """A watcher of the relay's config file ``path`` (reloaded with ``load``) that applies
    each new config to ``running``; enter it with ``async with``."""
    watcher = ConfigWatcher(path, load, config)
    running.relay.metrics.watch_reloads(watcher)
    watcher.subscribe(LiveConfig(running, config, plugins, dev=dev).apply)
    return watcher


def _refused(section: str, error: ConfigError, note: str) -> None:
    log.warning(
        "reload_refused",
        section=section,
        errors=[str(issue) for issue in error.issues],
        note=note,
    )
