"""The revocations a relay enforces: what ``relay token revoke`` wrote, held in memory.

Loaded from the cluster store at start and after an outage, kept current by its ``revoked``
events; consulted at every hello and refresh, so checking costs no round trip. Each
revocation is forgotten once every token it covers has expired (its ``until``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cloudbridge_core.errors import InvalidToken
from cloudbridge_core.providers import Claims
from cloudbridge_core.relay.cluster.store import Revocation

REVOKED = "the token has been revoked"


class Revocations:
    """``check(claims)`` refuses a revoked token; ``added`` and ``merge`` keep it current."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_key: dict[str, Revocation] = {}

    def __len__(self) -> int:
        self._prune()
        return len(self._by_key)

    def merge(self, revocations: Iterable[Revocation]) -> list[Revocation]:
        """Hold ``revocations`` (the store's whole list) too, keeping what was held: a
        store that lost its data must not lift a revocation. The ones new here, or wider
        than what was held, for the sessions they cover to end."""
        return [r for r in revocations if self._add(r, self._by_key.get(r.key))]

    def added(self, revocation: Revocation) -> Revocation | None:
        """Hold ``revocation`` too; itself when it covers tokens not covered before (new,
        or a subject's revoked again later), None when it changes nothing."""
        held = self._by_key.get(revocation.key)
        return revocation if self._add(revocation, held) else None

    def held(self) -> list[Revocation]:
        """The revocations in force."""
        self._prune()
        return list(self._by_key.values())

    def check(self, claims: Claims) -> None:
        """Raise ``InvalidToken`` when a revocation covers the token of ``claims``."""
        if self.covers(claims):
            raise InvalidToken(REVOKED)

    def covers(self, claims: Claims) -> bool:
        self._prune()
        return any(revocation.covers(claims) for revocation in self._by_key.values())

    def _add(self, revocation: Revocation, held: Revocation | None) -> bool:
        """Hold ``revocation`` merged with ``held`` (the one of its key); whether that
        covers tokens ``held`` did not."""
        if revocation.until <= self._clock():
            return False
        merged = revocation if held is None else _merged(held, revocation)
        self._by_key[merged.key] = merged
        return held is None or merged.revoked_at > held.revoked_at

    def _prune(self) -> None:
        now = self._clock()
        for key in [key for key, r in self._by_key.items() if r.until <= now]:
            del self._by_key[key]


def _merged(held: Revocation, new: Revocation) -> Revocation:
    """One revocation of their key: up to the later ``revoked_at``, until the later ``until``."""
    return dataclasses.replace(
        held, revoked_at=max(held.revoked_at, new.revoked_at), until=max(held.until, new.until)
    )


def revocation_from(body: Mapping[str, Any]) -> Revocation:
    """The revocation a ``revoked`` event carries; ``ValueError`` naming what is wrong with
    one that is not (it would otherwise fail every later check)."""
    if set(body) - {"tenant_id", "revoked_at", "until", "token_id", "subject"}:
        raise ValueError("a revocation has unknown fields")
    tenant_id, token_id, subject = body.get("tenant_id"), body.get("token_id"), body.get("subject")
    times: list[Any] = [body.get("revoked_at"), body.get("until")]
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ValueError("a revocation names no tenant")
    if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
        raise ValueError("a revocation's revoked_at and until are not times")
    named = [name for name in (token_id, subject) if name is not None]
    if len(named) != 1 or not isinstance(named[0], str) or not named[0]:
        raise ValueError("a revocation names neither one token id nor one subject")
    return Revocation(tenant_id, float(times[0]), float(times[1]), token_id, subject)
