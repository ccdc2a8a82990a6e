"""Issue 18, quiet terminals: a path attempt failing again for the same reason (TURN with
no server, at every upgrade round, for every peer) is logged once at info, then at debug
until the reason changes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from cloudbridge_core.p2p.manager import Attempt, PeerManager, PeerState
from structlog.testing import capture_logs

NO_SERVER = "no TURN server: the relay issues no TURN credentials"


def _state(name: str) -> PeerState:
    info = cast("Any", SimpleNamespace(name=name))
    return PeerState(info=info, session=cast("Any", None), controlling=True)


def _fail(state: PeerState, strategy: str, reason: str) -> None:
    PeerManager._attempt_failed(state, Attempt(strategy, 1), reason)


def test_a_repeated_failure_is_logged_once_then_when_it_changes() -> None:
    db1, db2 = _state("db1"), _state("db2")
    with capture_logs() as logs:
        _fail(db1, "turn", NO_SERVER)
        _fail(db1, "turn", NO_SERVER)
        _fail(db1, "turn", NO_SERVER)
        _fail(db2, "turn", NO_SERVER)  # another peer: its own news
        _fail(db1, "stun", "no path within 15s")  # another strategy
        _fail(db1, "turn", "401 Unauthorized")  # the reason changed
        _fail(db1, "turn", "401 Unauthorized")
    seen = [
        (entry["log_level"], entry["peer"], entry["strategy"], entry["reason"]) for entry in logs
    ]
    assert seen == [
        ("info", "db1", "turn", NO_SERVER),
        ("debug", "db1", "turn", NO_SERVER),
        ("debug", "db1", "turn", NO_SERVER),
        ("info", "db2", "turn", NO_SERVER),
        ("info", "db1", "stun", "no path within 15s"),
        ("info", "db1", "turn", "401 Unauthorized"),
        ("debug", "db1", "turn", "401 Unauthorized"),
    ]


class _NoServer:
    """A strategy that says it cannot work (as TURN without any server)."""

    def unavailable(self) -> str:
        return NO_SERVER

    async def connect(self, peer: Any, signal: Any) -> Any:
        raise AssertionError("attempted although unavailable")


def test_an_unavailable_strategy_is_not_attempted() -> None:
    state = _state("db1")
    manager = cast("Any", SimpleNamespace(strategies=[("turn", _NoServer())]))
    with capture_logs() as logs:
        asyncio.run(PeerManager._begin(manager, state, "turn"))
    assert state.numbers == 0  # no attempt began: nothing signalled to the peer
    assert [(e["event"], e["log_level"], e["reason"]) for e in logs] == [
        ("path_attempt_skipped", "debug", NO_SERVER)
    ]
