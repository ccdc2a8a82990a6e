"""The peer that only follows asks the controlling one for attempts when it loses its path
(issue 16, roaming: its new address cuts its direct path and its relay session, and the
controlling peer, idle, believes its own direct path still works), again over each relay
session joined since, until attempts begin; and the controlling peer begins them at once.

A :class:`PeerManager` without its relay link: only the membership and sessions these
decisions read are faked, and ``_begin`` is recorded rather than run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cloudbridge_core.p2p.manager import (
    ATTEMPT_TIMEOUT,
    RETRY,
    UPGRADE_ATTEMPT_FLOOR,
    Attempt,
    PeerManager,
    PeerState,
)
from cloudbridge_core.p2p.session import PeerSession
from cloudbridge_core.providers import PeerInfo
from cloudbridge_core.settings import P2PSettings

pytestmark = pytest.mark.timeout(30)


@dataclass
class FakeMembership:
    joined_at: float = field(default_factory=time.time)
    sent: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    async def send_signal(self, peer_id: str, kind: str, body: Mapping[str, Any]) -> None:
        self.sent.append((peer_id, kind, dict(body)))


@dataclass
class FakeSession:
    current: str | None = "stun"


def manager_with_peer(*, controlling: bool) -> tuple[PeerManager, PeerState, FakeMembership]:
    manager = object.__new__(PeerManager)
    membership = FakeMembership()
    manager.membership = membership  # type: ignore[assignment]
    manager.strategies = [("ice", object()), ("derp", object())]  # type: ignore[list-item]
    manager._closed = False
    manager._tasks = set()
    manager._tcp_enabled = manager._relayed_enabled = False
    info = PeerInfo(peer_id="peer", name="server", public_key="", certificate="")
    state = PeerState(info, cast(PeerSession, FakeSession()), controlling)
    manager.peers = {info.peer_id: state}
    return manager, state, membership


async def settle(manager: PeerManager) -> None:
    await asyncio.gather(*manager._tasks)


def test_the_following_peer_asks_when_its_path_gets_worse_and_again_after_a_rejoin() -> None:
    asyncio.run(follower_asks())


async def follower_asks() -> None:
    manager, state, membership = manager_with_peer(controlling=False)

    async def run(*args: object) -> None:
        pass

    manager._channel = lambda *args: None  # type: ignore[assignment,method-assign,return-value]
    manager._run = run  # type: ignore[method-assign]
    session = cast(FakeSession, state.session)
    manager._ask_when_worse(state)  # on stun: nothing to ask
    session.current = None  # its address changed: the path, and DERP with the relay session
    manager._ask_when_worse(state)
    await settle(manager)
    assert membership.sent == [("peer", RETRY, {"reason": "stun path lost"})]
    manager._ask_when_worse(state)  # the same relay session: not again
    await settle(manager)
    assert len(membership.sent) == 1
    membership.joined_at = time.time() + 1  # the first ask went over a dead session
    manager._ask_when_worse(state)
    await settle(manager)
    assert len(membership.sent) == 2
    manager._signalled("peer", "ice", {"attempt": 7, "begin": True})  # asked, and answered
    await settle(manager)
    membership.joined_at = time.time() + 2
    manager._ask_when_worse(state)
    assert state.asking_since is None
    await settle(manager)
    assert len(membership.sent) == 2


def test_the_controlling_peer_begins_every_attempt_not_under_way_when_asked() -> None:
    asyncio.run(controlling_begins())


async def controlling_begins() -> None:
    manager, state, _ = manager_with_peer(controlling=True)
    begun: list[str] = []

    async def begin(state: PeerState, name: str) -> None:
        begun.append(name)

    manager._begin = begin  # type: ignore[method-assign]
    state.attempts["derp"] = Attempt("derp", 3)  # trying
    state.attempts["ice"] = Attempt("ice", 2, "established", details={"kind": "stun"})
    manager._signalled("peer", RETRY, {"reason": "stun path lost"})
    await settle(manager)
    assert begun == ["ice"]  # its stun path looks fine from here, and is tried again anyway


def test_upgrade_attempts_begin_an_interval_apart_from_start_to_start() -> None:
    """A failing ICE attempt takes its whole 15 s; counted from its end, the next began
    25 s after it with a 10 s interval, and a path that came back waited up to that long."""
    manager, state, membership = manager_with_peer(controlling=True)
    manager.settings = cast(P2PSettings, SimpleNamespace(upgrade_interval=10.0))
    membership.joined_at = 0.0
    now = time.time()
    failed = Attempt("ice", 4, "failed", started_at=now - 15, ended_at=now)
    state.attempts["ice"] = failed
    cast(FakeSession, state.session).current = "derp"
    assert manager._due(state, "ice")  # 15 s since it began: due, though it just ended
    failed.started_at = now - 5
    assert not manager._due(state, "ice")
    cast(FakeSession, state.session).current = None  # no path at all: 2 s after the end
    failed.ended_at = now - 3
    assert manager._due(state, "ice")


def test_an_upgrade_attempt_lasts_at_most_the_upgrade_interval_but_at_least_the_floor() -> None:
    """An attempt begun while UDP was dropped cannot succeed once it is back: it must not
    hold off the next one beyond the upgrade interval (it ran 15 s, 10 s apart)."""
    manager, state, _ = manager_with_peer(controlling=True)
    session = cast(FakeSession, state.session)
    manager.settings = cast(P2PSettings, SimpleNamespace(upgrade_interval=10.0))
    session.current = "derp"
    assert manager._attempt_timeout(state) == 10.0
    session.current = None  # nothing works: the whole bound
    assert manager._attempt_timeout(state) == ATTEMPT_TIMEOUT
    manager.settings = cast(P2PSettings, SimpleNamespace(upgrade_interval=1.0))
    session.current = "turn"
    assert manager._attempt_timeout(state) == UPGRADE_ATTEMPT_FLOOR
