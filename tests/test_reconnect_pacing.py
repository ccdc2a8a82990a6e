"""A relay paces new sessions (``server.admission``) and tells its clients how to spread
their return (issue 16); a real relay on loopback. How spread out 1,000 clients come back
is the recovery bench's to measure, not these tests'."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cloudbridge_core.client.connection import RelayConnection
from cloudbridge_core.client.link import RelayLink
from cloudbridge_core.errors import LimitExceeded, ServerUnavailable
from cloudbridge_core.relay import admission
from cloudbridge_core.testing.waiting import until
from relaybed import Bed, run

pytestmark = pytest.mark.timeout(60)


def test_clients_over_the_admission_rate_are_held_for_their_turn_and_all_connect(
    tmp_path: Path,
) -> None:
    """Each client connects once: the relay holds the hellos beyond its rate (``queued``)
    and welcomes each at its turn, rather than sending them away to connect again."""

    async def scenario(bed: Bed) -> None:
        config = bed.client_config(bed.token(), **{"metrics.enabled": False})
        links = [RelayLink(config, bed.plugins) for _ in range(4)]
        try:
            await asyncio.gather(*(link.start() for link in links))
            assert {link.status()["state"] for link in links} == {"connected"}
            assert len({link.status()["session_id"] for link in links}) == 4
            relay = bed.relay.relay
            # one admitted at once, the three others held 1, 2 and 3 s: none sent away
            assert relay.metrics.sessions_queued._value.get() == 3
            assert relay.metrics.sessions_deferred._value.get() == 0
            assert sum(relay.sessions_by_tenant.values()) == 4
        finally:
            await asyncio.gather(*(link.aclose() for link in links))

    run(tmp_path, scenario, admission={"rate": 1, "burst": 1})


def test_a_turn_beyond_the_queue_bound_is_a_slot_to_come_back_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "MAX_QUEUE_WAIT", 1.5)

    async def scenario(bed: Bed) -> None:
        first = await bed.connect()
        impatient = {"transport.connect_timeout": "0.5s"}
        # turns 1 s away (held: waited for past connect_timeout) and 2 s away (a slot)
        second, third = await asyncio.gather(
            bed.connect(**impatient), bed.connect(**impatient), return_exceptions=True
        )
        try:
            assert isinstance(second, RelayConnection)
            assert isinstance(third, ServerUnavailable)
            assert "come back in" in third.message
            # its turn, less however long the hellos took to arrive, is beyond the bound
            turn_wait = third.retry_after + admission.LEAD
            assert admission.MAX_QUEUE_WAIT < turn_wait <= 2 + 0.01
            metrics = bed.relay.relay.metrics
            assert metrics.sessions_queued._value.get() == 1
            assert metrics.sessions_deferred._value.get() == 1
        finally:
            await first.aclose()
            if isinstance(second, RelayConnection):
                await second.aclose()

    run(tmp_path, scenario, admission={"rate": 1, "burst": 1})


def test_a_client_held_for_its_turn_is_told_at_once_when_the_relay_starts_restarting(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        first = await bed.connect()
        held = asyncio.create_task(bed.connect())  # its turn is 10 s away
        try:
            await until(lambda: bed.relay.relay.metrics.sessions_queued._value.get() == 1)
            await bed.relay.relay.drain()
            with pytest.raises(ServerUnavailable, match="restarting"):
                async with asyncio.timeout(5):  # a hang guard: not its 10 s turn
                    await held
        finally:
            await first.aclose()

    run(tmp_path, scenario, admission={"rate": 0.1, "burst": 1})


def test_a_held_client_is_checked_again_at_its_turn_against_the_tenants_limit(
    tmp_path: Path,
) -> None:
    """Held clients passed the limit when they said hello; sessions opened during their
    wait count at their turn: the last one is refused, not let in beyond the limit."""

    async def scenario(bed: Bed) -> None:
        outcomes = await asyncio.gather(*(bed.connect() for _ in range(3)), return_exceptions=True)
        opened = [o for o in outcomes if isinstance(o, RelayConnection)]
        try:
            assert len(opened) == 2
            [refused] = [o for o in outcomes if not isinstance(o, RelayConnection)]
            assert isinstance(refused, LimitExceeded)
            assert bed.relay.relay.metrics.sessions_queued._value.get() == 2
        finally:
            for connection in opened:
                await connection.aclose()

    run(tmp_path, scenario, admission={"rate": 1, "burst": 1}, max_sessions_per_tenant=2)


def test_a_held_hello_ends_the_transport_race_no_other_transport_queues_too(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        first = await bed.connect()
        ports = {
            f"transport.{name}.port": listener.port
            for name, listener in bed.relay.listeners.items()
        }
        second = await bed.connect(
            **{"transport.mode": "auto", "transport.race_head_start": "50ms", **ports}
        )
        try:
            relay = bed.relay.relay
            assert relay.metrics.sessions_queued._value.get() == 1
            assert sum(relay.sessions_by_tenant.values()) == 2
        finally:
            await first.aclose()
            await second.aclose()

    run(tmp_path, scenario, admission={"rate": 1, "burst": 1})


def test_a_restarting_relay_asks_its_clients_to_spread_over_most_of_sessions_per_rate(
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
                window = admission.SPREAD_SHARE * 3 / 2  # sessions / rate
                assert connection.going_away.reconnect_in_seconds == pytest.approx(window)
            with pytest.raises(ServerUnavailable, match="restarting") as refused:
                await bed.connect()
            assert refused.value.retry_after is not None
            assert 0 <= refused.value.retry_after <= admission.SPREAD_SHARE * 3 / 2
        finally:
            for connection in connections:
                await connection.aclose()

    run(tmp_path, scenario, admission={"rate": 2, "burst": 3})
