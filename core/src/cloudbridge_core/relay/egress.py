"""Which tunnel targets the relay may connect to.

By default a tunnel may reach the public internet only: loopback, private ranges,
link-local addresses (cloud metadata at 169.254.169.254 among them) and the other IANA
special-purpose ranges are denied unless allowed. An explicit ``deny`` beats every
``allow``. Rules are ``HOST``, ``*.DOMAIN`` or a CIDR, each optionally with ``:PORT`` or
``:LOW-HIGH``.

The decision is made on the addresses that will be dialled: a target is resolved once
(:meth:`EgressPolicy.resolve`), every address it resolves to is canonicalised
(IPv4-mapped, 6to4 and NAT64 forms become the IPv4 address they carry) and checked on its
own, and the caller dials the checked address, never the name again. Some checks no rule
can lift: the relay's own listeners (on any of its addresses), loopback outside ``--dev``,
"this host" (``0.0.0.0/8``, ``::``), multicast and broadcast.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudbridge_core.errors import ConfigError, ConfigIssue, EgressDenied, TargetUnreachable
from cloudbridge_core.settings import EgressSettings

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``loop.getaddrinfo``'s shape; a test may put its own resolver in the policy
Resolver = Callable[[str, int], Awaitable[list[tuple[Any, ...]]]]
_RULE = re.compile(
    r"^(?P<target>\[[^\]]+\](?:/\d+)?|[^:\s]+)(?::(?P<low>\d{1,5})(?:-(?P<high>\d{1,5}))?)?$"
)
#: address-literal targets remembered as allowed, per policy (see :meth:`EgressPolicy.decided`)
DECIDED_KEPT = 256
#: the forms ``inet_aton`` (and so ``getaddrinfo``) reads as an IPv4 address:
#: ``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``
_LEGACY_IPV4 = re.compile(r"^(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}$")


def _nets(*cidrs: str) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


LOOPBACK = _nets("127.0.0.0/8", "::1/128")
#: "this host": a connection to 0.0.0.0 or :: reaches the relay's own host
THIS_HOST = _nets("0.0.0.0/8", "::/128")
MULTICAST = _nets("224.0.0.0/4", "255.255.255.255/32", "ff00::/8")
LINK_LOCAL = _nets("169.254.0.0/16", "fe80::/10")
PRIVATE = _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
#: the rest of the IANA special-purpose registries (IPv4 and IPv6): not the public internet
SPECIAL = _nets(
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation
    "192.31.196.0/24",  # AS112
    "192.52.193.0/24",  # AMT
    "192.88.99.0/24",  # 6to4 relay anycast
    "192.175.48.0/24",  # direct delegation AS112
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation
    "203.0.113.0/24",  # documentation
    "240.0.0.0/4",  # reserved
    "::/96",  # IPv4-compatible (deprecated)
    "64:ff9b:1::/48",  # local-use NAT64
    "100::/64",  # discard-only
    "2001::/23",  # IETF protocol assignments (Teredo, benchmarking, ORCHID)
    "2001:db8::/32",  # documentation
    "3fff::/20",  # documentation
    "5f00::/16",  # segment routing
    "fec0::/10",  # site-local (deprecated)
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def canonical(address: IpAddress) -> IpAddress:
    """The address a packet to ``address`` ends up at: IPv4-mapped (``::ffff:a.b.c.d``),
    6to4 (``2002::/16``) and well-known NAT64 (``64:ff9b::/96``) addresses carry an IPv4
    address, which is what the policy judges."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    address = ipaddress.IPv6Address(address.packed)  # drops a scope id
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(address.packed[-4:])
    return address


def literal(host: str) -> IpAddress | None:
    """``host`` as an address when it is one in any form the resolver reads
    (``[::1]``, ``fe80::1%eth0``, ``127.1``, ``2130706433``, ``0x7f000001``), else None."""
    text = host.strip("[]").split("%")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(text.lower()):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def is_local(address: IpAddress) -> bool:
    """Whether ``address`` is one of this host's own: the kernel routes to a local address
    with that address as the source (a UDP ``connect`` sends nothing, it only routes)."""
    if any(address in net for net in (*LOOPBACK, *THIS_HOST)):
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(address), 9))
        except OSError:  # no route: not ours either
            return False
        return ipaddress.ip_address(str(probe.getsockname()[0]).split("%")[0]) == address


