"""``overlay.allow``: which peers of the tenant may reach this device over the overlay,
as an nftables table of its own on the overlay interface (replaced whole, atomically, at
each change). Whatever no entry allows is dropped; answers to this device's own
connections always come back in."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence

from cloudbridge_core.overlay.nft import run_nft
from cloudbridge_core.settings import OverlayAllowRule

WHAT = "the overlay's inbound filter (overlay.allow)"


def table_name(interface: str) -> str:
    return "cbf_" + re.sub(r"[^A-Za-z0-9_]", "_", interface)


def ruleset(
    interface: str,
    pool: ipaddress.IPv4Network,
    rules: Sequence[OverlayAllowRule],
    peers: Mapping[str, str],
    dns: bool,
) -> str:
    """The table for ``rules``, with ``peers`` (name -> overlay address) as they are now."""
    on = f'iifname "{interface}"'
    lines = [f"{on} ct state established,related accept"]
    if dns:  # names are for every peer of the tenant, whatever else they may reach
        lines.append(f"{on} ip saddr {pool} udp dport 53 accept")
    for rule in rules:
        if "*" in rule.peers:
            sources = str(pool)
        else:
            known = sorted({peers[name] for name in rule.peers if name in peers})
            if not known:
                continue  # none of them in the mesh now: this entry lets nobody in yet
            sources = "{ " + ", ".join(known) + " }"
        lines.append(f"{on} ip saddr {sources}{_what(rule)} accept")
    lines.append(f"{on} drop")
    body = "\n".join(f"    {line}" for line in lines)
    name = table_name(interface)
    return (
        f"table inet {name} {{}}\ndelete table inet {name}\n"
        f"table inet {name} {{\n  chain input {{\n"
        f"    type filter hook input priority filter; policy accept;\n{body}\n  }}\n}}\n"
    )


def _what(rule: OverlayAllowRule) -> str:
    if rule.protocol == "icmp":
        return " meta l4proto icmp"
    ports = " dport { " + ", ".join(map(str, rule.ports)) + " }" if rule.ports else ""
    if rule.protocol in ("tcp", "udp"):
        return f" {rule.protocol}{ports}" if ports else f" meta l4proto {rule.protocol}"
    return f" meta l4proto {{ tcp, udp }} th{ports}" if ports else ""


async def apply(rules: str) -> None:
    await run_nft(rules, WHAT)


async def remove(interface: str) -> None:
    """Delete the table, if there is one (a run killed before its own cleanup left it)."""
    name = table_name(interface)
    await run_nft(f"table inet {name} {{}}\ndelete table inet {name}\n", WHAT)
