"""The circuit breaker against a simple model, driven by hypothesis with a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import pytest
from cloudbridge_core import errors
from cloudbridge_core.breaker import BreakerState, CircuitBreaker
from cloudbridge_core.config import load_config
from cloudbridge_core.settings import BreakerSettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

settings_strategy = st.builds(
    BreakerSettings,
    failure_threshold=st.integers(min_value=1, max_value=4),
    reset_timeout=st.floats(min_value=0.5, max_value=20),
    half_open_max_calls=st.integers(min_value=1, max_value=3),
    success_threshold=st.integers(min_value=1, max_value=3),
)
# How a guarded call ends (the error its body raises), and what that must count as.
OUTCOMES: dict[str, tuple[Callable[[], BaseException] | None, str]] = {
    "success": (None, "success"),
    "endpoint failure": (lambda: errors.ServerUnavailable("down"), "failure"),
    "connection refused": (ConnectionRefusedError, "failure"),
    "answered": (lambda: errors.InvalidToken("rejected"), "success"),  # the endpoint is up
    "bug": (lambda: KeyError("oops"), "release"),
    "cancelled": (asyncio.CancelledError, "release"),
}


@dataclass
class InFlight:
    """A call admitted by ``guard()`` whose body has not finished yet."""

    guard: AbstractAsyncContextManager[None]
    epoch: int


class BreakerModel(RuleBasedStateMachine):
    """Compares the breaker with the documented rules, step by step.

    ``epoch`` counts the model's transitions: an outcome of a guarded call admitted in an
    earlier epoch must be ignored.
    """

    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        # guard() is an async generator: enter and exit it on one loop across steps
        self.runner = asyncio.Runner()
        self.now = 0.0
        self.transitions: list[tuple[BreakerState, BreakerState]] = []
        self.in_flight: list[InFlight] = []

    @initialize(settings=settings_strategy)
    def configure(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self.breaker = CircuitBreaker(
            "relay",
            settings,
            clock=lambda: self.now,
            on_transition=lambda _n, a, b: self.transitions.append((a, b)),
        )
        self.state = BreakerState.CLOSED
        self.epoch = 0
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.trials = 0
        self.successes = 0

    def teardown(self) -> None:
        self.runner.close()

    # --- the model ------------------------------------------------------------------

    def _move(self, state: BreakerState) -> None:
        self.state, self.epoch = state, self.epoch + 1
        self.consecutive_failures = self.trials = self.successes = 0
        if state is BreakerState.OPEN:
            self.opened_at = self.now

    def _refresh(self) -> None:
        if (
            self.state is BreakerState.OPEN
            and self.now >= self.opened_at + self.settings.reset_timeout
        ):
            self._move(BreakerState.HALF_OPEN)

    def _admits(self) -> bool:
        self._refresh()
        if self.state is BreakerState.HALF_OPEN and self.trials < self.settings.half_open_max_calls:
            self.trials += 1
            return True
        return self.state is BreakerState.CLOSED

    def _apply(self, verdict: str) -> None:
        half_open = self.state is BreakerState.HALF_OPEN
        if verdict == "failure" and half_open:
            self._move(BreakerState.OPEN)
        elif verdict == "failure" and self.state is BreakerState.CLOSED:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.settings.failure_threshold:
                self._move(BreakerState.OPEN)
        elif verdict == "success" and half_open:
            self.trials, self.successes = self.trials - 1, self.successes + 1
            if self.successes >= self.settings.success_threshold:
                self._move(BreakerState.CLOSED)
        elif verdict == "success":
            self.consecutive_failures = 0
        elif verdict == "release" and half_open:
            self.trials -= 1

    def _expect_refusal(self, attempt: Callable[[], object]) -> None:
        with pytest.raises(errors.CircuitOpen) as refused:
            attempt()
        if self.state is BreakerState.OPEN:
            assert refused.value.retry_after == pytest.approx(
                self.opened_at + self.settings.reset_timeout - self.now
            )

    # --- the rules ------------------------------------------------------------------

    @rule(seconds=st.floats(min_value=0, max_value=15))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule(verdict=st.sampled_from(["success", "failure", "release"]))
    def manual_call(self, verdict: str) -> None:
        """allow(), then record_success / record_failure / release at once."""
        if not self._admits():
            self._expect_refusal(self.breaker.allow)
            return
        self.breaker.allow()
        {
            "success": self.breaker.record_success,
            "failure": self.breaker.record_failure,
            "release": self.breaker.release,
        }[verdict]()
        self._apply(verdict)

    @rule(target=calls)
    def start_guarded_call(self) -> object:
        guard = self.breaker.guard()
        if not self._admits():
            self._expect_refusal(lambda: self.runner.run(guard.__aenter__()))
            return multiple()  # refused: nothing in flight
        self.runner.run(guard.__aenter__())
        call = InFlight(guard, self.epoch)
        self.in_flight.append(call)
        return call

    @rule(call=consumes(calls), outcome=st.sampled_from(sorted(OUTCOMES)))
    def finish_guarded_call(self, call: InFlight, outcome: str) -> None:
        self.in_flight.remove(call)
        make_error, verdict = OUTCOMES[outcome]
        if make_error is None:
            self.runner.run(call.guard.__aexit__(None, None, None))
        else:
            error = make_error()
            swallowed = self.runner.run(call.guard.__aexit__(type(error), error, None))
            assert not swallowed
        if call.epoch == self.epoch:
            self._apply(verdict)

    # --- the invariants -------------------------------------------------------------

    @invariant()
    def same_state(self) -> None:
        self._refresh()
        assert self.breaker.state is self.state

    @invariant()
    def half_open_admits_at_most_max_calls(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            trials = [call for call in self.in_flight if call.epoch == self.epoch]
            assert len(trials) <= self.settings.half_open_max_calls

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


def opening_after_two() -> CircuitBreaker:
    settings = BreakerSettings(
        failure_threshold=2, reset_timeout=30, half_open_max_calls=1, success_threshold=1
    )
    return CircuitBreaker("relay", settings)


def failing(breaker: CircuitBreaker) -> Callable[[BaseException], Awaitable[None]]:
    """A call through ``breaker``'s guard that fails with the given error."""

    async def fail_with(error: BaseException) -> None:
        with pytest.raises(type(error)):
            async with breaker.guard():
                raise error

    return fail_with