def split_target(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as a canonical host name (lower case, no trailing dot,
    no brackets) and a port; raises :class:`EgressDenied` when it is neither."""
    host, _, port_text = target.rpartition(":")
    host = host.strip("[]").lower().removesuffix(".")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise EgressDenied(f"{target!r} is not a HOST:PORT tunnel target")
    return host, int(port_text)


@dataclass(frozen=True)
class Rule:
    host: str | None
    network: IpNetwork | None
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
            return cls(target.lower().removesuffix("."), None, low, high)

    def matches(self, host: str, address: IpAddress, port: int) -> bool:
        """Whether the rule covers ``address`` (reached by the name ``host``) on ``port``;
        a host rule matches names only, never an address written as the host."""
        if not self.low <= port <= self.high:
            return False
        if self.network is not None:
            return address in self.network or canonical(address) in self.network
        assert self.host is not None  # a rule is either a network or a host pattern
        return literal(host) is None and fnmatch.fnmatchcase(host, self.host)


@dataclass(frozen=True)
class EgressPolicy:
    allow: Sequence[Rule] = ()
    deny: Sequence[Rule] = ()
    allow_loopback: bool = False
    tenants: Mapping[str, tuple[Sequence[Rule], Sequence[Rule]]] = field(default_factory=dict)
    #: the relay's own listening ports (transports, STUN, /metrics): never a tunnel target
    #: on any address of this host
    own_ports: frozenset[int] = frozenset()
    #: resolves a target once; ``None`` is the event loop's ``getaddrinfo``
    resolver: Resolver | None = None
    #: (tenant, target) -> what :meth:`resolve` returned, for address literals it allowed
    _decided: dict[tuple[str, str], tuple[int, tuple[Any, ...]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_settings(
        cls, section: EgressSettings, *, dev: bool = False, own_ports: Iterable[int] = ()
    ) -> EgressPolicy:
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
            own_ports=frozenset(own_ports),
        )

    async def resolve(self, tenant: str, target: str) -> tuple[int, tuple[Any, ...]]:
        """Resolve ``target`` once and check every address it resolves to; return the
        ``(family, sockaddr)`` to connect to, which is one of the checked addresses.

        Raises :class:`EgressDenied` when any address is denied (a name answering with one
        allowed and one denied address is denied as a whole) and :class:`TargetUnreachable`
        when the name does not resolve.
        """
        host, port = split_target(target)
        try:
            if self.resolver is not None:
                infos = await self.resolver(host, port)
            else:
                # stream addresses only (all that is dialled): an address literal then
                # resolves without a trip to the resolver's thread
                loop = asyncio.get_running_loop()
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise TargetUnreachable(f"cannot resolve {host}") from exc
        found = [
            (info[0], info[4])
            for info in infos
            if info[0] in (socket.AF_INET, socket.AF_INET6) and info[1] == socket.SOCK_STREAM
        ]
        if not found:
            raise TargetUnreachable(f"{host} has no IPv4 or IPv6 address")
        addresses = [ipaddress.ip_address(str(sockaddr[0]).split("%")[0]) for _, sockaddr in found]
        self.check(tenant, host, addresses, port)
        # an address literal resolves to itself and the policy is immutable, so the verdict
        # holds for as long as the policy does; not for the relay's own ports, whose check
        # asks which addresses are this host's (interfaces come and go), nor for names
        if self.resolver is None and port not in self.own_ports and literal(host) is not None:
            if len(self._decided) >= DECIDED_KEPT:
                del self._decided[next(iter(self._decided))]
            self._decided[tenant, target] = found[0]
        return found[0]

    def decided(self, tenant: str, target: str) -> tuple[int, tuple[Any, ...]] | None:
        """What :meth:`resolve` returned for ``target`` before, when it is an address
        literal the policy allowed ``tenant`` (then there is nothing to resolve again and
        the same checks would pass): a tunnel to it is dialled without waiting. Else None."""
        return self._decided.get((tenant, target))

    def check(self, tenant: str, host: str, addresses: Sequence[IpAddress], port: int) -> None:
        """Raise :class:`EgressDenied` unless ``tenant`` may reach every one of
        ``addresses`` (what ``host`` resolved to) on ``port``."""
        target = f"{host}:{port}"
        extra_allow, extra_deny = self.tenants.get(tenant, ((), ()))
        for address in addresses:
            if any(rule.matches(host, address, port) for rule in [*self.deny, *extra_deny]):
                raise EgressDenied(f"{target} is denied by the relay's egress policy")
            self._check_fixed(target, canonical(address), port)
            if any(rule.matches(host, address, port) for rule in [*self.allow, *extra_allow]):
                continue
            self._check_special(target, canonical(address))

    def _check_fixed(self, target: str, address: IpAddress, port: int) -> None:
        """What no allow rule lifts."""
        if port in self.own_ports and is_local(address):
            raise EgressDenied(f"{target} is the relay itself ({address}:{port})")
        if any(address in net for net in THIS_HOST):
            raise EgressDenied(f"{target} is 'this host' ({address}), never a tunnel target")
        if any(address in net for net in MULTICAST):
            raise EgressDenied(f"{target} is a multicast or broadcast address ({address})")
        if any(address in net for net in LOOPBACK) and not self.allow_loopback:
            raise EgressDenied(f"{target} is the relay's own loopback (only --dev opens it)")

    @staticmethod
    def _check_special(target: str, address: IpAddress) -> None:
        """The special-purpose ranges an allow rule may open."""
        if any(address in net for net in LINK_LOCAL):
            raise EgressDenied(
                f"{target} is link-local ({address}); allow it explicitly to reach it"
            )
        if any(address in net for net in PRIVATE):
            raise EgressDenied(f"{target} is a private address ({address}); allow it explicitly")
        if any(address in net for net in SPECIAL):
            raise EgressDenied(
                f"{target} is a special-purpose address ({address}); allow it explicitly"
            )
