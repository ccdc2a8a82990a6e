"""Request rate limits, pure: token buckets that slow an offender, then give it up.

Every session has a bucket per kind of request (control messages, multiplexer PINGs,
stream opens) and shares a second one per kind with the other sessions from its source
address (counted as the pre-auth caps count it: an IPv6 /64 is one source). A request
takes a token; a request finding the bucket empty goes into debt, and the debt (in
seconds at the bucket's rate) is how long the caller waits before it reads the next
request: the offender is slowed to its rate, and the transport's flow control pushes
back on it. One that stays over its rate for ``disconnect_after`` seconds without a break
(a break: the bucket refills to half its burst) is disconnected
(:class:`~cloudbridge_core.errors.RateLimitExceeded`). These are security limits: they
keep one tenant from starving the others.

No clocks, no asyncio: callers pass ``now`` (monotonic seconds) and sleep themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cloudbridge_core.errors import RateLimitExceeded
from cloudbridge_core.settings import RateLimitSettings, RateQuota
from cloudbridge_core.transports.preauth import source_key

#: the kinds of request that are limited, named as in ``server.rate_limits``
KINDS = ("control_messages", "mux_pings", "stream_opens")


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; debt is a negative balance."""

    rate: float
    burst: float
    tokens: float
    updated: float
    #: when the bucket last went into debt with no break since (``None``: not in debt)
    over_since: float | None = None

    @classmethod
    def full(cls, quota: RateQuota, now: float) -> TokenBucket:
        return cls(quota.rate, quota.burst, quota.burst, now)

    def requote(self, quota: RateQuota) -> None:
        """Take a new quota (a reload), keeping the balance within the new burst."""
        self.rate, self.burst = quota.rate, quota.burst
        self.tokens = min(self.tokens, self.burst)

    def take(self, cost: float, now: float) -> None:
        """Take ``cost`` tokens, going into debt if there are not enough."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(now, self.updated)
        # a break needs real slack: a flooder paced to its rate always finds the bucket
        # nearly empty, so scheduling jitter alone never clears its record
        if self.tokens >= self.burst / 2:
            self.over_since = None
        if self.tokens < cost and self.over_since is None:
            self.over_since = now
        self.tokens -= cost

    @property
    def delay(self) -> float:
        """How long the requester should wait before its next request (0: no debt)."""
        return max(0.0, -self.tokens / self.rate)


@dataclass(frozen=True)
class Verdict:
    """What one request earns: ``delay`` seconds of wait; ``limited``: the session is over
    a rate; ``disconnect_at``: when it is disconnected if it is still over a rate then."""

    delay: float
    limited: bool
    disconnect_at: float | None = None


@dataclass
class _Buckets:
    by_kind: dict[str, TokenBucket] = field(default_factory=dict)
    users: int = 0

    def take(self, kind: str, quota: RateQuota, cost: float, now: float) -> TokenBucket:
        bucket = self.by_kind.get(kind)
        if bucket is None:
            bucket = self.by_kind[kind] = TokenBucket.full(quota, now)
        elif (bucket.rate, bucket.burst) != (quota.rate, quota.burst):
            bucket.requote(quota)
        bucket.take(cost, now)
        return bucket


class RateLimiter:
    """The relay's buckets: one set per session (:meth:`session`), one per source address."""

    def __init__(self) -> None:
        self._addresses: dict[str, _Buckets] = {}

    def session(self, tenant: str, address: str | None) -> SessionLimiter:
        """Buckets for a new session from ``address`` (its peer's IP address, ``None`` when
        the transport does not know it); call :meth:`SessionLimiter.close` when it ends."""
        shared = None
        if address is not None:
            address = source_key(address)
            shared = self._addresses.setdefault(address, _Buckets())
            shared.users += 1
        return SessionLimiter(self, tenant, address, shared)

    @property
    def addresses(self) -> int:
        """Source addresses with buckets now (freed with their last session)."""
        return len(self._addresses)

    def _release(self, address: str) -> None:
        shared = self._addresses[address]
        shared.users -= 1
        if not shared.users:
            del self._addresses[address]


class SessionLimiter:
    """One session's view: its own buckets and its address's shared ones."""

    def __init__(
        self, limiter: RateLimiter, tenant: str, address: str | None, shared: _Buckets | None
    ) -> None:
        self._limiter = limiter
        self.tenant = tenant
        self.address = address
        self._own = _Buckets()
        self._shared = shared

    def charge(
        self, kind: str, settings: RateLimitSettings, now: float, cost: float = 1
    ) -> Verdict:
        """Charge ``cost`` requests of ``kind`` under ``settings`` (read at each call, so a
        reload applies at once).

        Raises :class:`RateLimitExceeded` when the session, or its address, has been over
        its rate for ``settings.disconnect_after`` seconds without a break.
        """
        buckets = [self._own.take(kind, session_quota(settings, self.tenant, kind), cost, now)]
        if self._shared is not None:
            buckets.append(self._shared.take(kind, getattr(settings.per_address, kind), cost, now))
        deadlines = []
        for bucket, whose in zip(buckets, ("session", "source address"), strict=False):
            if bucket.over_since is None:
                continue
            deadline = bucket.over_since + settings.disconnect_after
            if now >= deadline:
                raise RateLimitExceeded(
                    f"too many {kind.replace('_', ' ')}: the {whose} stayed over "
                    f"{bucket.rate:g}/s for {settings.disconnect_after:g}s"
                )
            deadlines.append(deadline)
        delay = max(bucket.delay for bucket in buckets)
        return Verdict(delay, bool(deadlines), min(deadlines, default=None))

    def close(self) -> None:
        """The session ended: its address's buckets go with the address's last session."""
        if self._shared is not None and self.address is not None:
            self._shared = None
            self._limiter._release(self.address)


def session_quota(settings: RateLimitSettings, tenant: str, kind: str) -> RateQuota:
    """A session's quota for ``kind``: its tenant's override, else the relay's."""
    override = settings.tenants.get(tenant)
    quota: RateQuota | None = getattr(override, kind) if override is not None else None
    return quota if quota is not None else getattr(settings, kind)
