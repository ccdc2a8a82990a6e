"""The request rate limiter, with a fake clock: slowed first, then disconnected."""

from __future__ import annotations

import dataclasses

import pytest
from cloudbridge_core.config import load_config
from cloudbridge_core.errors import RateLimitExceeded
from cloudbridge_core.relay.ratelimit import RateLimiter, TokenBucket
from cloudbridge_core.settings import RateLimitSettings, RateQuota, TenantRateQuotas

QUOTA = RateQuota(rate=10, burst=5)


def settings(**changes: object) -> RateLimitSettings:
    base = dataclasses.replace(
        load_config(None, environ={}).settings.server.rate_limits,
        disconnect_after=2.0,
        control_messages=QUOTA,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_the_defaults_come_from_the_schema() -> None:
    limits = load_config(None, environ={}).settings.server.rate_limits
    assert limits.disconnect_after == 5.0
    assert limits.control_messages == RateQuota(rate=20, burst=100)
    assert limits.per_address.control_messages.rate > limits.control_messages.rate
    assert limits.tenants == {}


def test_a_burst_is_free_and_the_debt_past_it_is_the_wait() -> None:
    session = RateLimiter().session("acme", None)
    config = settings()
    verdicts = [session.charge("control_messages", config, now=0.0) for _ in range(5)]
    assert {v.delay for v in verdicts} == {0.0}
    assert not any(v.limited for v in verdicts)
    sixth = session.charge("control_messages", config, now=0.0)
    assert sixth.limited
    assert sixth.delay == pytest.approx(0.1)
    assert sixth.disconnect_at == pytest.approx(2.0)


def test_a_client_paced_to_its_rate_is_disconnected_after_the_grace() -> None:
    session = RateLimiter().session("acme", None)
    config = settings()
    now = 0.0
    error = None
    for _ in range(1000):
        try:
            now += session.charge("control_messages", config, now).delay
        except RateLimitExceeded as exc:
            error = exc
            break
    assert error is not None
    assert error.code == "rate_limited"
    assert 2.0 <= now < 2.2  # slowed all the while, then given up


def test_a_debt_longer_than_the_grace_ends_at_the_grace() -> None:
    session = RateLimiter().session("acme", None)
    verdict = session.charge("control_messages", settings(), now=0.0, cost=1000)
    assert verdict.delay > 90
    assert verdict.disconnect_at == pytest.approx(2.0)
    with pytest.raises(RateLimitExceeded):
        session.charge("control_messages", settings(), now=2.0, cost=0)


def test_a_break_clears_the_record() -> None:
    session = RateLimiter().session("acme", None)
    config = settings()
    for _ in range(6):
        session.charge("control_messages", config, now=0.0)
    # 1.9 s over, then quiet until the bucket is half full again: a new start
    assert session.charge("control_messages", config, now=0.35).limited is False
    assert session.charge("control_messages", config, now=2.5).disconnect_at is None


def test_sessions_from_one_address_share_its_buckets_and_free_them() -> None:
    limiter = RateLimiter()
    config = settings(
        per_address=dataclasses.replace(
            settings().per_address, control_messages=RateQuota(rate=10, burst=8)
        )
    )
    first = limiter.session("acme", "192.0.2.1")
    second = limiter.session("globex", "192.0.2.1")
    other = limiter.session("acme", "192.0.2.2")
    for _ in range(4):
        first.charge("control_messages", config, 0.0)
        second.charge("control_messages", config, 0.0)
    assert second.charge("control_messages", config, 0.0).limited  # the address's 9th
    assert not other.charge("control_messages", config, 0.0).limited
    assert limiter.addresses == 2
    first.close()
    second.close()
    second.close()  # idempotent
    assert limiter.addresses == 1


@pytest.mark.parametrize(
    ("one", "another"),
    [("2001:db8:1:2::1", "2001:db8:1:2:ffff::9"), ("::ffff:192.0.2.7", "192.0.2.7")],
    ids=["ipv6-/64", "ipv4-mapped"],
)
def test_addresses_count_by_source_as_the_preauth_caps_count_them(one: str, another: str) -> None:
    limiter = RateLimiter()
    config = settings(
        per_address=dataclasses.replace(
            settings().per_address, control_messages=RateQuota(rate=10, burst=2)
        )
    )
    first = limiter.session("acme", one)
    second = limiter.session("acme", another)
    first.charge("control_messages", config, 0.0)
    first.charge("control_messages", config, 0.0)
    assert second.charge("control_messages", config, 0.0).limited  # the source's third
    assert limiter.addresses == 1
    elsewhere = limiter.session("acme", "2001:db8:1:3::1")  # the next /64: another source
    assert not elsewhere.charge("control_messages", config, 0.0).limited
    assert limiter.addresses == 2


def test_a_tenant_override_replaces_only_the_kinds_it_names() -> None:
    generous = RateQuota(rate=1000, burst=1000)
    config = settings(
        tenants={
            "bigco": TenantRateQuotas(control_messages=generous, mux_pings=None, stream_opens=None)
        }
    )
    bigco = RateLimiter().session("bigco", None)
    acme = RateLimiter().session("acme", None)
    assert not any(bigco.charge("control_messages", config, 0.0).limited for _ in range(100))
    assert any(acme.charge("control_messages", config, 0.0).limited for _ in range(100))
    pings = config.mux_pings.burst + 1
    assert bigco.charge("mux_pings", config, 0.0, cost=pings).limited


def test_a_reload_requotes_the_buckets_in_place() -> None:
    session = RateLimiter().session("acme", None)
    for _ in range(5):
        session.charge("control_messages", settings(), 0.0)
    looser = settings(control_messages=RateQuota(rate=100, burst=50))
    assert session.charge("control_messages", looser, 0.5).delay == 0.0


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket.full(QUOTA, now=0.0)
    bucket.take(5, now=0.0)
    bucket.take(1, now=0.05)
    assert bucket.tokens == pytest.approx(-0.5)
    assert bucket.delay == pytest.approx(0.05)
    bucket.take(0, now=100.0)
    assert bucket.tokens == QUOTA.burst
    assert bucket.over_since is None
