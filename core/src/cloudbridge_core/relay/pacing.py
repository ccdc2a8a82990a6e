"""Holding one session to its request rates (:mod:`~cloudbridge_core.relay.ratelimit`).

The session's reader awaits :meth:`Pacer.pace` for each request before it reads the next:
the wait is the session's debt, so an offender is slowed to its rate while its transport's
flow control pushes back on it; one that stays over a rate for
``server.rate_limits.disconnect_after`` is told ``rate_limited`` and disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from cloudbridge_core.errors import RateLimitExceeded
from cloudbridge_core.log import get_logger
from cloudbridge_core.protocol import messages
from cloudbridge_core.providers import Session
from cloudbridge_core.relay.mesh import tell
from cloudbridge_core.relay.metrics import RelayMetrics
from cloudbridge_core.relay.ratelimit import SessionLimiter
from cloudbridge_core.settings import RateLimitSettings
from cloudbridge_core.wire import MessageStream

log = get_logger("relay.ratelimit")

#: how long a disconnected offender has to read its rate_limited before it is dropped
FAREWELL = 2.0


class Pacer:
    """One session's pacing; ``settings`` is read at each request (a reload applies at once)."""

    def __init__(
        self,
        limiter: SessionLimiter,
        settings: Callable[[], RateLimitSettings],
        session: Session,
        control: MessageStream,
        metrics: RelayMetrics,
    ) -> None:
        self._limiter = limiter
        self._settings = settings
        self._session = session
        self._control = control
        self._metrics = metrics
        self._slowed: set[str] = set()
        self._disconnected = False

    async def pace(self, kind: str, cost: int = 1) -> None:
        """Wait as long as ``cost`` requests of ``kind`` put the session in debt; disconnect
        it (``rate_limited``) when it has stayed over a rate too long."""
        if self._disconnected:
            return
        now = time.monotonic()
        try:
            verdict = self._limiter.charge(kind, self._settings(), now, cost)
        except RateLimitExceeded as error:
            await self._disconnect(kind, error)
            return
        if not verdict.limited:
            self._slowed.discard(kind)
        elif kind not in self._slowed:  # counted and logged once per episode, not per request
            self._slowed.add(kind)
            self._metrics.rate_limited.labels(kind, "slowed").inc()
            log.info("rate_limit_slowed", tenant_id=self._limiter.tenant, kind=kind)
        if verdict.disconnect_at is not None and now + verdict.delay >= verdict.disconnect_at:
            # the debt outlasts the grace: wait out the grace, not the whole debt
            await asyncio.sleep(verdict.disconnect_at - now)
            await self.pace(kind, 0)
        elif verdict.delay:
            await asyncio.sleep(verdict.delay)

    async def _disconnect(self, kind: str, error: RateLimitExceeded) -> None:
        self._disconnected = True
        self._metrics.rate_limited.labels(kind, "disconnected").inc()
        log.warning(
            "rate_limited",
            tenant_id=self._limiter.tenant,
            kind=kind,
            reason=error.message,
        )
        await tell(self._control, messages.ErrorMessage(error.code, error.message))
        # a moment for the message to reach an offender that still reads (it then leaves by
        # itself), then the connection is dropped: one that stopped reading would hold a
        # graceful close open (TLS waits for its close_notify)
        wait_closed: Callable[[], Awaitable[None]] | None = getattr(
            self._session, "wait_closed", None
        )
        if wait_closed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wait_closed(), FAREWELL)
        abort: Callable[[str], None] | None = getattr(self._session, "abort", None)
        if abort is not None:
            abort(error.message)
        else:
            await self._session.aclose()
