"""Pacing new sessions relay-wide, so that clients coming back together are spread out.

After a relay restart or a network outage every client reconnects within seconds. The relay
admits ``server.admission.rate`` sessions a second (``burst`` at once: a GCRA, the
theoretical arrival time of the next admission moving on by ``1 / rate`` with each one) and
gives every other client a slot of its own: the next free time, reserved for it. The answer
names the slot (``retry_in_seconds`` and an opaque ``slot`` id); a client that comes back
with the id is admitted without taking anyone else's turn, so nobody who waited is pushed
to the back by a newcomer. Clients are told to come :data:`LEAD` early and the relay holds
an early one until its time: a client's connect takes longer on a busy host, and clients
arriving late would crowd the seconds after their slots. An id is single-use and lapses
:data:`SLOT_GRACE` seconds after its time.

A client that says it can wait (the ``queue`` capability) is not sent away when its turn
is up to :data:`MAX_QUEUE_WAIT` away: the relay tells it how long (``queued``) and holds
its hello until then. Each client then makes one handshake, not two (after a crash about
450 of 1,000 clients were sent away and made a second one, and for QUIC handshakes are
most of the relay's work), and sessions start when the relay says, not when clients on a
busy host manage to come back.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from cloudbridge_core.settings import RateQuota

#: seconds a slot stays valid after its time: the client's sleep, its race and handshake
SLOT_GRACE = 10.0
#: how much earlier than its slot a client is told to come back (its connect and hello)
LEAD = 0.25
#: a client with a slot this close is held by the relay until its time, not sent away
HOLD = 2 * LEAD
#: the hello capability of a client that waits for a ``queued`` answer's welcome
QUEUE = "queue"
#: the longest a client that can wait is held (``queued``) rather than given a slot: it
#: bounds the connections the relay holds waiting to ``rate`` x this
MAX_QUEUE_WAIT = 15.0
#: the share of the time its clients take to be admitted again that a relay going away
#: asks them to spread their return over: coming back a little faster than the rate, they
#: keep a queue and the relay admits at its rate from its first second (over the whole
#: time, a second that fell short of the rate was a loss never made up: p99 15.0 s of 1,000)
SPREAD_SHARE = 0.8
#: reservations held at most (a security limit: each is an id and a time); past it, clients
#: are told when to come back without a reservation
MAX_SLOTS = 100_000


@dataclass(frozen=True)
class Turn:
    """A hello's answer: start now; wait here ``hold`` seconds, then start; or come back in
    ``retry_in`` seconds with ``slot`` (empty: no reservation could be held)."""

    hold: float = 0.0
    retry_in: float = 0.0
    slot: str = ""


NOW = Turn()


class _Pace:
    """A GCRA: turns ``rate`` a second apart, ``burst`` of them at once."""

    def __init__(self) -> None:
        self._next = 0.0  # the theoretical time of the next turn

    def take(self, now: float, quota: RateQuota) -> float:
        """Take the next turn: seconds from ``now`` until it comes (0: now)."""
        interval = 1.0 / quota.rate
        due = max(self._next, now)
        self._next = due + interval
        return max(0.0, due - (quota.burst - 1) * interval - now)


class Admission:
    """``admit(slot)``: when the session of a hello (with the slot it was given, if any)
    may start."""

    def __init__(
        self, quota: Callable[[], RateQuota], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._quota = quota  # read at each hello: a reload applies to the next one
        self._clock = clock
        self._admissions = _Pace()
        #: when the sessions of the last second started (``rate + burst`` at most)
        self._started: deque[float] = deque()
        #: reserved slots by id, in the order of their times (handed out in that order)
        self._slots: OrderedDict[str, float] = OrderedDict()

    def admit(self, slot: str = "", *, can_wait: bool = False) -> Turn:
        """``can_wait``: the client waits for a turn up to :data:`MAX_QUEUE_WAIT` away."""
        now = self._clock()
        self._forget_lapsed(now)
        reserved = self._slots.get(slot) if slot else None
        if reserved is not None:
            return self._redeem(slot, reserved - now)
        wait = self._admissions.take(now, self._quota())  # now, or reserved for later
        if not wait:
            return NOW
        if wait <= (MAX_QUEUE_WAIT if can_wait else HOLD):
            return Turn(hold=wait)
        if len(self._slots) >= MAX_SLOTS:
            return Turn(retry_in=wait)
        reservation = secrets.token_urlsafe(12)
        self._slots[reservation] = now + wait
        return Turn(retry_in=wait - LEAD, slot=reservation)

    def _redeem(self, slot: str, wait: float) -> Turn:
        if wait > HOLD:
            return Turn(retry_in=wait - LEAD, slot=slot)  # far too early: the same slot
        del self._slots[slot]
        return Turn(hold=wait) if wait > 0 else NOW

    def room_to_start(self) -> float:
        """0 when a session whose turn has come may start now (it is then counted as
        started), else the seconds until one may: at most what the pace allows in a second
        (``rate + burst - 1``) start in any second, by when they did start. Turns a late loop
        let pass together would otherwise start in one second and crowd it (103 of 1,000
        at a rate of 95); turns it let pass late are caught up within that bound."""
        now = self._clock()
        quota = self._quota()
        allowed = max(1, math.floor(quota.rate + quota.burst - 1))
        started = self._started
        while started and started[0] <= now - 1.0:
            started.popleft()
        if len(started) < allowed:
            started.append(now)
            return 0.0
        return started[len(started) - allowed] + 1.0 - now

    def spread_window(self, sessions: int) -> float:
        """The window a ``goaway`` asks ``sessions`` clients to spread their reconnections
        over (at least a second): :data:`SPREAD_SHARE` of the time they take to be admitted
        again."""
        return max(1.0, SPREAD_SHARE * sessions / self._quota().rate)

    def _forget_lapsed(self, now: float) -> None:
        while self._slots:
            oldest, at = next(iter(self._slots.items()))
            if at + SLOT_GRACE > now:
                return
            del self._slots[oldest]
