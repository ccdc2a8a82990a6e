"""The relay's egress policy: defaults, rules, precedence, per-tenant additions, the checks
no rule lifts, canonical forms of addresses, and resolving once."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import replace
from typing import Any

import pytest
from cloudbridge_core.config import load_config
from cloudbridge_core.errors import ConfigError, EgressDenied
from cloudbridge_core.relay.egress import EgressPolicy, Rule, is_local, literal
from hypothesis import given
from hypothesis import strategies as st

LOOPBACK_FORMS = ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1"]


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
    EgressPolicy().check("acme", "example.com", ip("93.184.215.14"), 443)
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
                "globex": {"deny": ["93.184.215.0/24"]},
            }
        }
    )
    policy.check("acme", "10.20.1.1", ip("10.20.1.1"), 22)
    with pytest.raises(EgressDenied):
        policy.check("globex", "10.20.1.1", ip("10.20.1.1"), 22)
    policy.check("acme", "web", ip("93.184.215.7"), 80)
    with pytest.raises(EgressDenied, match="denied by the relay's egress policy"):
        policy.check("globex", "web", ip("93.184.215.7"), 80)


@pytest.mark.parametrize("rule", ["10.0.0.0/8:0", "host:99999", "host:20-10", "a b"])
def test_bad_rules_name_their_path(rule: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_section({"tenants": {"acme": {"allow": [rule]}}})
    assert caught.value.issues[0].path == "server.egress.tenants.acme.allow.0"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("224.0.0.251", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "this host"),  # noqa: S104 - a target, not a bind
        ("0.1.2.3", "this host"),
        ("::", "this host"),
        ("240.0.0.1", "special-purpose"),
        ("198.18.0.1", "special-purpose"),
        ("198.19.255.254", "special-purpose"),
        ("192.0.0.8", "special-purpose"),
        ("192.0.2.1", "special-purpose"),
        ("2001:db8::1", "special-purpose"),
        ("100.64.0.1", "private"),
        ("fc00::1", "private"),
        ("fe80::1", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 carrying the metadata address
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 carrying 127.0.0.1
        ("::7f00:1", "special-purpose"),  # IPv4-compatible (deprecated)
    ],
)
def test_special_purpose_ranges_are_denied(address: str, reason: str) -> None:
    with pytest.raises(EgressDenied, match=reason):
        EgressPolicy().check("acme", "target", ip(address), 80)


def test_allow_rules_never_open_loopback_this_host_multicast_or_the_relay() -> None:
    policy = from_section({"allow": ["*.test", "localhost", "127.0.0.0/8", "[::]/0", "0.0.0.0/0"]})
    for host, address in [
        ("app.test", "127.0.0.1"),
        ("localhost", "::1"),
        ("app.test", "::ffff:127.0.0.1"),
        ("app.test", "0.0.0.0"),  # noqa: S104 - a target, not a bind
        ("app.test", "224.0.0.1"),
    ]:
        with pytest.raises(EgressDenied):
            policy.check("acme", host, ip(address), 80)
    # what allow rules may open, they still open
    policy.check("acme", "app.test", ip("10.1.2.3"), 80)
    policy.check("acme", "app.test", ip("169.254.169.254"), 80)


def test_every_address_of_a_name_is_checked() -> None:
    policy = from_section({"allow": ["*.test", "10.20.0.0/16"]})
    both = [ipaddress.ip_address("10.20.0.1"), ipaddress.ip_address("127.0.0.1")]
    with pytest.raises(EgressDenied, match="loopback"):
        policy.check("acme", "app.test", both, 80)
    with pytest.raises(EgressDenied, match="loopback"):
        policy.check("acme", "other.example", both, 80)
    public_and_private = [ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("10.9.0.1")]
    with pytest.raises(EgressDenied, match="private"):
        EgressPolicy().check("acme", "mixed.example", public_and_private, 80)


def test_the_relays_own_ports_are_denied_even_in_dev_mode() -> None:
    policy = EgressPolicy(allow_loopback=True, own_ports=frozenset({8443, 3478}))
    for address in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"]:
        with pytest.raises(EgressDenied, match="the relay itself"):
            policy.check("acme", "localhost", ip(address), 8443)
    policy.check("acme", "localhost", ip("127.0.0.1"), 8444)  # --dev still opens loopback
    policy.check("acme", "example.com", ip("93.184.215.14"), 8443)  # not this host


def test_the_relays_own_ports_on_its_other_addresses() -> None:
    # the address this host would send from towards a public one is one of its own
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("93.184.215.14", 9))  # routes only: a UDP connect sends nothing
        except OSError:
            pytest.skip("this host has no IPv4 route but loopback")
        own = ipaddress.ip_address(probe.getsockname()[0])
    assert is_local(own)
    policy = from_section({"allow": [f"{own}/32"]})
    policy.check("acme", "me", [own], 8080)
    with pytest.raises(EgressDenied, match="the relay itself"):
        replace(policy, own_ports=frozenset({8443})).check("acme", "me", [own], 8443)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("169.254.169.254", "169.254.169.254"),
    ],
)
def test_addresses_written_in_any_form_are_read_as_addresses(host: str, address: str) -> None:
    assert literal(host) == ipaddress.ip_address(address)
    # so a host rule, which is about names, never matches them
    assert not Rule.parse("*", "allow.0").matches(host, ipaddress.ip_address(address), 80)


def test_names_are_not_addresses() -> None:
    for host in ["example.com", "1.2.3.4.nip.io", "0x7f.test", "db"]:
        assert literal(host) is None


ipv4 = st.ip_addresses(v=4)


@given(ipv4)
def test_ipv4_forms_get_the_same_verdict(address: ipaddress.IPv4Address) -> None:
    """An IPv4 address, its IPv4-mapped and 6to4 forms and its decimal, hex and octal
    spellings are one target to the policy."""
    policy = EgressPolicy()
    forms = [
        address,
        ipaddress.IPv6Address(f"::ffff:{address}"),
        ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80)),
        ipaddress.IPv6Address(f"64:ff9b::{address}"),
    ]
    verdicts = set()
    for form in forms:
        try:
            policy.check("acme", "target", [form], 80)
            verdicts.add("allowed")
        except EgressDenied as error:
            verdicts.add(error.message.split(" is ", 1)[1].split(" (")[0])
    assert len(verdicts) == 1
    for spelling in [str(int(address)), hex(int(address)), "0" + oct(int(address))[2:]]:
        assert literal(spelling) == address


@given(
    st.lists(st.ip_addresses(), max_size=3),
    st.sampled_from(LOOPBACK_FORMS),
    st.lists(st.sampled_from(["*", "*.test", "0.0.0.0/0", "[::]/0", "127.0.0.0/8"]), max_size=3),
)
def test_no_allow_rule_reaches_loopback(
    others: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    loopback: str,
    allow: list[str],
) -> None:
    policy = EgressPolicy(allow=[Rule.parse(rule, "allow") for rule in allow])
    addresses = [*others, ipaddress.ip_address(loopback)]
    with pytest.raises(EgressDenied):
        policy.check("acme", "app.test", addresses, 80)


def test_resolve_checks_every_answer_and_returns_a_checked_one() -> None:
    answers = {
        "two.test": [("93.184.215.14", 80), ("127.0.0.1", 80)],
        "one.test": [("93.184.215.14", 80)],
    }

    async def resolver(host: str, port: int) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", a) for a in answers[host]]

    async def main() -> None:
        policy = from_section({"allow": ["*.test"]})
        policy = replace(policy, resolver=resolver)
        with pytest.raises(EgressDenied, match="loopback"):
            await policy.resolve("acme", "two.test:80")
        assert await policy.resolve("acme", "one.test:80") == (
            socket.AF_INET,
            answers["one.test"][0],
        )
        for garbage in ["no-port", "host:", "host:0", "host:70000", ":80", "host:8o"]:
            with pytest.raises(EgressDenied, match="not a HOST:PORT"):
                await policy.resolve("acme", garbage)

    asyncio.run(main())


def test_allowed_address_literals_are_remembered_per_tenant_and_policy() -> None:
    async def main() -> None:
        policy = from_section({"tenants": {"acme": {"allow": ["10.20.0.0/16:22"]}}})
        for tenant, target in [("acme", "10.20.1.1:22"), ("acme", "93.184.215.14:80")]:
            assert policy.decided(tenant, target) is None
            found = await policy.resolve(tenant, target)
            assert policy.decided(tenant, target) == found  # dialled again without resolving
        with pytest.raises(EgressDenied):
            await policy.resolve("globex", "10.20.1.1:22")
        assert policy.decided("globex", "10.20.1.1:22") is None  # a verdict is per tenant
        # a policy replaced (a reload) judges afresh
        assert replace(policy, allow_loopback=True).decided("acme", "10.20.1.1:22") is None
        # the relay's own ports: whether an address is this host's may change
        own = replace(policy, own_ports=frozenset({80}))
        await own.resolve("acme", "93.184.215.14:80")
        assert own.decided("acme", "93.184.215.14:80") is None

    asyncio.run(main())


def test_names_are_never_remembered() -> None:
    async def resolver(host: str, port: int) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]

    async def main() -> None:
        policy = replace(EgressPolicy(), resolver=resolver)
        await policy.resolve("acme", "example.test:80")
        assert policy.decided("acme", "example.test:80") is None  # a name may move

    asyncio.run(main())
