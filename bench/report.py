"""The benchmark's report: a table of figures, ratio tables, issue 15's goals, and JSON.

Figures are kept in base units (bytes per second, seconds, bytes) under the keys of
:data:`METRICS`; a path lacks a key it has no figure for (direct TCP has no forwarder,
so neither memory nor CPU).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Figures = dict[str, float]

BULK = [
    "bulk_up_1_bytes_per_second",
    "bulk_down_1_bytes_per_second",
    "bulk_up_8_bytes_per_second",
    "bulk_down_8_bytes_per_second",
]


@dataclass(frozen=True)
class Metric:
    key: str
    name: str
    unit: str
    #: turns the figure into the table's text
    show: Callable[[float], str]
    higher_is_better: bool
    #: whether a ratio between two paths means something (a count of completions does not)
    comparable: bool = True

    def label(self, parallel: int) -> str:
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.name}{unit}".format(parallel=parallel)


def _rate(value: float) -> str:
    return f"{value / 1e6:,.1f}"


METRICS = [
    Metric("bulk_up_1_bytes_per_second", "bulk up, 1 conn", "MB/s", _rate, True),
    Metric("bulk_down_1_bytes_per_second", "bulk down, 1 conn", "MB/s", _rate, True),
    Metric("bulk_up_8_bytes_per_second", "bulk up, 8 conns", "MB/s", _rate, True),
    Metric("bulk_down_8_bytes_per_second", "bulk down, 8 conns", "MB/s", _rate, True),
    Metric("parallel_bytes_per_second", "bulk, {parallel} conns", "MB/s", _rate, True),
    Metric(
        "parallel_completed",
        "  of which completed",
        "",
        lambda value: f"{value:.0f}/{{parallel}}",
        True,
        comparable=False,
    ),
    Metric("rtt_p50_seconds", "RTT p50", "µs", lambda value: f"{value * 1e6:,.0f}", False),
    Metric("rtt_p99_seconds", "RTT p99", "µs", lambda value: f"{value * 1e6:,.0f}", False),
    Metric("setup_per_second", "setups", "/s", lambda value: f"{value:,.0f}", True),
    Metric(
        "idle_bytes_per_connection",
        "memory per idle conn",
        "KiB",
        lambda value: f"{value / 1024:,.1f}",
        False,
    ),
    Metric("cpu_seconds_per_gib", "CPU per GiB", "s", lambda value: f"{value:.2f}", False),
]
BY_KEY = {metric.key: metric for metric in METRICS}

#: paths whose relay and target are behind a 1,500-byte MTU link, and how they are named
MTU = "mtu1500-"
GROUPS = [
    ("", "loopback", "on loopback"),
    (MTU, "mtu1500", "relay and target in a namespace behind a 1,500-byte MTU veth link"),
]
#: the TCP transports issue 15 holds to socat's figures
TCP_TRANSPORTS = ("cloudbridge-tls", "cloudbridge-websocket")


@dataclass(frozen=True)
class Goal:
    """One of issue 15's speed goals, for one path."""

    text: str
    #: which figures, and to which reference path (None: the figure itself)
    keys: tuple[str, ...]
    reference: str | None
    #: compares the worst of the path's figures (or ratios) with ``bound``
    meets: Callable[[float, float], bool]
    #: None: the number of parallel connections
    bound: float | None
    paths: tuple[str, ...] = TCP_TRANSPORTS


