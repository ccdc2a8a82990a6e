"""Backoff bounds (property-based) and the retry loop's choices per classified error."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import Any

import pytest
from cloudbridge_core import errors
from cloudbridge_core.config import load_config
from cloudbridge_core.retry import Backoff, RetryPolicies, call_with_retry, reconnect_delay
from hypothesis import given
from hypothesis import strategies as st
from tenacity import Retrying

#: the schema's defaults for the ``retry`` section
DEFAULT = Backoff(initial_delay=1, multiplier=2, max_delay=60, jitter=1, max_retries=5)

backoffs = st.builds(
    Backoff,
    initial_delay=st.floats(min_value=0, max_value=60),
    multiplier=st.floats(min_value=1, max_value=10),
    max_delay=st.floats(min_value=0, max_value=3600),
    jitter=st.floats(min_value=0, max_value=10),
    max_retries=st.integers(min_value=0, max_value=20),
)
attempts = st.integers(min_value=0, max_value=5000)


def capped(backoff: Backoff, attempt: int) -> float:
    """The spec, written out independently: min(initial * multiplier**n, max_delay)."""
    try:
        return min(backoff.initial_delay * backoff.multiplier**attempt, backoff.max_delay)
    except OverflowError:
        return backoff.max_delay if backoff.initial_delay else 0.0


@given(backoffs, attempts, st.integers())
def test_delay_stays_within_bounds(backoff: Backoff, attempt: int, seed: int) -> None:
    delay = backoff.delay_for(attempt, random.Random(seed))
    assert capped(backoff, attempt) <= delay <= capped(backoff, attempt) + backoff.jitter
    assert delay <= backoff.max_delay + backoff.jitter


@given(backoffs, attempts)
def test_delay_without_jitter_never_shrinks(backoff: Backoff, attempt: int) -> None:
    steady = replace(backoff, jitter=0)
    assert steady.delay_for(attempt + 1) >= steady.delay_for(attempt) == capped(backoff, attempt)


@given(backoffs, st.integers())
def test_tenacity_strategies_follow_the_policy(backoff: Backoff, seed: int) -> None:
    sleeps: list[float] = []
    tries = 0

    def always_fails() -> None:
        nonlocal tries
        tries += 1
        raise ConnectionResetError

    retrying = Retrying(
        wait=backoff.wait(random.Random(seed)),
        stop=backoff.stop(),
        sleep=sleeps.append,
        reraise=True,
    )
    with pytest.raises(ConnectionResetError):
        retrying(always_fails)
    rng = random.Random(seed)
    assert tries == backoff.max_retries + 1
    assert sleeps == [backoff.delay_for(n, rng) for n in range(backoff.max_retries)]


def test_seed_sequence_without_jitter() -> None:
    backoff = replace(DEFAULT, jitter=0)
    assert [backoff.delay_for(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


@pytest.mark.parametrize(
    "fields",
    [{"initial_delay": -1}, {"jitter": -0.5}, {"max_retries": -1}, {"multiplier": 0.5}],
)
def test_backoff_rejects_shrinking_or_negative_values(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"must"):
        replace(DEFAULT, **fields)


def policies_from(section: dict[str, Any]) -> RetryPolicies:
    """The policies of a config whose ``retry`` section sets ``section``."""
    overrides = {f"retry.{key}": (value, "test") for key, value in section.items()}
    return RetryPolicies.from_settings(
        load_config(None, environ={}, overrides=overrides).settings.retry
    )


def test_the_schemas_defaults_apply() -> None:
    policies = policies_from({})
    assert policies.default == DEFAULT
    assert policies.per_error["timeout"] == replace(DEFAULT, initial_delay=3, max_retries=3)


def test_per_error_entries_start_from_the_section() -> None:
    policies = policies_from(
        {"jitter": "0s", "max_delay": "2m", "per_error": {"timeout": {"initial_delay": "3s"}}}
    )
    assert policies.default == replace(DEFAULT, jitter=0, max_delay=120)
    assert policies.per_error["timeout"] == replace(
        DEFAULT, initial_delay=3, jitter=0, max_delay=120, max_retries=3
    )


def test_policy_falls_back_to_the_errors_own_delay() -> None:
    policies = policies_from({"max_retries": 2})
    assert policies.policy_for(errors.HeartbeatFailed("quiet")) == replace(
        DEFAULT, initial_delay=2, max_retries=2
    )
    assert policies.policy_for(errors.CircuitOpen("open", retry_after=3)) == policies.default


SECTION = {
    "initial_delay": "1s",
    "multiplier": 2.0,
    "max_delay": "60s",
    "jitter": "0s",
    "max_retries": 5,
    "per_error": {
        "unavailable": {"max_retries": 3, "initial_delay": "10s"},
        "timeout": {"max_retries": 0},
    },
}


def run_retries(failures: list[BaseException]) -> tuple[object, list[float], list[str]]:
    """Run call_with_retry on an operation raising ``failures`` in turn, then "ok"."""
    sleeps: list[float] = []
    retried: list[str] = []
    remaining = list(failures)

    async def operation() -> str:
        if remaining:
            raise remaining.pop(0)
        return "ok"

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    def on_retry(error: errors.CloudBridgeError, number: int, delay: float) -> None:
        retried.append(f"{error.code}#{number}:{delay:g}")

    async def main() -> object:
        try:
            return await call_with_retry(
                operation, policies_from(SECTION), sleep=fake_sleep, on_retry=on_retry
            )
        except errors.CloudBridgeError as error:
            return error

    return asyncio.run(main()), sleeps, retried


def test_per_error_policy_and_success() -> None:
    result, sleeps, retried = run_retries([errors.ServerUnavailable("down")] * 2)
    assert result == "ok"
    assert sleeps == [10, 20]
    assert retried == ["unavailable#1:10", "unavailable#2:20"]


def test_gives_up_after_max_retries_and_reraises_the_last_error() -> None:
    last = errors.ServerUnavailable("still down")
    result, sleeps, _ = run_retries([errors.ServerUnavailable("down")] * 3 + [last])
    assert result is last
    assert sleeps == [10, 20, 40]


def test_error_without_override_starts_at_its_own_delay() -> None:
    result, sleeps, _ = run_retries([errors.RateLimitExceeded("slow down")] * 2)
    assert result == "ok"
    assert sleeps == [5, 10]


def test_the_error_that_just_failed_picks_the_policy() -> None:
    result, sleeps, _ = run_retries(
        [errors.RateLimitExceeded("slow down"), errors.ServerUnavailable("down")]
    )
    assert result == "ok"
    assert sleeps == [5, 20]  # retry numbers run on: the second retry doubles 10s once


def test_max_retries_zero_never_retries() -> None:
    timeout = errors.ConnectionTimeout("no answer")
    result, sleeps, _ = run_retries([timeout])
    assert result is timeout
    assert sleeps == []


@pytest.mark.parametrize(
    "error", [errors.InvalidToken("bad"), errors.TokenExpired("old"), errors.TunnelClosed("gone")]
)
def test_non_retryable_errors_are_never_retried(error: errors.CloudBridgeError) -> None:
    result, sleeps, _ = run_retries([error])
    assert result is error
    assert sleeps == []


def test_unclassified_errors_propagate_at_once() -> None:
    with pytest.raises(KeyError):
        run_retries([KeyError("bug")])


@pytest.mark.parametrize(("retry_after", "waited"), [(7.5, 7.5), (0.0, 1.0)])
def test_circuit_open_waits_for_the_breaker_and_backs_off(
    retry_after: float, waited: float
) -> None:
    result, sleeps, _ = run_retries([errors.CircuitOpen("open", retry_after=retry_after)])
    assert result == "ok"
    assert sleeps == [waited]


def retry_settings(section: dict[str, Any]) -> Any:
    overrides = {f"retry.{key}": (value, "test") for key, value in section.items()}
    return load_config(None, environ={}, overrides=overrides).settings.retry


@given(outage=st.floats(min_value=0, max_value=1000), seed=st.integers())
def test_a_reconnection_waits_up_to_the_outage_so_far_within_the_bounds(
    outage: float, seed: int
) -> None:
    settings = retry_settings({"initial_delay": "1s", "max_delay": "60s"})
    delay = reconnect_delay(errors.ServerUnavailable("down"), outage, settings, random.Random(seed))
    assert 0 <= delay <= min(60.0, max(1.0, outage))


def test_reconnections_spread_over_the_whole_window() -> None:
    settings = retry_settings({})
    rng = random.Random(7)
    delays = [
        reconnect_delay(errors.ServerUnavailable("down"), 8.0, settings, rng) for _ in range(4000)
    ]
    per_second = [sum(1 for d in delays if second <= d < second + 1) for second in range(8)]
    assert min(per_second) > 400  # full jitter: every second of the window gets its share


def test_a_relays_slot_is_followed_and_a_breakers_wait_is_not() -> None:
    settings = retry_settings({})
    slot = errors.ServerUnavailable("come back in 7.5s", retry_after=7.5)
    assert reconnect_delay(slot, 0.2, settings) == 7.5
    opened = errors.CircuitOpen("open", retry_after=30.0)
    assert reconnect_delay(opened, 2.0, settings, random.Random(1)) <= 2.0
