"""Pacing new sessions relay-wide, so that clients coming back together are spread out.

After a relay restart or a network outage every client reconnects within seconds. The relay
admits ``server.admission.rate`` sessions a second (``burst`` at once: a GCRA, the
theoretical arrival time of the next admission moving on by ``1 / rate`` with each one) and
gives every other client a slot of its own: the next free time, reserved for it. The answer
names the slot (``retry_in_seconds`` and an opaque ``slot`` id); a client that comes back
with the id from the slot's time on is admitted without taking anyone else's turn, so
arrivals follow the rate instead of bunching, and nobody who waited is pushed to the back
by a newcomer. An id is single-use and lapses :data:`SLOT_GRACE` seconds after its time.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from cloudbridge_core.settings import RateQuota

#: seconds a slot stays valid after its time: the client's sleep, its race and handshake
SLOT_GRACE = 10.0
#: reservations held at most (a security limit: each is an id and a time); past it, clients
#: are told when to come back without a reservation
MAX_SLOTS = 100_000


class Admission:
    """``admit(slot)`` is ``(0, "")`` for a session that may start now, else the seconds
    until the client's slot and the slot's id, to present then."""

    def __init__(
        self, quota: Callable[[], RateQuota], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._quota = quota  # read at each hello: a reload applies to the next one
        self._clock = clock
        self._next_admission = 0.0
        #: reserved slots by id, in the order of their times (handed out in that order)
        self._slots: OrderedDict[str, float] = OrderedDict()

    def admit(self, slot: str = "") -> tuple[float, str]:
        now = self._clock()
        self._forget_lapsed(now)
        reserved = self._slots.get(slot) if slot else None
        if reserved is not None:
            if now >= reserved:
                del self._slots[slot]
                return 0.0, ""
            return reserved - now, slot  # early: the same slot, still held
        quota = self._quota()
        interval = 1.0 / quota.rate
        tolerance = (quota.burst - 1) * interval
        due = max(self._next_admission, now)
        self._next_admission = due + interval  # admitted now, or reserved for later
        at = due - tolerance
        if at <= now:
            return 0.0, ""
        if len(self._slots) >= MAX_SLOTS:
            return at - now, ""
        reservation = secrets.token_urlsafe(12)
        self._slots[reservation] = at
        return at - now, reservation

    def spread_window(self, sessions: int) -> float:
        """How long ``sessions`` clients take to be admitted again: the window a ``goaway``
        asks them to spread their reconnections over (at least a second)."""
        return max(1.0, sessions / self._quota().rate)

    def _forget_lapsed(self, now: float) -> None:
        while self._slots:
            oldest, at = next(iter(self._slots.items()))
            if at + SLOT_GRACE > now:
                return
            del self._slots[oldest]
