"""The relay's admission pacing (``server.admission``): a rate, a burst, and a slot of its
own for every client over them, one ``1 / rate`` after the last one handed out."""

from __future__ import annotations

import pytest
from cloudbridge_core.relay.admission import Admission
from cloudbridge_core.settings import RateQuota


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_then_slots_one_interval_apart() -> None:
    clock = Clock()
    admission = Admission(lambda: RateQuota(rate=10, burst=3), clock)
    assert [admission.admit() for _ in range(3)] == [0.0, 0.0, 0.0]
    slots = [admission.admit() for _ in range(4)]
    # the burst used the next 0.3 s of the rate; then nobody shares a slot
    assert slots == pytest.approx([0.3, 0.4, 0.5, 0.6])


def test_a_client_back_at_its_slot_is_admitted() -> None:
    clock = Clock()
    admission = Admission(lambda: RateQuota(rate=10, burst=1), clock)
    assert admission.admit() == 0.0
    slots = [admission.admit() for _ in range(3)]
    for slot in slots:
        clock.now = 100.0 + slot
        assert admission.admit() == 0.0
    assert admission.admit() == pytest.approx(0.1 * 4 - 0.3)  # after the slots handed out


def test_an_idle_relay_admits_at_once_and_forgets_old_slots() -> None:
    clock = Clock()
    admission = Admission(lambda: RateQuota(rate=10, burst=1), clock)
    admission.admit()
    admission.admit()
    clock.now += 60
    assert admission.admit() == 0.0
    assert admission.admit() == pytest.approx(0.1)


def test_a_reloaded_rate_applies_to_the_next_hello() -> None:
    clock = Clock()
    quota = RateQuota(rate=1, burst=1)
    admission = Admission(lambda: quota, clock)
    admission.admit()
    assert admission.admit() == pytest.approx(1.0)
    quota = RateQuota(rate=1000, burst=2000)
    assert admission.admit() == 0.0


def test_the_goaway_window_is_the_sessions_over_the_rate_at_least_a_second() -> None:
    admission = Admission(lambda: RateQuota(rate=95, burst=3))
    assert admission.spread_window(1000) == pytest.approx(1000 / 95)
    assert admission.spread_window(3) == 1.0
