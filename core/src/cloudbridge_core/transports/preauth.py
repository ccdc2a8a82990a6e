"""The pre-auth budget every transport holds a stranger to (these are security limits).

From the moment a connection is accepted until the relay has authenticated it, a peer
gets one deadline (``server.preauth_timeout``) for everything together (TLS handshake,
WebSocket upgrade, the hello), and only so many such connections may be pending at once
from one source address (``server.preauth_max_per_address``) and in total
(``server.preauth_max_connections``). The relay owns one :class:`PreauthGate` and hands it
to every transport in :attr:`~cloudbridge_core.providers.Endpoint.preauth`; a transport
asks it for an :class:`Admission` as soon as it accepts a connection and closes the
connection at once when it gets none. A transport that ignores the gate still works: the
relay then applies the deadline from the moment it is handed the session.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

#: why a connection was refused before authentication (metric label values)
PER_ADDRESS = "per_address"
TOTAL = "total"


@dataclass(frozen=True, slots=True)
class PreauthLimits:
    timeout: float = 10.0
    max_per_address: int = 64
    max_connections: int = 1024


class Admission:
    """One unauthenticated connection's place in the gate; :meth:`release` it when the
    connection is authenticated or ends (idempotent)."""

    def __init__(self, gate: PreauthGate, address: str, deadline: float) -> None:
        self._gate = gate
        self.address = address
        #: the event loop's clock (``loop.time()``) at which the budget runs out
        self.deadline = deadline
        self._released = False
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, on_expiry: Callable[[], None]) -> None:
        """Call ``on_expiry`` at the deadline unless released first (the connection is
        then counted as expired, and released)."""
        self._timer = asyncio.get_running_loop().call_at(self.deadline, self._fire, on_expiry)

    def _fire(self, on_expiry: Callable[[], None]) -> None:
        self._timer = None
        self.expire()
        on_expiry()

    def remaining(self) -> float:
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._released:
            self._released = True
            self._gate._release(self.address)

    def expire(self) -> None:
        """The deadline passed before authentication: counted, and released."""
        if not self._released:
            self._gate.expired += 1
            self.release()


class PreauthGate:
    """Counts unauthenticated connections by source address; ``limits`` is read at each
    admission, so a reloaded config applies to the connections that follow."""

    def __init__(self, limits: Callable[[], PreauthLimits]) -> None:
        self._limits = limits
        self._pending: Counter[str] = Counter()
        #: connections refused so far, by reason (:data:`PER_ADDRESS`, :data:`TOTAL`)
        self.refused: Counter[str] = Counter()
        #: connections dropped at their deadline, not authenticated (:meth:`Admission.expire`)
        self.expired = 0

    @property
    def timeout(self) -> float:
        return self._limits().timeout

    @property
    def pending(self) -> int:
        """Connections accepted and not yet authenticated (or closed)."""
        return self._pending.total()

    def admit(self, address: str, *, since: float | None = None) -> Admission | None:
        """A place for a connection from ``address`` just accepted, or ``None`` when the
        connection is over a cap and has to be closed at once (it is counted). ``since``
        is when it was accepted (``loop.time()``) if that was earlier than now: its
        deadline counts from then."""
        limits = self._limits()
        key = source_key(address)
        if self._pending.total() >= limits.max_connections:
            self.refused[TOTAL] += 1
            return None
        if self._pending[key] >= limits.max_per_address:
            self.refused[PER_ADDRESS] += 1
            return None
        self._pending[key] += 1
        accepted = asyncio.get_running_loop().time() if since is None else since
        return Admission(self, key, accepted + limits.timeout)

    def _release(self, key: str) -> None:
        self._pending[key] -= 1
        if self._pending[key] <= 0:
            del self._pending[key]


def source_key(address: str) -> str:
    """The source an address counts for: an IPv6 /64 (one host usually holds a whole /64),
    an IPv4-mapped IPv6 address as the IPv4 address it carries. The pre-auth caps and the
    per-address rate limits both count by it."""
    try:
        parsed = ipaddress.ip_address(address.split("%", maxsplit=1)[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)
