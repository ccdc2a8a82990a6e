"""Backoff bounds (property-based) and the retry loop's choices per classified error."""

from __future__ import annotations

import asyncio
import random

import pytest
from cloudbridge_core import errors
from cloudbridge_core.retry import Backoff, RetryPolicies, call_with_retry
from hypothesis import given
from hypothesis import strategies as st

backoffs = st.builds(
    Backoff,
    initial_delay=st.floats(min_value=0.001, max_value=60),
    multiplier=st.floats(min_value=1, max_value=10),
    max_delay=st.floats(min_value=0.001, max_value=3600),
    jitter=st.floats(min_value=0, max_value=10),
    max_retries=st.integers(min_value=0, max_value=20),
)
attempts = st.integers(min_value=0, max_value=5000)


@given(backoffs, attempts, st.integers())
def test_delay_stays_within_bounds(backoff: Backoff, attempt: int, seed: int) -> None:
    delay = backoff.delay(attempt, random.Random(seed))
    base = backoff.base_delay(attempt)
    assert base <= backoff.max_delay
    assert base <= delay <= base + backoff.jitter
    assert delay <= backoff.max_delay + backoff.jitter


@given(backoffs, attempts)
def test_base_delay_never_shrinks(backoff: Backoff, attempt: int) -> None:
    assert backoff.base_delay(attempt + 1) >= backoff.base_delay(attempt)


def test_seed_sequence_without_jitter() -> None:
    backoff = Backoff(jitter=0)
    assert [backoff.delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


SECTION = {
    "initial_delay": "1s",
    "multiplier": 2.0,
    "max_delay": "60s",
    "jitter": "0s",
    "max_retries": 5,
    "per_error": {"unavailable": {"max_retries": 3, "initial_delay": "10s"}},
}


def run_retries(failures: list[BaseException]) -> tuple[object, list[float], list[str]]:
    sleeps: list[float] = []
    retried: list[str] = []
    remaining = list(failures)

    async def operation() -> str:
        if remaining:
            raise remaining.pop(0)
        return "ok"

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def main() -> object:
        try:
            return await call_with_retry(
                operation,
                RetryPolicies.from_config(SECTION),
                sleep=fake_sleep,
                on_retry=lambda error, number, _delay: retried.append(f"{error.code}#{number}"),
            )
        except errors.CloudBridgeError as error:
            return error

    return asyncio.run(main()), sleeps, retried


def test_per_error_policy_and_success() -> None:
    result, sleeps, retried = run_retries([errors.ServerUnavailable("down")] * 2)
    assert result == "ok"
    assert sleeps == [10, 20]
    assert retried == ["unavailable#1", "unavailable#2"]


def test_gives_up_after_max_retries_and_reraises_the_last_error() -> None:
    last = errors.ServerUnavailable("still down")
    result, sleeps, _ = run_retries([errors.ServerUnavailable("down")] * 3 + [last])
    assert result is last
    assert sleeps == [10, 20, 40]


def test_error_without_override_starts_at_its_own_delay() -> None:
    result, sleeps, _ = run_retries([errors.RateLimitExceeded("slow down")] * 2)
    assert result == "ok"
    assert sleeps == [5, 10]


@pytest.mark.parametrize(
    "error", [errors.InvalidToken("bad"), errors.TokenExpired("old"), errors.TunnelClosed("gone")]
)
def test_non_retryable_errors_are_never_retried(error: errors.CloudBridgeError) -> None:
    result, sleeps, _ = run_retries([error])
    assert result is error
    assert sleeps == []


def test_circuit_open_waits_for_the_breaker() -> None:
    result, sleeps, _ = run_retries([errors.CircuitOpen("open", retry_after=7.5)])
    assert result == "ok"
    assert sleeps == [7.5]
