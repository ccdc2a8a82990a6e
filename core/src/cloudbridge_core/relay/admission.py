"""Pacing new sessions relay-wide, so that clients coming back together are spread out.

After a relay restart or a network outage every client reconnects within seconds. The relay
admits ``server.admission.rate`` sessions a second (``burst`` at once, a GCRA: the
theoretical arrival time of the next admission moves on by ``1 / rate`` with each one) and
gives every other client a slot of its own after the last one handed out, which the client
waits for (``retry_in_seconds`` in its refusal). Clients that come back at their slot find
the rate free for them, so arrivals follow the rate instead of bunching; one that finds its
slot taken by a newcomer gets a later one. A slot is advice, not a reservation: a client
that comes early is simply refused again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cloudbridge_core.settings import RateQuota


class Admission:
    """``admit()`` is 0 for a session that may start now, else the seconds until its slot."""

    def __init__(
        self, quota: Callable[[], RateQuota], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._quota = quota  # read at each hello: a reload applies to the next one
        self._clock = clock
        self._next_admission = 0.0
        self._last_slot = 0.0

    def admit(self) -> float:
        quota = self._quota()
        interval = 1.0 / quota.rate
        now = self._clock()
        due = max(self._next_admission, now)
        if due - now <= (quota.burst - 1) * interval:
            self._next_admission = due + interval
            return 0.0
        self._last_slot = max(self._last_slot + interval, due)
        return self._last_slot - now

    def spread_window(self, sessions: int) -> float:
        """How long ``sessions`` clients take to be admitted again: the window a ``goaway``
        asks them to spread their reconnections over (at least a second)."""
        return max(1.0, sessions / self._quota().rate)