GOALS = [
    Goal("bulk, 1 and 8 conns, up and down >= 1.0x socat", tuple(BULK), "socat", operator.ge, 1.0),
    Goal("bulk, 1 and 8 conns, up and down >= 2x ssh -L", tuple(BULK), "ssh", operator.ge, 2.0),
    Goal("RTT p50 <= 2x socat", ("rtt_p50_seconds",), "socat", operator.le, 2.0),
    Goal("connection setup >= 1.0x socat", ("setup_per_second",), "socat", operator.ge, 1.0),
    Goal("all parallel connections complete", ("parallel_completed",), None, operator.ge, None),
    Goal(
        "<= 16 KiB per idle connection (KiB)",
        ("idle_bytes_per_connection",),
        None,
        operator.le,
        16 * 1024,
    ),
    Goal("CPU per GiB <= 3x socat", ("cpu_seconds_per_gib",), "socat", operator.le, 3.0),
    Goal(
        "QUIC bulk >= 0.5x gRPC, 1,500-byte MTU",
        tuple(BULK),
        "mtu1500-cloudbridge-grpc",
        operator.ge,
        0.5,
        paths=("mtu1500-cloudbridge-quic",),
    ),
    Goal(
        "peer tunnel bulk >= 1.0x relayed TLS, 1,500-byte MTU",
        tuple(BULK),
        "mtu1500-cloudbridge-tls",
        operator.ge,
        1.0,
        paths=("mtu1500-peer",),
    ),
    Goal(
        "peer tunnel over DERP bulk >= 0.5x relayed TLS",
        tuple(BULK),
        "cloudbridge-tls",
        operator.ge,
        0.5,
        paths=("peer-derp",),
    ),
    Goal(
        "UDP-only peer tunnel bulk >= 1.0x the QUIC engine, 1,500-byte MTU",
        tuple(BULK),
        "mtu1500-quic-engine",
        operator.ge,
        1.0,
        paths=("mtu1500-peer-udp",),
    ),
    Goal(
        "bulk >= 1.5x wstunnel",
        tuple(BULK),
        "wstunnel",
        operator.ge,
        1.5,
        paths=("cloudbridge-websocket",),
    ),
    Goal(
        "bulk >= 1.5x wstunnel over TLS (both encrypt)",
        tuple(BULK),
        "wstunnel-tls",
        operator.ge,
        1.5,
        paths=("cloudbridge-websocket",),
    ),
]


def ratios(results: dict[str, Figures], reference: str, keys: list[str]) -> dict[str, Figures]:
    """Each path's figures divided by ``reference``'s, for the comparable ``keys`` both have."""
    base = results.get(reference)
    if base is None:
        return {}
    table: dict[str, Figures] = {}
    for name, figures in results.items():
        if name == reference:
            continue
        row = {
            key: figures[key] / base[key]
            for key in keys
            if BY_KEY[key].comparable and key in figures and base.get(key)
        }
        if row:
            table[name] = row
    return table


def goals(results: dict[str, Figures], parallel: int) -> list[dict[str, Any]]:
    """Issue 15's goals for each path they apply to that was measured: the worst figure
    (or ratio) and whether it meets the goal; a goal whose reference is missing is left out."""
    checked = []
    for goal in GOALS:
        for path in goal.paths:
            figures = results.get(path)
            if figures is None or not all(key in figures for key in goal.keys):
                continue
            if goal.reference is None:
                values = [figures[key] for key in goal.keys]
            else:
                base = results.get(goal.reference)
                if base is None or not all(base.get(key) for key in goal.keys):
                    continue
                values = [figures[key] / base[key] for key in goal.keys]
            bound = parallel if goal.bound is None else goal.bound
            higher = goal.meets is operator.ge
            worst = min(values) if higher else max(values)
            checked.append(
                {
                    "goal": goal.text,
                    "path": path,
                    "value": worst,
                    "bound": bound,
                    "met": goal.meets(worst, bound),
                }
            )
    return checked


