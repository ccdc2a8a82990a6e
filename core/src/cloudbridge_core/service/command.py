"""What a service runs: ``p2p`` when the config turns the mesh on, else ``tunnel`` for its
``tunnels:`` (``p2p`` with ``p2p.enabled: false`` exits 2, and a service manager would
restart it forever)."""

from __future__ import annotations

from cloudbridge_core.config import Config
from cloudbridge_core.errors import UsageError


def client_command(config: Config) -> str:
    """``p2p`` or ``tunnel``; raises ``UsageError`` when the config gives neither anything
    to do."""
    if config.settings.p2p.enabled:
        return "p2p"
    if config.settings.tunnels:
        return "tunnel"
    raise UsageError(
        "nothing for the service to run: p2p.enabled is false and the config has no tunnels",
        hint="add tunnels: to the config, or set p2p.enabled: true",
    )
