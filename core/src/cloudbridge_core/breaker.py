"""A circuit breaker per endpoint: stop hammering something that keeps failing.

closed    calls flow; ``failure_threshold`` consecutive failures open the circuit.
open      calls are refused with :class:`CircuitOpen` until ``reset_timeout`` has passed.
half_open up to ``half_open_max_calls`` trial calls at once; ``success_threshold``
          successes close the circuit, any failure opens it again.

Only failures that say something about the endpoint count: retryable classified errors,
timeouts and OS-level connection errors. A non-retryable classified error (a rejected
token) is the caller's problem and proves the endpoint answered, so it counts as a
success. Anything else (cancellation, a bug) gives no verdict and only frees the call's
half-open slot.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from enum import StrEnum

from cloudbridge_core.errors import CircuitOpen, CloudBridgeError
from cloudbridge_core.settings import BreakerSettings


class BreakerState(StrEnum):
    """The state of a circuit; the values are what logs and metrics show."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def counts_as_failure(error: BaseException) -> bool:
    """Whether ``error`` says the endpoint is unwell."""
    if isinstance(error, CloudBridgeError):
        # another breaker's refusal says nothing about this endpoint
        return error.retryable and not isinstance(error, CircuitOpen)
    return isinstance(error, OSError)  # TimeoutError and ConnectionError are OSErrors


def proves_answer(error: BaseException) -> bool:
    """Whether ``error`` shows the endpoint answered: a deliberate, final refusal, or its
    word on when to come back (a relay pacing its admissions is well)."""
    if not isinstance(error, CloudBridgeError):
        return False
    told_when = error.retry_after is not None and not isinstance(error, CircuitOpen)
    return told_when or not error.retryable


class CircuitBreaker:
    """The breaker for one endpoint (``name``, e.g. ``relay.example.com:5553/quic``).

    ``on_transition(name, old, new)`` is called on every state change (metrics, logs);
    the move from open to half-open happens when ``state`` or :meth:`allow` notices the
    ``reset_timeout`` has passed. Not thread-safe: use it from one event loop.
    """

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._trials = 0
        self._opened_at = 0.0
        # bumped on every transition so guard() can tell outcomes of calls from before it
        self._epoch = 0

    @property
    def state(self) -> BreakerState:
        """The current state; an open circuit turns half-open once ``reset_timeout`` passed."""
        if self._state is BreakerState.OPEN and self._remaining() <= 0:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> None:
        """Admit one call or raise :class:`CircuitOpen` saying when to try again.

        Every admitted call must end in :meth:`record_success`, :meth:`record_failure` or
        :meth:`release`; :meth:`guard` does that for you.
        """
        state = self.state
        if state is BreakerState.OPEN:
            raise CircuitOpen(
                f"circuit for {self.name} is open after repeated failures",
                retry_after=self._remaining(),
            )
        if state is BreakerState.HALF_OPEN:
            if self._trials >= self.settings.half_open_max_calls:
                raise CircuitOpen(
                    f"circuit for {self.name} is half-open and its trial calls are in flight",
                    retry_after=0.0,
                )
            self._trials += 1

    def try_now(self) -> None:
        """Turn an open circuit half-open at once, for a caller whose own backoff spaces its
        calls already (a reconnection that finds every endpoint's circuit open would
        otherwise wait ``reset_timeout`` however short the outage)."""
        if self.state is BreakerState.OPEN:
            self._move(BreakerState.HALF_OPEN)

    def record_success(self) -> None:
        """An admitted call worked (or the endpoint answered it)."""
        if self._state is BreakerState.HALF_OPEN:
            self._trials = max(0, self._trials - 1)
            self._successes += 1
            if self._successes >= self.settings.success_threshold:
                self._move(BreakerState.CLOSED)
        else:
            self._failures = 0

    def record_failure(self) -> None:
        """An admitted call failed in a way that blames the endpoint."""
        if self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.OPEN)
        elif self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.settings.failure_threshold:
                self._move(BreakerState.OPEN)

    def release(self) -> None:
        """A call ended without a verdict (cancelled, a bug): free its half-open trial slot."""
        if self._state is BreakerState.HALF_OPEN:
            self._trials = max(0, self._trials - 1)

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """``async with breaker.guard(): await call()``: admit, then record the outcome.

        Raises :class:`CircuitOpen` instead of entering when the call is refused; errors
        from the body propagate unchanged.
        """
        self.allow()
        epoch = self._epoch
        try:
            yield
        except BaseException as error:
            self._settle(epoch, error)
            raise
        self._settle(epoch, None)

    def _settle(self, epoch: int, error: BaseException | None) -> None:
        if epoch != self._epoch:
            # The call started before the last transition: its outcome describes a state
            # that is gone, and the transition already reset its half-open slot.
            return
        if error is None or proves_answer(error):
            self.record_success()
        elif counts_as_failure(error):
            self.record_failure()
        else:
            self.release()

    def _remaining(self) -> float:
        return max(0.0, self._opened_at + self.settings.reset_timeout - self._clock())

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self._failures = self._successes = self._trials = 0
        self._epoch += 1
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        if self._on_transition is not None:
            self._on_transition(self.name, old, new)