def table(rows: list[list[str]]) -> str:
    """Rows as aligned columns: the first left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def _short(name: str) -> str:
    return name.removeprefix(MTU).removeprefix("cloudbridge-")


def _ratio_table(compared: dict[str, Figures], keys: list[str], parallel: int) -> str:
    names = list(compared)
    rows = [["", *map(_short, names)]]
    for key in keys:
        if any(key in row for row in compared.values()):
            cells = [f"{compared[n][key]:.2f}x" if key in compared[n] else "-" for n in names]
            rows.append([BY_KEY[key].name.format(parallel=parallel), *cells])
    return table(rows)


def _goal_value(check: dict[str, Any]) -> str:
    if check["goal"].startswith("all parallel"):
        return f"{check['value']:.0f}/{check['bound']:.0f}"
    if "KiB" in check["goal"]:
        return f"{check['value'] / 1024:.1f}"
    return f"{check['value']:.2f}x"


#: the ratio tables of a group of paths: reference, the paths compared, title, figures
COMPARISONS: list[tuple[str, tuple[str, ...] | None, str, list[str] | None]] = [
    ("socat", None, "Ratio to socat", None),
    ("ssh", None, "Ratio to ssh -L (bulk)", [*BULK, "parallel_bytes_per_second"]),
    ("wstunnel", ("cloudbridge-websocket",), "WebSocket transport to wstunnel", None),
    (
        "wstunnel-tls",
        ("cloudbridge-websocket",),
        "WebSocket transport to wstunnel over TLS",
        None,
    ),
    ("cloudbridge-grpc", ("cloudbridge-quic",), "QUIC transport to gRPC", None),
    ("cloudbridge-tls", ("peer",), "Peer tunnel (direct path) to the relayed TLS tunnel", None),
    ("cloudbridge-tls", ("peer-derp",), "Peer tunnel over DERP to the relayed TLS tunnel", None),
    (
        "quic-engine",
        ("peer-udp",),
        "UDP-only peer tunnel to the QUIC engine alone (same datagram size)",
        None,
    ),
]


def _grouped(results: dict[str, Figures]) -> list[tuple[str, str, dict[str, Figures]]]:
    """Each group's key, title and paths (named without the group's prefix)."""
    found = []
    for prefix, key, title in GROUPS:
        members = {
            name.removeprefix(prefix): figures
            for name, figures in results.items()
            if name.startswith(prefix) and (prefix or not name.startswith(MTU))
        }
        if members:
            found.append((key, title, members))
    return found


def _comparisons(group: dict[str, Figures]) -> list[tuple[str, str, list[str], dict[str, Figures]]]:
    """Each ratio table that the group's paths allow: reference, title, figures, table."""
    present = [m.key for m in METRICS if any(m.key in figures for figures in group.values())]
    tables = []
    for reference, compared, title, keys in COMPARISONS:
        members = (
            group
            if compared is None
            else {n: f for n, f in group.items() if n in (reference, *compared)}
        )
        shown = present if keys is None else keys
        table = ratios(members, reference, shown)
        if table:
            tables.append((reference, title, shown, table))
    return tables


def render(
    results: dict[str, Figures],
    skipped: dict[str, str],
    errors: dict[str, list[str]],
    parallel: int,
) -> str:
    """The report as text: figures and ratio tables per group of paths, then the goals
    (rates: higher is better; RTT, memory and CPU: lower is better)."""
    parts: list[str] = [] if results else ["no path was measured"]
    for _, title, group in _grouped(results):
        names = list(group)
        rows = [["", *map(_short, names)]]
        for metric in METRICS:
            if any(metric.key in figures for figures in group.values()):
                cells = [
                    metric.show(group[n][metric.key]).format(parallel=parallel)
                    if metric.key in group[n]
                    else "-"
                    for n in names
                ]
                rows.append([metric.label(parallel), *cells])
        if parts:
            parts.append("")
        parts += [f"Figures, {title}", table(rows)]
        for _, heading, keys, compared in _comparisons(group):
            parts += ["", heading, _ratio_table(compared, keys, parallel)]
    checked = goals(results, parallel)
    if checked:
        rows = [["issue 15 goal", "path", "worst", "met"]]
        rows += [
            [c["goal"], _short(c["path"]), _goal_value(c), "yes" if c["met"] else "NO"]
            for c in checked
        ]
        parts += ["", "Goals (issue 15)", table(rows)]
    if skipped or errors:
        parts.append("")
    parts += [f"skipped {name}: {reason}" for name, reason in skipped.items()]
    parts += [
        f"{name}: {len(found)} failure(s), the first: {found[0]}" for name, found in errors.items()
    ]
    return "\n".join(parts)


def document(
    results: dict[str, Figures],
    skipped: dict[str, str],
    errors: dict[str, list[str]],
    settings: dict[str, Any],
    context: dict[str, Any],
) -> dict[str, Any]:
    """Everything the run measured, for ``--json``: ratios by group (loopback, mtu1500),
    then by reference path, then by path."""
    return {
        **context,
        "settings": settings,
        "paths": results,
        "skipped": skipped,
        "errors": errors,
        "ratios": {
            key: {reference: table for reference, _, _, table in _comparisons(group)}
            for key, _, group in _grouped(results)
        },
        "goals": goals(results, settings["parallel"]),
    }