def test_guard_counts_only_endpoint_failures() -> None:
    breaker = opening_after_two()
    fail_with = failing(breaker)

    async def scenario() -> None:
        await fail_with(errors.ServerUnavailable("down"))
        await fail_with(errors.InvalidToken("rejected"))  # answered: the count starts again
        await fail_with(KeyError("bug"))
        await fail_with(errors.ServerUnavailable("down"))
        assert breaker.state is BreakerState.CLOSED
        await fail_with(TimeoutError())
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(errors.CircuitOpen):
            async with breaker.guard():
                pytest.fail("an open circuit must not admit calls")

    asyncio.run(scenario())


def test_a_call_from_before_the_circuit_opened_does_not_close_it() -> None:
    now = 0.0
    seen: list[tuple[str, str, str]] = []
    breaker = CircuitBreaker(
        "relay",
        BreakerSettings(
            failure_threshold=1, reset_timeout=5, half_open_max_calls=1, success_threshold=1
        ),
        clock=lambda: now,
        on_transition=lambda name, old, new: seen.append((name, old, new)),
    )

    async def scenario() -> None:
        nonlocal now
        slow = breaker.guard()
        await slow.__aenter__()
        with pytest.raises(errors.ServerUnavailable):
            async with breaker.guard():
                raise errors.ServerUnavailable("down")
        now = 5.0
        async with breaker.guard():  # the trial call, still in flight below
            await slow.__aexit__(None, None, None)
            assert breaker.state is BreakerState.HALF_OPEN
        assert breaker.state is BreakerState.CLOSED

    asyncio.run(scenario())
    assert seen == [
        ("relay", "closed", "open"),
        ("relay", "open", "half_open"),
        ("relay", "half_open", "closed"),
    ]


def test_settings_come_from_the_config_with_the_schemas_defaults() -> None:
    overrides = {
        "retry.circuit_breaker.failure_threshold": (7, "test"),
        "retry.circuit_breaker.reset_timeout": ("1m", "test"),
    }
    settings = load_config(None, environ={}, overrides=overrides).settings
    assert settings.retry.circuit_breaker == BreakerSettings(
        failure_threshold=7, reset_timeout=60.0, half_open_max_calls=1, success_threshold=1
    )


def test_a_relay_saying_when_to_come_back_counts_as_an_answer() -> None:
    breaker = opening_after_two()
    fail_with = failing(breaker)

    async def scenario() -> None:
        pacing = errors.ServerUnavailable("come back in 2s", retry_after=2.0)
        for _ in range(3):  # a relay pacing its admissions is up: never an open circuit
            await fail_with(errors.ServerUnavailable("down"))
            await fail_with(pacing)
        assert breaker.state is BreakerState.CLOSED

    asyncio.run(scenario())


def test_try_now_lets_a_trial_through_an_open_circuit_before_its_reset_timeout() -> None:
    breaker = CircuitBreaker(
        "relay",
        BreakerSettings(
            failure_threshold=1, reset_timeout=30, half_open_max_calls=1, success_threshold=1
        ),
        clock=lambda: 0.0,
    )
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(errors.CircuitOpen):
        breaker.allow()
    breaker.try_now()
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
