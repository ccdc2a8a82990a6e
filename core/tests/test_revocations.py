"""The relay's revocation cache: what it refuses, what a new revocation changes, pruning."""

from __future__ import annotations

from typing import Any

import pytest
from cloudbridge_core.errors import InvalidToken
from cloudbridge_core.providers import Claims
from cloudbridge_core.relay.cluster.store import Revocation
from cloudbridge_core.relay.revocations import Revocations, revocation_from

NOW = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def claims(
    subject: str = "laptop", tenant: str = "acme", jti: str = "t1", issued_at: float = NOW
) -> Claims:
    return Claims(
        subject=subject,
        tenant_id=tenant,
        permissions=frozenset({"relay:connect"}),
        expires_at=NOW + 3600,
        token_id=jti,
        issued_at=issued_at,
    )


def by_id(jti: str = "t1", until: float = NOW + 3600) -> Revocation:
    return Revocation("acme", NOW, until, token_id=jti)


def by_subject(revoked_at: float = NOW, until: float = NOW + 3600) -> Revocation:
    return Revocation("acme", revoked_at, until, subject="laptop")


def test_a_token_revoked_by_id_is_refused_and_others_are_not() -> None:
    revocations = Revocations(Clock())
    assert revocations.added(by_id()) == by_id()
    with pytest.raises(InvalidToken, match="the token has been revoked"):
        revocations.check(claims())
    revocations.check(claims(jti="t2"))
    revocations.check(claims(tenant="globex"))


def test_a_subject_revocation_covers_tokens_issued_up_to_it() -> None:
    revocations = Revocations(Clock())
    revocations.added(by_subject())
    assert revocations.covers(claims(issued_at=NOW - 10))
    assert revocations.covers(claims(issued_at=NOW))
    assert not revocations.covers(claims(issued_at=NOW + 1))
    assert not revocations.covers(claims(subject="desktop", issued_at=NOW - 10))
    # a token saying nothing of its issue is taken as issued before: refused (fail closed)
    assert revocations.covers(
        Claims("laptop", "acme", frozenset(), NOW + 60, token_id=None, issued_at=None)
    )


def test_added_says_what_changed() -> None:
    revocations = Revocations(Clock())
    assert revocations.added(by_subject()) is not None
    assert revocations.added(by_subject()) is None  # the same again: nothing new
    assert revocations.added(by_subject(revoked_at=NOW - 5)) is None  # covers less
    later = by_subject(revoked_at=NOW + 30)
    assert revocations.added(later) == later  # now covers tokens issued since
    assert revocations.covers(claims(issued_at=NOW + 20))
    assert revocations.added(by_id(until=NOW - 1)) is None  # already lapsed
    assert len(revocations) == 1


def test_revocations_are_forgotten_once_every_token_they_cover_has_expired() -> None:
    clock = Clock()
    revocations = Revocations(clock)
    revocations.added(by_id("short", until=NOW + 10))
    revocations.added(by_id("long", until=NOW + 100))
    clock.now = NOW + 50
    assert not revocations.covers(claims(jti="short"))
    assert revocations.covers(claims(jti="long"))
    assert len(revocations) == 1
    # merging keeps the later lapse: a later revocation of the key is not cut short
    revocations.added(by_subject(until=NOW + 60))
    revocations.added(by_subject(revoked_at=NOW + 1, until=NOW + 200))
    clock.now = NOW + 150
    assert revocations.covers(claims(issued_at=NOW))


def test_merge_holds_the_store_list_too_and_returns_what_is_new() -> None:
    revocations = Revocations(Clock())
    revocations.added(by_id("t1"))
    changed = revocations.merge([by_id("t1"), by_id("t2")])
    assert changed == [by_id("t2")]
    assert revocations.covers(claims(jti="t2"))
    # a store that lost its data (Redis restarted without persistence) lifts nothing
    assert revocations.merge([]) == []
    assert revocations.covers(claims(jti="t1"))
    assert revocations.merge([by_subject(revoked_at=NOW + 5)]) == [by_subject(revoked_at=NOW + 5)]


def test_a_revoked_event_body_is_checked() -> None:
    assert revocation_from(by_subject().to_dict()) == by_subject()
    good: dict[str, Any] = by_id().to_dict()
    for bad in (
        {**good, "extra": 1},
        {**good, "tenant_id": ""},
        {**good, "until": "soon"},
        {**good, "revoked_at": True},
        {**good, "subject": "laptop"},
        {**good, "token_id": None},
        {**good, "token_id": 7},
    ):
        with pytest.raises(ValueError, match="a revocation"):
            revocation_from(bad)
