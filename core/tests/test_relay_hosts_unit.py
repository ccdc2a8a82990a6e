"""Which relays a client tries (``relay.hosts``, else ``relay.host``), and what it says when
none of them answers (real sockets on loopback: nothing listens there)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from cloudbridge_core.client.connection import relay_hosts, transport_order
from cloudbridge_core.client.race import race_relays
from cloudbridge_core.config import Config, load_config
from cloudbridge_core.errors import ServerUnavailable
from cloudbridge_core.plugins import load_plugins

pytestmark = pytest.mark.timeout(30)


def config(**settings: Any) -> Config:
    return load_config(
        None, environ={}, overrides={key: (value, "test") for key, value in settings.items()}
    )


def test_without_relay_hosts_the_client_tries_relay_host() -> None:
    assert relay_hosts(config(**{"relay.host": "relay.example"}).settings.relay) == (
        "relay.example",
    )


def test_relay_hosts_replace_relay_host_in_their_order_each_once() -> None:
    chosen = config(
        **{
            "relay.host": "unused.example",
            "relay.hosts": ["b.example", "a.example", "b.example"],
        }
    )
    assert relay_hosts(chosen.settings.relay) == ("b.example", "a.example")


def closed_port() -> int:
    """A port nothing listens on, on every 127/8 address (bound, never listening)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_when_no_relay_answers_the_error_names_every_relay_tried() -> None:
    port = closed_port()
    hosts = ["127.0.0.6", "127.0.0.7"]
    chosen = config(
        **{
            "relay.hosts": hosts,
            "transport.mode": "tls",
            "transport.tls.port": port,
            "transport.connect_timeout": "5s",
        }
    )
    candidates = transport_order(chosen, load_plugins())

    async def main() -> None:
        with pytest.raises(ServerUnavailable) as raised:
            await race_relays(chosen, relay_hosts(chosen.settings.relay), candidates, 0.1, "t")
        message = raised.value.message
        assert "no relay answered (127.0.0.6, 127.0.0.7)" in message, message
        assert "nothing listens at 127.0.0.6" in message, message
        assert "127.0.0.7: refused" in message, message

    asyncio.run(main())
