"""The circuit breaker against a simple model, driven by hypothesis with a fake clock."""

from __future__ import annotations

import asyncio

import pytest
from cloudbridge_core import errors
from cloudbridge_core.breaker import BreakerSettings, BreakerState, CircuitBreaker
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

SETTINGS = BreakerSettings(
    failure_threshold=3, reset_timeout=10.0, half_open_max_calls=2, success_threshold=2
)


class BreakerModel(RuleBasedStateMachine):
    """Compares the breaker with the documented rules, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.transitions: list[tuple[BreakerState, BreakerState]] = []
        self.breaker = CircuitBreaker(
            "relay",
            SETTINGS,
            clock=lambda: self.now,
            on_transition=lambda _n, a, b: self.transitions.append((a, b)),
        )
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.trials = 0
        self.successes = 0

    def _refresh(self) -> None:
        if self.state is BreakerState.OPEN and self.now >= self.opened_at + SETTINGS.reset_timeout:
            self.state, self.trials, self.successes = BreakerState.HALF_OPEN, 0, 0

    @rule(seconds=st.floats(min_value=0, max_value=15))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self._refresh()

    @rule(fails=st.booleans())
    def call(self, fails: bool) -> None:
        self._refresh()
        admitted = self.state is BreakerState.CLOSED or (
            self.state is BreakerState.HALF_OPEN and self.trials < SETTINGS.half_open_max_calls
        )
        if not admitted:
            with pytest.raises(errors.CircuitOpen) as refused:
                self.breaker.allow()
            if self.state is BreakerState.OPEN:
                assert refused.value.retry_after == pytest.approx(
                    self.opened_at + SETTINGS.reset_timeout - self.now
                )
            return
        self.breaker.allow()
        if self.state is BreakerState.HALF_OPEN:
            self.trials += 1
        if fails:
            self.breaker.record_failure()
            self._model_failure()
        else:
            self.breaker.record_success()
            self._model_success()

    @precondition(lambda self: self.state is BreakerState.HALF_OPEN)
    @rule()
    def trial_in_flight(self) -> None:
        """A trial call admitted but not finished yet holds its slot."""
        if self.trials < SETTINGS.half_open_max_calls:
            self.breaker.allow()
            self.trials += 1

    def _model_failure(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._open()
        else:
            self.consecutive_failures += 1
            if self.consecutive_failures >= SETTINGS.failure_threshold:
                self._open()

    def _model_success(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.trials -= 1
            self.successes += 1
            if self.successes >= SETTINGS.success_threshold:
                self.state, self.consecutive_failures = BreakerState.CLOSED, 0
        else:
            self.consecutive_failures = 0

    def _open(self) -> None:
        self.state, self.opened_at, self.consecutive_failures = BreakerState.OPEN, self.now, 0

    @invariant()
    def same_state(self) -> None:
        self._refresh()
        assert self.breaker.state is self.state

    @invariant()
    def transitions_are_legal(self) -> None:
        legal = {
            (BreakerState.CLOSED, BreakerState.OPEN),
            (BreakerState.OPEN, BreakerState.HALF_OPEN),
            (BreakerState.HALF_OPEN, BreakerState.OPEN),
            (BreakerState.HALF_OPEN, BreakerState.CLOSED),
        }
        assert set(self.transitions) <= legal


TestBreakerModel = BreakerModel.TestCase


def test_guard_counts_only_endpoint_failures() -> None:
    breaker = CircuitBreaker("relay", BreakerSettings(failure_threshold=2))

    async def fail_with(error: BaseException) -> None:
        with pytest.raises(type(error)):
            async with breaker.guard():
                raise error

    async def scenario() -> None:
        await fail_with(errors.InvalidToken("rejected"))
        await fail_with(errors.InvalidToken("rejected"))
        assert breaker.state is BreakerState.CLOSED
        await fail_with(errors.ServerUnavailable("down"))
        await fail_with(ConnectionRefusedError())
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(errors.CircuitOpen):
            async with breaker.guard():
                pytest.fail("an open circuit must not admit calls")

    asyncio.run(scenario())


def test_settings_from_config() -> None:
    settings = BreakerSettings.from_config({"failure_threshold": 7, "reset_timeout": "1m"})
    assert settings == BreakerSettings(failure_threshold=7, reset_timeout=60.0)
