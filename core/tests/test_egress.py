"""The relay's egress policy: defaults, rules, precedence, per-tenant additions."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from cloudbridge_core.config import load_config
from cloudbridge_core.errors import ConfigError, EgressDenied
from cloudbridge_core.relay.egress import EgressPolicy


def from_section(section: dict[str, Any]) -> EgressPolicy:
    """The policy of a ``server.egress`` section, read as the relay reads it."""
    config = load_config(None, environ={}, overrides={"server.egress": (section, "test")})
    return EgressPolicy.from_settings(config.settings.server.egress)


def ip(text: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(text)]


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.1.1", "private"),
        ("100.96.0.5", "private"),
        ("fd00::5", "private"),
    ],
)
def test_default_denies_internal_addresses(address: str, reason: str) -> None:
    with pytest.raises(EgressDenied, match=reason):
        EgressPolicy().check("acme", "target", ip(address), 80)


def test_public_addresses_are_allowed_and_dev_opens_loopback() -> None:
    EgressPolicy().check("acme", "example.com", ip("203.0.113.10"), 443)
    EgressPolicy(allow_loopback=True).check("acme", "localhost", ip("127.0.0.1"), 8080)
    with pytest.raises(EgressDenied, match="link-local"):
        EgressPolicy(allow_loopback=True).check("acme", "metadata", ip("169.254.169.254"), 80)


def test_rules_hosts_wildcards_cidrs_ports_and_deny_wins() -> None:
    policy = from_section(
        {
            "allow": ["10.0.0.0/8:22", "*.internal.example.com:443", "db.example.com:5000-5010"],
            "deny": ["10.9.0.0/16", "203.0.113.66"],
        }
    )
    policy.check("acme", "10.1.1.1", ip("10.1.1.1"), 22)
    policy.check("acme", "api.internal.example.com", ip("10.5.5.5"), 443)
    policy.check("acme", "db.example.com", ip("192.168.0.9"), 5005)
    for host, address, port in [
        ("10.1.1.1", "10.1.1.1", 23),  # port outside the rule
        ("10.9.1.1", "10.9.1.1", 22),  # an explicit deny beats the allow
        ("evil.example.com", "203.0.113.66", 443),
        ("db.example.com", "192.168.0.9", 5011),
    ]:
        with pytest.raises(EgressDenied):
            policy.check("acme", host, ip(address), port)


def test_tenant_rules_apply_to_that_tenant_only() -> None:
    policy = from_section(
        {
            "tenants": {
                "acme": {"allow": ["10.20.0.0/16:22"]},
                "globex": {"deny": ["203.0.113.0/24"]},
            }
        }
    )
    policy.check("acme", "10.20.1.1", ip("10.20.1.1"), 22)
    with pytest.raises(EgressDenied):
        policy.check("globex", "10.20.1.1", ip("10.20.1.1"), 22)
    policy.check("acme", "web", ip("203.0.113.7"), 80)
    with pytest.raises(EgressDenied, match="denied by the relay's egress policy"):
        policy.check("globex", "web", ip("203.0.113.7"), 80)


@pytest.mark.parametrize("rule", ["10.0.0.0/8:0", "host:99999", "host:20-10", "a b"])
def test_bad_rules_name_their_path(rule: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_section({"tenants": {"acme": {"allow": [rule]}}})
    assert caught.value.issues[0].path == "server.egress.tenants.acme.allow.0"
