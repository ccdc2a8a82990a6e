"""A relay that goes silent with its connections still open (black-holed) is found within
``health_check_interval + connect_timeout`` (issue 16): one measurement's pings share one
deadline, so the check that finds it waits one ``connect_timeout`` once, not once per ping.
The new session names the lost one, and the relay closes it at once. How long detection
takes is reported by the bench, not asserted here."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.client.metrics import ClientMetrics
from cloudbridge_core.testing.blackhole import Blackhole
from relaybed import Bed, run

pytestmark = pytest.mark.timeout(120)


def test_a_silent_relay_is_found_by_one_unanswered_ping_and_the_session_replaced(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        proxy = Blackhole(bed.relay.listeners["tls"].port)
        config = bed.client_config(
            bed.token(),
            **{
                "transport.tls.port": await proxy.start(),
                "transport.health_check_interval": "1s",
                "transport.connect_timeout": "2s",
                "metrics.enabled": False,
            },
        )
        metrics = ClientMetrics(["tls"])
        link = RelayLink(config, bed.plugins, metrics)
        await link.start()
        try:
            first = link.status()["session_id"]
            proxy.swallow_open_connections()
            for _ in range(200):
                if link.status()["session_id"] not in (first, None):
                    break
                await asyncio.sleep(0.05)
            assert link.status()["session_id"] not in (first, None), link.status()
            assert link.status()["state"] == "connected"
            # the check that found it sent one ping and waited one connect_timeout
            assert metrics.heartbeat_failures._value.get() == 1
            # the new hello named the silent session: the relay closed it at once, where it
            # would otherwise hold it beside the new one until its heartbeat timeout
            relay = bed.relay.relay
            assert relay.metrics.sessions_replaced._value.get() == 1
            for _ in range(100):
                if sum(relay.sessions_by_tenant.values()) == 1:
                    break
                await asyncio.sleep(0.02)
            assert dict(relay.sessions_by_tenant) == {"acme": 1}
        finally:
            await link.aclose()
            await proxy.aclose()

    run(tmp_path, scenario)
