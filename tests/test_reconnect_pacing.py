"""A relay paces new sessions (``server.admission``) and tells its clients how to spread
their return (issue 16); a real relay on loopback. How spread out 1,000 clients come back
is the recovery bench's to measure, not these tests'."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.errors import ServerUnavailable
from relaybed import Bed, run

pytestmark = pytest.mark.timeout(60)


def test_clients_over_the_admission_rate_wait_for_their_slot_and_all_connect(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        config = bed.client_config(bed.token(), **{"metrics.enabled": False})
        links = [RelayLink(config, bed.plugins) for _ in range(4)]
        try:
            await asyncio.gather(*(link.start() for link in links))
            assert {link.status()["state"] for link in links} == {"connected"}
            assert len({link.status()["session_id"] for link in links}) == 4
            relay = bed.relay.relay
            # one admitted at once, each of the three others given a slot and let in on it
            assert relay.metrics.sessions_deferred._value.get() == 3
            assert sum(relay.sessions_by_tenant.values()) == 4
        finally:
            await asyncio.gather(*(link.aclose() for link in links))

    run(tmp_path, scenario, admission={"rate": 1, "burst": 1})


def test_a_one_shot_connect_waits_for_a_near_slot_and_reports_a_far_one(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        first = await bed.connect()
        second = await bed.connect()  # its slot is 1 s away: within connect_timeout
        # it came back with the slot's id and was let in on it, not deferred again
        assert bed.relay.relay.metrics.sessions_deferred._value.get() == 1
        try:
            with pytest.raises(ServerUnavailable, match="come back in") as refused:
                await bed.connect(**{"transport.connect_timeout": "0.2s"})
            assert refused.value.retry_after == pytest.approx(0.75, abs=0.3)
        finally:
            await first.aclose()
            await second.aclose()

    run(tmp_path, scenario, admission={"rate": 1, "burst": 1})


def test_a_restarting_relay_asks_its_clients_to_spread_over_sessions_per_rate(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        connections = [await bed.connect() for _ in range(3)]
        try:
            await bed.relay.relay.drain()
            for connection in connections:
                for _ in range(100):
                    if connection.going_away is not None:
                        break
                    await asyncio.sleep(0.02)
                assert connection.going_away is not None
                assert connection.going_away.reconnect_in_seconds == pytest.approx(1.5)
            with pytest.raises(ServerUnavailable, match="restarting") as refused:
                await bed.connect()
            assert refused.value.retry_after is not None
            assert 0 <= refused.value.retry_after <= 1.5
        finally:
            for connection in connections:
                await connection.aclose()

    run(tmp_path, scenario, admission={"rate": 2, "burst": 3})
