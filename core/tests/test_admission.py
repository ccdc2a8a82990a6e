"""The relay's admission pacing (``server.admission``): a rate, a burst, and for every client
over them a turn of its own: held at the relay when near, else a reserved slot to come
back to (a little early) with its id."""

from __future__ import annotations

import pytest
from cloudbridge_core.relay import admission as admission_module
from cloudbridge_core.relay.admission import (
    HOLD,
    LEAD,
    MAX_QUEUE_WAIT,
    NOW,
    SLOT_GRACE,
    SPREAD_SHARE,
    Admission,
    Turn,
)
from cloudbridge_core.settings import RateQuota


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def paced(rate: float, burst: int = 1) -> tuple[Admission, Clock]:
    clock = Clock()
    return Admission(lambda: RateQuota(rate=rate, burst=burst), clock), clock


def test_a_burst_then_near_turns_held_then_slots_one_interval_apart() -> None:
    admission, _ = paced(rate=10, burst=3)
    assert [admission.admit() for _ in range(3)] == [NOW] * 3
    held = [admission.admit() for _ in range(5)]
    # the burst took three turns at once; the next five are within HOLD: waited for here
    assert [turn.hold for turn in held] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    deferred = [admission.admit() for _ in range(3)]
    assert [turn.retry_in for turn in deferred] == pytest.approx(
        [0.6 - LEAD, 0.7 - LEAD, 0.8 - LEAD]
    )
    assert len({turn.slot for turn in deferred}) == 3
    assert all(turn.slot for turn in deferred)


def test_clients_back_with_their_slots_go_before_newcomers() -> None:
    admission, clock = paced(rate=1)
    assert admission.admit() == NOW
    reserved = [admission.admit() for _ in range(3)]  # turns at +1, +2, +3
    assert [turn.retry_in for turn in reserved] == pytest.approx([1 - LEAD, 2 - LEAD, 3 - LEAD])
    clock.now += 0.5
    newcomer = admission.admit()
    assert newcomer.retry_in == pytest.approx(3.5 - LEAD)  # after the slots: none taken
    for turn in reserved:
        clock.now = 100.0 + turn.retry_in  # back LEAD early, as told
        assert admission.admit(turn.slot) == Turn(hold=pytest.approx(LEAD))


def test_a_late_client_is_let_in_at_once_and_a_slot_serves_once() -> None:
    admission, clock = paced(rate=1)
    admission.admit()
    turn = admission.admit()
    clock.now += 3
    assert admission.admit(turn.slot) == NOW
    assert admission.admit() == NOW  # a newcomer takes the next turn
    again = admission.admit(turn.slot)  # used: a newcomer's answer, a slot of its own
    assert again.retry_in == pytest.approx(1 - LEAD)
    assert again.slot not in ("", turn.slot)


def test_a_client_far_too_early_keeps_its_slot() -> None:
    admission, _ = paced(rate=1)
    admission.admit()
    admission.admit()
    turn = admission.admit()  # at +2
    assert admission.admit(turn.slot) == Turn(retry_in=pytest.approx(2 - LEAD), slot=turn.slot)


def test_an_unknown_or_lapsed_slot_counts_for_nothing() -> None:
    admission, clock = paced(rate=1)
    admission.admit()
    turn = admission.admit()
    assert admission.admit("made-up").retry_in > HOLD
    clock.now += 1 + SLOT_GRACE + 10
    admission.admit()  # an idle relay's turn
    assert admission.admit(turn.slot) != NOW


def test_reservations_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission_module, "MAX_SLOTS", 2)
    admission, _ = paced(rate=1)
    admission.admit()
    turns = [admission.admit() for _ in range(3)]
    assert turns[2].slot == ""  # told when, nothing held for it
    assert turns[2].retry_in == pytest.approx(3)  # no slot to be held for it early
    assert all(turn.slot for turn in turns[:2])


def test_an_idle_relay_admits_at_once() -> None:
    admission, clock = paced(rate=1)
    admission.admit()
    admission.admit()
    clock.now += 60
    assert admission.admit() == NOW


def test_a_reloaded_rate_applies_to_the_next_hello() -> None:
    clock = Clock()
    quota = RateQuota(rate=1, burst=1)
    admission = Admission(lambda: quota, clock)
    admission.admit()
    assert admission.admit().retry_in == pytest.approx(1 - LEAD)
    quota = RateQuota(rate=1000, burst=2000)
    # the slot reserved at the old rate stays; the next turns come at the new one
    assert admission.admit().hold < 0.01
    clock.now += 0.01
    assert admission.admit() == NOW


def test_the_goaway_window_is_most_of_the_sessions_over_the_rate_at_least_a_second() -> None:
    admission, _ = paced(rate=95, burst=3)
    assert admission.spread_window(1000) == pytest.approx(SPREAD_SHARE * 1000 / 95)
    assert admission.spread_window(3) == 1.0


def test_a_client_that_can_wait_is_held_for_a_turn_up_to_the_queue_bound() -> None:
    admission, _ = paced(rate=1)
    admission.admit()
    queued = [admission.admit(can_wait=True) for _ in range(int(MAX_QUEUE_WAIT))]
    assert [turn.hold for turn in queued] == pytest.approx(range(1, int(MAX_QUEUE_WAIT) + 1))
    assert not any(turn.slot for turn in queued)  # nothing reserved: the relay holds them
    beyond = admission.admit(can_wait=True)
    assert beyond.retry_in == pytest.approx(MAX_QUEUE_WAIT + 1 - LEAD)
    assert beyond.slot


def test_turns_a_late_loop_let_pass_are_caught_up_within_the_pace_of_a_second() -> None:
    """A busy loop comes back to three held turns only after the last was due: the first
    two start at once (the pace allows two in a second), the third a second later."""
    admission, clock = paced(rate=2)
    holds = [admission.admit(can_wait=True).hold for _ in range(3)]
    assert holds == pytest.approx([0, 0.5, 1.0])
    clock.now += 1.5
    assert [admission.room_to_start() for _ in holds] == pytest.approx([0, 0, 1.0])


def test_sessions_start_no_more_than_the_pace_allows_in_any_second() -> None:
    """Counted by when they did start: turns that come due together wait for room in the
    last second rather than crowd it."""
    admission, clock = paced(rate=2, burst=2)  # three a second at most
    assert [admission.room_to_start() for _ in range(3)] == [0, 0, 0]
    clock.now += 0.4
    assert admission.room_to_start() == pytest.approx(0.6)  # until the first is a second old
    clock.now += 0.6  # the first three are a second old: room for three more
    assert [admission.room_to_start() for _ in range(4)] == pytest.approx([0, 0, 0, 1.0])
    clock.now += 0.5
    assert admission.room_to_start() == pytest.approx(0.5)
