"""Retries with exponential backoff and jitter, with a policy per classified error.

A delay is ``min(initial_delay * multiplier ** n, max_delay) + uniform(0, jitter)`` for
the n-th retry (n from 0): the cap bounds the exponential part and jitter is added after
it, so that many clients capped at the same delay still spread out (the seed's Part 7.2).
Only :class:`~cloudbridge_core.errors.CloudBridgeError` subclasses with ``retryable``
set are retried; the loop itself is tenacity's.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from cloudbridge_core.durations import parse_duration
from cloudbridge_core.errors import CircuitOpen, CloudBridgeError

T = TypeVar("T")

_DURATION_KEYS = ("initial_delay", "max_delay", "jitter")


@dataclass(frozen=True)
class Backoff:
    """One exponential backoff policy; delays are in seconds."""

    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 60.0
    jitter: float = 1.0
    max_retries: int = 5

    def base_delay(self, attempt: int) -> float:
        """The capped exponential part of the delay before retry ``attempt`` (from 0)."""
        try:
            grown = self.initial_delay * self.multiplier**attempt
        except OverflowError:
            return self.max_delay
        return min(grown, self.max_delay)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before retry ``attempt`` (from 0), jitter included."""
        spread = (rng or _RANDOM).uniform(0, self.jitter) if self.jitter > 0 else 0.0
        return self.base_delay(attempt) + spread

    def overridden(self, section: Mapping[str, Any]) -> Backoff:
        """This policy with the keys present in a config ``section`` replaced."""
        changes: dict[str, Any] = {}
        for key in ("initial_delay", "multiplier", "max_delay", "jitter", "max_retries"):
            if key in section:
                value = section[key]
                changes[key] = parse_duration(value) if key in _DURATION_KEYS else value
        return replace(self, **changes)


_RANDOM = random.SystemRandom()


@dataclass(frozen=True)
class RetryPolicies:
    """The ``retry`` config section: a default policy and overrides by error code."""

    default: Backoff = field(default_factory=Backoff)
    per_error: Mapping[str, Backoff] = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> RetryPolicies:
        default = Backoff().overridden(section)
        per_error = {
            code: default.overridden(overrides)
            for code, overrides in section.get("per_error", {}).items()
        }
        return cls(default, per_error)

    def policy_for(self, error: CloudBridgeError) -> Backoff:
        """The configured policy for ``error``'s code, else the default started at its delay."""
        if error.code in self.per_error:
            return self.per_error[error.code]
        if error.retry_delay is not None:
            return replace(self.default, initial_delay=error.retry_delay)
        return self.default


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, CloudBridgeError) and error.retryable


async def call_with_retry(
    operation: Callable[[], Awaitable[T]],
    policies: RetryPolicies,
    *,
    on_retry: Callable[[CloudBridgeError, int, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> T:
    """Run ``operation`` until it succeeds, a non-retryable error occurs, or retries run out.

    The policy is chosen by the error actually raised; the last error is re-raised as it
    is. ``on_retry(error, retry_number, delay)`` is called before each wait (logs, metrics).
    """

    def failure(state: RetryCallState) -> CloudBridgeError:
        assert state.outcome is not None  # tenacity only waits or stops after an attempt
        error = state.outcome.exception()
        assert isinstance(error, CloudBridgeError)  # guaranteed by the retry predicate
        return error

    def wait(state: RetryCallState) -> float:
        error = failure(state)
        if isinstance(error, CircuitOpen):
            return error.retry_after
        return policies.policy_for(error).delay(state.attempt_number - 1, rng)

    def stop(state: RetryCallState) -> bool:
        return state.attempt_number > policies.policy_for(failure(state)).max_retries

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.next_action is not None:
            on_retry(failure(state), state.attempt_number, state.next_action.sleep)

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_retryable),
        wait=wait,
        stop=stop,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    result: T = await retrying(operation)
    return result
