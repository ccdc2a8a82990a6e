"""Retries with exponential backoff and jitter, with a policy per classified error.

The delay before retry ``n`` (from 0) is::

    min(initial_delay * multiplier ** n, max_delay) + uniform(0, jitter)

The cap bounds the exponential part and jitter is added after it, so that many clients
stuck at the cap still spread out instead of reconnecting in lockstep (the seed's
Part 7.2); a delay is therefore at most ``max_delay + jitter``.

Only :class:`~cloudbridge_core.errors.CloudBridgeError` subclasses with ``retryable`` set
are retried, and the loop itself is tenacity's: :class:`Backoff` gives tenacity wait and
stop strategies, and :func:`call_with_retry` picks them by the error actually raised.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from cloudbridge_core.errors import CircuitOpen, CloudBridgeError
from cloudbridge_core.settings import RetryOverride, RetrySettings

T = TypeVar("T")

_KEYS = ("initial_delay", "multiplier", "max_delay", "jitter", "max_retries")
# Jitter exists to spread clients apart, so it must not be reproducible across processes.
_RANDOM = random.SystemRandom()


@dataclass(frozen=True)
class Backoff:
    """One exponential backoff policy; delays are in seconds.

    Raises ``ValueError`` for a negative delay or retry count, or a multiplier below 1
    (delays would shrink); the config schema rejects those before they get here.
    """

    initial_delay: float
    multiplier: float
    max_delay: float
    jitter: float
    max_retries: int

    def __post_init__(self) -> None:
        if min(self.initial_delay, self.max_delay, self.jitter, self.max_retries) < 0:
            raise ValueError(f"{self}: delays and max_retries must not be negative")
        if self.multiplier < 1:
            raise ValueError(f"{self}: multiplier must be at least 1")

    def base_delay(self, attempt: int) -> float:
        """The capped exponential part of the delay before retry ``attempt`` (from 0)."""
        try:
            grown = self.initial_delay * self.multiplier**attempt
        except OverflowError:  # far beyond any cap, unless there is nothing to grow
            grown = math.inf if self.initial_delay else 0.0
        return min(grown, self.max_delay)

    def delay_for(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before retry ``attempt`` (from 0), jitter from ``rng`` included."""
        spread = (rng or _RANDOM).uniform(0, self.jitter) if self.jitter > 0 else 0.0
        return self.base_delay(attempt) + spread

    def wait(self, rng: random.Random | None = None) -> BackoffWait:
        """This policy as a tenacity wait strategy."""
        return BackoffWait(self, rng)

    def stop(self) -> stop_base:
        """This policy as a tenacity stop strategy: the first try plus ``max_retries``."""
        return stop_after_attempt(self.max_retries + 1)

    def overridden(self, override: RetryOverride) -> Backoff:
        """This policy with what a ``retry.per_error`` entry sets replaced."""
        changes = {
            key: getattr(override, key) for key in _KEYS if getattr(override, key) is not None
        }
        return replace(self, **changes)


class BackoffWait(wait_base):
    """Tenacity wait strategy computing :meth:`Backoff.delay_for` for each retry."""

    def __init__(self, backoff: Backoff, rng: random.Random | None = None) -> None:
        self.backoff = backoff
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        # tenacity counts attempts from 1 and waits after each; retry n follows attempt n+1
        return self.backoff.delay_for(retry_state.attempt_number - 1, self.rng)


@dataclass(frozen=True)
class RetryPolicies:
    """The ``retry`` config section: a default policy and overrides by error code."""

    default: Backoff
    per_error: Mapping[str, Backoff]

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicies:
        """The ``retry`` section's policies.

        A ``per_error`` entry starts from the section's own values, so ``jitter: 0s`` at
        the top applies to every error that does not set its own.
        """
        default = Backoff(*(getattr(settings, key) for key in _KEYS))
        per_error = {
            code: default.overridden(override) for code, override in settings.per_error.items()
        }
        return cls(default, per_error)

    def policy_for(self, error: CloudBridgeError) -> Backoff:
        """The configured policy for ``error``'s code, else the default from its own delay."""
        if error.code in self.per_error:
            return self.per_error[error.code]
        if error.retry_delay is not None:
            return replace(self.default, initial_delay=error.retry_delay)
        return self.default


def reconnect_delay(
    error: CloudBridgeError,
    outage: float,
    settings: RetrySettings,
    rng: random.Random | None = None,
) -> float:
    """How long a client that lost its relay session waits after a failed attempt, having
    been without a session for ``outage`` seconds.

    The relay's own answer of when to come back (``error.retry_after``: a slot of this
    client's own) is followed as it is. Otherwise the wait is full jitter: a random time up
    to the outage so far, at least ``retry.initial_delay`` and at most ``retry.max_delay``,
    so attempts thin out as an outage lasts (about two per doubling of it) while clients
    that lost the relay together spread out over the whole outage instead of returning in
    step. A circuit breaker's wait is not followed: the reconnection spaces its own
    attempts (``RelayLink`` lets a trial through when every circuit is open).
    """
    if error.retry_after is not None and not isinstance(error, CircuitOpen):
        return error.retry_after
    window = min(settings.max_delay, max(settings.initial_delay, outage))
    return (rng or _RANDOM).uniform(0, window)


def is_retryable(error: BaseException) -> bool:
    """Whether ``error`` is a classified error worth trying again."""
    return isinstance(error, CloudBridgeError) and error.retryable


async def call_with_retry(
    operation: Callable[[], Awaitable[T]],
    policies: RetryPolicies,
    *,
    on_retry: Callable[[CloudBridgeError, int, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> T:
    """Await ``operation()`` until it succeeds, fails for good, or retries run out.

    The error that just failed picks the policy, for the wait and for when to stop;
    retries are numbered over the whole call, whichever errors caused the earlier ones.
    A :class:`CircuitOpen` waits at least until the breaker lets a trial through.
    ``on_retry(error, retry_number, delay)`` runs before each wait (logs, metrics).

    Raises the last error as it is (never ``tenacity.RetryError``): a non-retryable one
    at once, a retryable one when its policy's ``max_retries`` are used up.
    """

    def failure(state: RetryCallState) -> CloudBridgeError:
        assert state.outcome is not None  # tenacity only waits or stops after an attempt
        error = state.outcome.exception()
        assert isinstance(error, CloudBridgeError)  # guaranteed by the retry predicate
        return error

    def wait(state: RetryCallState) -> float:
        error = failure(state)
        delay = policies.policy_for(error).wait(rng)(state)
        if isinstance(error, CircuitOpen):
            # retry_after is 0 while half-open trials are in flight: back off anyway
            return max(error.retry_after, delay)
        return delay

    def stop(state: RetryCallState) -> bool:
        return policies.policy_for(failure(state)).stop()(state)

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
