"""The relay's admission pacing (``server.admission``): a rate, a burst, and for every client
over them a slot of its own, reserved: the next free time, presented by its id."""

from __future__ import annotations

import pytest
from cloudbridge_core.relay import admission as admission_module
from cloudbridge_core.relay.admission import SLOT_GRACE, Admission
from cloudbridge_core.settings import RateQuota


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_slots_one_interval_apart() -> None:
    clock = Clock()
    admission = Admission(lambda: RateQuota(rate=10, burst=3), clock)
    assert [admission.admit() for _ in range(3)] == [(0.0, "")] * 3
    deferred = [admission.admit() for _ in range(4)]
    # the burst took three turns at once; then one a tenth of a second, nobody sharing one
    assert [wait for wait, _ in deferred] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert len({slot for _, slot in deferred}) == 4


def test_a_client_back_at_its_slot_is_admitted_before_newcomers() -> None:
    clock = Clock()
    admission = Admission(lambda: RateQuota(rate=10, burst=1), clock)
    assert admission.admit() == (0.0, "")
    reserved = [admission.admit() for _ in range(3)]
    clock.now += 0.1
    newcomer, _ = admission.admit()
    assert newcomer == pytest.approx(0.3)  # after the slots reserved: none is taken from them
    for wait, slot in reserved:
        clock.now = 100.0 + wait
        assert admission.admit(slot) == (0.0, "")


def test_a_slot_is_single_use_and_early_comers_keep_theirs() -> None:
    clock = Clock()
    admission = Admission(lambda: RateQuota(rate=10, burst=1), clock)
    admission.admit()
    wait, slot = admission.admit()
    assert admission.admit(slot) == (pytest.approx(wait), slot)  # too early: the same slot
    clock.now += wait
    assert admission.admit(slot) == (0.0, "")
    again, other = admission.admit(slot)  # used: a newcomer's turn
    assert again > 0
    assert other != slot


def test_an_unknown_or_lapsed_slot_counts_for_nothing() -> None:
    clock = Clock()
    admission = Admission(lambda: RateQuota(rate=10, burst=1), clock)
    admission.admit()
    wait, slot = admission.admit()
    assert admission.admit("made-up")[0] > 0
    clock.now += wait + SLOT_GRACE + 1
    admission.admit()  # an idle relay's turn
    assert admission.admit(slot)[0] > 0


def test_reservations_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission_module, "MAX_SLOTS", 2)
    admission = Admission(lambda: RateQuota(rate=10, burst=1), Clock())
    admission.admit()
    slots = [admission.admit()[1] for _ in range(3)]
    assert slots[2] == ""  # told when, nothing held for it
    assert all(slots[:2])


def test_an_idle_relay_admits_at_once() -> None:
    clock = Clock()
    admission = Admission(lambda: RateQuota(rate=10, burst=1), clock)
    admission.admit()
    admission.admit()
    clock.now += 60
    assert admission.admit() == (0.0, "")
    assert admission.admit()[0] == pytest.approx(0.1)


def test_a_reloaded_rate_applies_to_the_next_hello() -> None:
    clock = Clock()
    quota = RateQuota(rate=1, burst=1)
    admission = Admission(lambda: quota, clock)
    admission.admit()
    assert admission.admit()[0] == pytest.approx(1.0)
    quota = RateQuota(rate=1000, burst=2000)
    # the slot reserved at the old rate stays; the next turns come at the new one
    assert admission.admit()[0] < 0.01
    clock.now += 0.01
    assert admission.admit() == (0.0, "")


def test_the_goaway_window_is_the_sessions_over_the_rate_at_least_a_second() -> None:
    admission = Admission(lambda: RateQuota(rate=95, burst=3))
    assert admission.spread_window(1000) == pytest.approx(1000 / 95)
    assert admission.spread_window(3) == 1.0
