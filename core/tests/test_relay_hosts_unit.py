"""Which relays a client tries (``relay.hosts``, else ``relay.host``), and what it says when
none of them answers (real sockets on loopback: nothing listens there)."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest
from cloudbridge_core.client.connection import relay_hosts, transport_order
from cloudbridge_core.client.race import RelayTarget, interleaved, race_relays, relay_targets
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


def test_a_names_addresses_keep_the_resolvers_order_once_each_families_alternating() -> None:
    v4, v6 = socket.AF_INET, socket.AF_INET6
    resolved = [
        (v6, "2001:db8::1"),
        (v6, "2001:db8::2"),
        (v4, "192.0.2.1"),
        (v6, "2001:db8::1"),  # once per socket type: the same address again
        (v6, "2001:db8::3"),
        (v4, "192.0.2.2"),
    ]
    assert interleaved(resolved) == [
        "2001:db8::1",
        "192.0.2.1",
        "2001:db8::2",
        "192.0.2.2",
        "2001:db8::3",
    ]
    assert interleaved([(v4, "192.0.2.1"), (v6, "2001:db8::1")]) == ["192.0.2.1", "2001:db8::1"]
    assert interleaved([]) == []


def test_addresses_are_dialled_as_they_are_and_a_name_as_each_of_its_addresses() -> None:
    async def main() -> None:
        found = await relay_targets(["127.0.0.6", "::1", "localhost"], 5)
        assert list(found) == ["127.0.0.6", "::1", "localhost"]
        assert found["127.0.0.6"] == [RelayTarget("127.0.0.6")]
        assert found["::1"] == [RelayTarget("::1")]
        named = found["localhost"]
        assert isinstance(named, list), named
        assert RelayTarget("127.0.0.1", "localhost") in named, named  # /etc/hosts
        assert all(target.server_name == "localhost" for target in named), named

    asyncio.run(main())


def test_a_name_that_does_not_resolve_fails_alone_and_the_others_are_tried() -> None:
    port = closed_port()
    missing = "cb-missing-relay.invalid"  # RFC 6761: never resolves
    chosen = config(
        **{
            "relay.hosts": [missing, "127.0.0.6"],
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
        assert f"no relay answered ({missing}, 127.0.0.6)" in message, message
        assert f"cannot resolve {missing}: " in message, message
        assert "127.0.0.6: refused" in message, message  # tried all the same

    asyncio.run(main())


def test_a_lone_name_that_does_not_resolve_says_so() -> None:
    chosen = config(
        **{
            "relay.host": "cb-missing-relay.invalid",
            "transport.mode": "tls",
            "transport.tls.port": closed_port(),
        }
    )
    candidates = transport_order(chosen, load_plugins())

    async def main() -> None:
        with pytest.raises(ServerUnavailable, match=r"cannot resolve cb-missing-relay\.invalid"):
            await race_relays(chosen, relay_hosts(chosen.settings.relay), candidates, 0.1, "t")

    asyncio.run(main())


def test_a_relay_port_that_resets_the_connection_gets_one_wording() -> None:
    """Whether the reset lands in the TCP or the TLS handshake, and whether the OS words it or
    not, the user reads the same reason."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    chosen = config(
        **{
            "relay.host": "127.0.0.1",
            "transport.mode": "tls",
            "transport.tls.port": port,
            "transport.connect_timeout": "5s",
        }
    )
    candidates = transport_order(chosen, load_plugins())

    async def drop_every_connection() -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(server)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

    async def main() -> str:
        dropping = asyncio.create_task(drop_every_connection())
        try:
            with pytest.raises(ServerUnavailable) as raised:
                await race_relays(chosen, relay_hosts(chosen.settings.relay), candidates, 0.1, "t")
        finally:
            dropping.cancel()
            server.close()
        return raised.value.message

    message = asyncio.run(main())
    assert f"cannot connect to 127.0.0.1:{port}: " in message
    assert "the connection was reset" in message, message
    assert "by peer" not in message, message
