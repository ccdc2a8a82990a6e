"""A circuit breaker per endpoint: stop hammering something that keeps failing.

closed    calls flow; ``failure_threshold`` consecutive failures open the circuit.
open      calls are refused with :class:`CircuitOpen` until ``reset_timeout`` has passed.
half_open up to ``half_open_max_calls`` trial calls at once; ``success_threshold``
          successes close the circuit, any failure opens it again.

Only failures that say something about the endpoint count: retryable classified errors,
timeouts and OS-level connection errors. A rejected token is the caller's problem, and
proves the endpoint answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cloudbridge_core.durations import parse_duration
from cloudbridge_core.errors import CircuitOpen, CloudBridgeError


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSettings:
    failure_threshold: int = 5
    reset_timeout: float = 30.0
    half_open_max_calls: int = 1
    success_threshold: int = 1

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> BreakerSettings:
        defaults = cls()
        return cls(
            failure_threshold=section.get("failure_threshold", defaults.failure_threshold),
            reset_timeout=parse_duration(section["reset_timeout"])
            if "reset_timeout" in section
            else defaults.reset_timeout,
            half_open_max_calls=section.get("half_open_max_calls", defaults.half_open_max_calls),
            success_threshold=section.get("success_threshold", defaults.success_threshold),
        )


def counts_as_failure(error: BaseException) -> bool:
    """Whether ``error`` says the endpoint is unwell."""
    if isinstance(error, CloudBridgeError):
        return error.retryable and not isinstance(error, CircuitOpen)
    return isinstance(error, (OSError, TimeoutError))


class CircuitBreaker:
    """The breaker for one endpoint (``name``, e.g. ``relay.example.com:5553/quic``)."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._trials = 0
        self._opened_at = 0.0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._remaining() <= 0:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> None:
        """Admit one call or raise :class:`CircuitOpen` saying when to try again."""
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

    def record_success(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._trials = max(0, self._trials - 1)
            self._successes += 1
            if self._successes >= self.settings.success_threshold:
                self._move(BreakerState.CLOSED)
        else:
            self._failures = 0

    def record_failure(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.OPEN)
        elif self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.settings.failure_threshold:
                self._move(BreakerState.OPEN)

    def release(self) -> None:
        """A call ended without a verdict (cancelled): free its half-open trial slot."""
        if self._state is BreakerState.HALF_OPEN:
            self._trials = max(0, self._trials - 1)

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """``async with breaker.guard(): await call()``: admit, then record the outcome."""
        self.allow()
        try:
            yield
        except asyncio.CancelledError:
            self.release()
            raise
        except BaseException as error:
            if counts_as_failure(error):
                self.record_failure()
            else:
                self.record_success()
            raise
        self.record_success()

    def _remaining(self) -> float:
        return max(0.0, self._opened_at + self.settings.reset_timeout - self._clock())

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self._failures = self._successes = self._trials = 0
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        if self._on_transition is not None:
            self._on_transition(self.name, old, new)
