"""Which tunnel targets the relay may connect to.

By default a tunnel may reach the public internet only: loopback, private ranges and
link-local addresses (cloud metadata at 169.254.169.254 among them) are denied unless
allowed. An explicit ``deny`` beats every ``allow``. Rules are ``HOST``, ``*.DOMAIN`` or
a CIDR, each optionally with ``:PORT`` or ``:LOW-HIGH``.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cloudbridge_core.errors import ConfigError, ConfigIssue, EgressDenied
from cloudbridge_core.settings import EgressSettings

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_RULE = re.compile(
    r"^(?P<target>\[[^\]]+\](?:/\d+)?|[^:\s]+)(?::(?P<low>\d{1,5})(?:-(?P<high>\d{1,5}))?)?$"
)
LOOPBACK = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128")]
LINK_LOCAL = [ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10")]
PRIVATE = [
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
        "0.0.0.0/8",
    )
]


@dataclass(frozen=True)
class Rule:
    host: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    low: int
    high: int

    @classmethod
    def parse(cls, text: str, where: str) -> Rule:
        match = _RULE.match(text.strip())
        if match is None:
            raise ConfigError([ConfigIssue(where, f"invalid egress rule {text!r}")])
        target = match["target"].strip("[]") if match["target"].startswith("[") else match["target"]
        target = target.replace("]", "")
        low = int(match["low"] or 1)
        high = int(match["high"] or match["low"] or 65535)
        if not 1 <= low <= high <= 65535:
            raise ConfigError([ConfigIssue(where, f"invalid port range in egress rule {text!r}")])
        try:
            return cls(None, ipaddress.ip_network(target, strict=False), low, high)
        except ValueError:
            return cls(target.lower(), None, low, high)

    def matches(self, host: str, addresses: Iterable[IpAddress], port: int) -> bool:
        if not self.low <= port <= self.high:
            return False
        if self.network is not None:
            return any(address in self.network for address in addresses)
        assert self.host is not None  # a rule is either a network or a host pattern
        return fnmatch.fnmatchcase(host.lower(), self.host)


@dataclass(frozen=True)
class EgressPolicy:
    allow: Sequence[Rule] = ()
    deny: Sequence[Rule] = ()
    allow_loopback: bool = False
    tenants: Mapping[str, tuple[Sequence[Rule], Sequence[Rule]]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, section: EgressSettings, *, dev: bool = False) -> EgressPolicy:
        """The policy of ``server.egress``; raises :class:`ConfigError` naming a bad rule."""

        def rules(entries: Sequence[str], where: str) -> list[Rule]:
            return [Rule.parse(rule, f"{where}.{index}") for index, rule in enumerate(entries)]

        # a tenant's entry may leave out allow or deny (the schema's defaults are not
        # filled in inside a map), so those come through as None
        tenants = {
            tenant: (
                rules(extra.allow or (), f"server.egress.tenants.{tenant}.allow"),
                rules(extra.deny or (), f"server.egress.tenants.{tenant}.deny"),
            )
            for tenant, extra in section.tenants.items()
        }
        return cls(
            allow=rules(section.allow, "server.egress.allow"),
            deny=rules(section.deny, "server.egress.deny"),
            allow_loopback=dev,
            tenants=tenants,
        )

    def check(self, tenant: str, host: str, addresses: Sequence[IpAddress], port: int) -> None:
        """Raise :class:`EgressDenied` unless ``tenant`` may reach every resolved address."""
        target = f"{host}:{port}"
        extra_allow, extra_deny = self.tenants.get(tenant, ((), ()))
        if any(rule.matches(host, addresses, port) for rule in [*self.deny, *extra_deny]):
            raise EgressDenied(f"{target} is denied by the relay's egress policy")
        if any(rule.matches(host, addresses, port) for rule in [*self.allow, *extra_allow]):
            return
        for resolved in addresses:
            mapped = resolved.ipv4_mapped if isinstance(resolved, ipaddress.IPv6Address) else None
            address = mapped or resolved
            if any(address in n for n in LINK_LOCAL):
                raise EgressDenied(
                    f"{target} is link-local ({address}); allow it explicitly to reach it"
                )
            if any(address in n for n in LOOPBACK) and not self.allow_loopback:
                raise EgressDenied(f"{target} is the relay's own loopback; allow it (or use --dev)")
            if any(address in n for n in PRIVATE):
                raise EgressDenied(
                    f"{target} is a private address ({address}); allow it explicitly"
                )
