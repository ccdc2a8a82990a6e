"""Scale of a relay cluster (issue 19): idle authenticated sessions held by three relays.

    .venv/bin/python bench/cluster.py [--sessions 10000] [--generators 3] [--idle 30]
                                      [--heartbeat 30] [--timeout 900] [--json FILE]

A real redis-server and three ``cloudbridge relay serve --dev`` processes on it (the bed of
tests/cluster_bed.py: relay N on 127.0.0.N, backend redis), with the per-address, per-tenant
and admission caps raised (every session comes from 127.0.0.1 here, and the bench opens them
as fast as it can). Load generators (processes of this script, ``--generators`` of them, each
bound to one relay) hold the sessions as RelayLinks (recovery.py's fleet) on the ``tls``
transport, the cheapest one; the sessions are spread evenly over the relays. One generator a
relay by default: a generator holds about 90 KiB a session (10,000 in one would be about
1 GB, its handshakes on one core); six ramped about as fast as three (2 cores are the limit).

Figures per relay: session setups per second while all three ramp at once (sessions over the
time from the first generator's start to the last one's end, for that relay: on this
machine the generators' and relays' TLS handshakes share its cores); RSS per idle session
(VmRSS once every session is idle, less before the load, divided by the sessions held);
heartbeat CPU per 1,000 sessions (user+sys over ``--idle`` seconds, less the relay's own CPU
without sessions, as a share of one core; clients ping every ``--heartbeat`` seconds, the
relay's default interval being 30 s); and the sessions each relay holds at the end (its
``cloudbridge_relay_sessions`` gauge). Issue 19's goal: RSS per idle session <= 100 KiB.
Table to stdout, progress to stderr; every process ends with the run, Ctrl-C and
``--timeout`` included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop
from cloudbridge_core.config import load_config, merged_schema
from cloudbridge_core.log import configure_logging
from cloudbridge_core.plugins import load_plugins
from procs import cpu_seconds, rss_bytes
from recovery import RELAY_ENV, fleet, sessions_at
from report import table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' bed
from cluster_bed import PLUGINS_OFF, ClusterBed, cluster_bed

RELAYS = 3
KIB = 1024
GOAL_KIB_PER_SESSION = 100
#: the relays' own idle CPU (presence refreshes, the Redis link) is measured this long first
#: (or as long as the idle window, when that is shorter)
BASELINE_SECONDS = 10.0
#: after the relays start, and once the last session is open: the relays finish what their
#: start or the ramp left them before anything is measured
SETTLE_SECONDS = 5.0
_ENV_PREFIX = "CLOUDBRIDGE_SERVER__"


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def server_settings() -> dict[str, Any]:
    """recovery.py's raised relay caps as ``server`` settings (each relay listens on its own
    address here), and an admission rate the ramp never reaches: it is what is measured."""
    settings: dict[str, Any] = {"admission": {"rate": 1_000_000, "burst": 1_000_000}}
    for name, value in RELAY_ENV.items():
        if not name.startswith(_ENV_PREFIX) or name.endswith("__LISTEN"):
            continue
        *parents, leaf = name.removeprefix(_ENV_PREFIX).lower().split("__")
        section = settings
        for parent in parents:
            section = section.setdefault(parent, {})
        section[leaf] = int(value)
    return settings


# ---- a load generator: one process, its sessions on one relay ----


async def generate(config_path: Path, count: int, heartbeat: float) -> None:
    """Open ``count`` sessions, say when (one JSON line on stdout), and hold them until
    stdin closes or the process is stopped."""
    plugins = load_plugins()
    overrides = {
        "transport.mode": ("tls", "bench"),
        "transport.health_check_interval": (f"{heartbeat:g}s", "bench"),
    }
    schema = merged_schema(plugins.config_sections())
    config = load_config(config_path, environ={}, overrides=overrides, schema=schema)
    started = time.time()
    async with fleet(config, plugins, count) as clients:
        opened = {"opened": len(clients.links), "started": started, "finished": time.time()}
        print(json.dumps(opened), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# ---- the run ----


class Generators:
    """The generator processes, their share of the sessions, and what each reported."""

    def __init__(self, bed: ClusterBed, token: str, args: argparse.Namespace) -> None:
        self.processes: list[tuple[int, subprocess.Popen[str]]] = []
        configs = {i: bed.client_config(f"load{i}", token, [i]) for i in range(1, RELAYS + 1)}
        shares = _split(args.sessions, args.generators)
        env = {**os.environ, "CLOUDBRIDGE_DISABLE_PLUGINS": PLUGINS_OFF}
        for number, share in enumerate(shares):
            relay = number % RELAYS + 1
            command = [sys.executable, __file__, "--generate", str(configs[relay])]
            command += ["--sessions", str(share), "--heartbeat", str(args.heartbeat)]
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
            self.processes.append((relay, process))

    def opened(self) -> dict[int, list[dict[str, float]]]:
        """What each generator reported once its sessions were open, by relay."""
        found: dict[int, list[dict[str, float]]] = {}
        for relay, process in self.processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"a generator for relay {relay} exited with {process.wait()}")
            found.setdefault(relay, []).append(json.loads(line))
        return found

    def pids(self) -> list[int]:
        return [process.pid for _, process in self.processes]

    def close(self) -> None:
        """Stop every generator at once, one still opening its sessions too (the relays are
        stopped next: the sessions need no goodbye)."""
        for _, process in self.processes:
            process.terminate()
        for _, process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """The whole run within ``seconds``, and SIGTERM ending it as Ctrl-C does: the context
    managers around it stop every process either way."""

    def expire(_signal: int, _frame: FrameType | None) -> None:
        raise TimeoutError(f"the run took more than {seconds:g} s")

    def terminate(_signal: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, expire), signal.signal(signal.SIGTERM, terminate)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def measure(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    with cluster_bed(home, relays=RELAYS, **server_settings()) as bed:
        relays = {index: bed.relays[index].pid for index in bed.relays}
        token = bed.token("bench", "bench", "relay:connect")
        window = min(BASELINE_SECONDS, args.idle)
        note(f"cluster: relays' idle CPU without sessions ({window:g} s)")
        time.sleep(SETTLE_SECONDS)
        rss_before = {index: rss_bytes([pid]) for index, pid in relays.items()}
        cpu_before = {index: cpu_seconds([pid]) for index, pid in relays.items()}
        time.sleep(window)
        baseline = {
            index: (cpu_seconds([pid]) - cpu_before[index]) / window
            for index, pid in relays.items()
        }
        note(f"cluster: {args.sessions} sessions over {args.generators} generator(s)")
        generators = Generators(bed, token, args)
        try:
            opened = generators.opened()
            note(f"cluster: all open; settling {SETTLE_SECONDS:g} s, then {args.idle:g} s idle")
            time.sleep(SETTLE_SECONDS)
            rss_after = {index: rss_bytes([pid]) for index, pid in relays.items()}
            generator_rss = rss_bytes(generators.pids())
            cpu_start = {index: cpu_seconds([pid]) for index, pid in relays.items()}
            time.sleep(args.idle)
            cpu_end = {index: cpu_seconds([pid]) for index, pid in relays.items()}
            held = {index: sessions_at(bed.metrics_port(index)) for index in relays}
        finally:
            generators.close()
    figures: dict[str, Any] = {"sessions": args.sessions, "relays": {}}
    for index in relays:
        reports = opened[index]
        ramp = max(r["finished"] for r in reports) - min(r["started"] for r in reports)
        sessions = sum(r["opened"] for r in reports)
        busy = (cpu_end[index] - cpu_start[index]) / args.idle - baseline[index]
        figures["relays"][f"r{index}"] = {
            "sessions_held": held[index],
            "setups_per_second": sessions / ramp,
            "rss_before_bytes": rss_before[index],
            "rss_idle_bytes": rss_after[index],
            "rss_per_session_bytes": (rss_after[index] - rss_before[index]) / max(held[index], 1),
            "idle_cpu_share": busy,
            "idle_cpu_share_per_1000": busy / max(held[index], 1) * 1000,
            "baseline_cpu_share": baseline[index],
        }
    every = figures["relays"].values()
    held_total = sum(r["sessions_held"] for r in every)
    figures["sessions_held"] = held_total
    figures["rss_per_session_bytes"] = sum(
        r["rss_idle_bytes"] - r["rss_before_bytes"] for r in every
    ) / max(held_total, 1)
    figures["idle_cpu_share_per_1000"] = sum(r["idle_cpu_share"] for r in every) / max(
        held_total / 1000, 1e-9
    )
    figures["generator_rss_per_session_bytes"] = generator_rss / args.sessions
    figures["settings"] = {"idle_seconds": args.idle, "heartbeat_seconds": args.heartbeat}
    figures["settings"] |= {"generators": args.generators, "transport": "tls"}
    return figures


def report(figures: dict[str, Any]) -> str:
    rows = [["relay", "held", "setups/s", "RSS before (MiB)", "RSS idle (MiB)", "KiB/session"]]
    rows[0].append("CPU/1k sessions (% core)")
    for name, relay in figures["relays"].items():
        rows.append(
            [
                name,
                f"{relay['sessions_held']:.0f}",
                f"{relay['setups_per_second']:.0f}",
                f"{relay['rss_before_bytes'] / KIB / KIB:.1f}",
                f"{relay['rss_idle_bytes'] / KIB / KIB:.1f}",
                f"{relay['rss_per_session_bytes'] / KIB:.1f}",
                f"{relay['idle_cpu_share_per_1000']:.2%}",
            ]
        )
    rows.append(
        [
            "all",
            f"{figures['sessions_held']:.0f}",
            "",
            "",
            "",
            f"{figures['rss_per_session_bytes'] / KIB:.1f}",
            f"{figures['idle_cpu_share_per_1000']:.2%}",
        ]
    )
    lines = table(rows).split("\n")
    settings = figures["settings"]
    per_session = figures["rss_per_session_bytes"] / KIB
    lines += [
        "",
        f"tls transport; heartbeats every {settings['heartbeat_seconds']:g} s, CPU over "
        f"{settings['idle_seconds']:g} s idle less the relays' own without sessions; "
        f"generators: {figures['generator_rss_per_session_bytes'] / KIB:.0f} KiB a session",
        "",
        "Goals (issue 19)",
        f"RSS per idle session {per_session:.1f} KiB <= {GOAL_KIB_PER_SESSION} KiB  "
        + ("yes" if per_session <= GOAL_KIB_PER_SESSION else "NO"),
        f"sessions held {figures['sessions_held']:.0f} of {figures['sessions']}  "
        + ("yes" if figures["sessions_held"] == figures["sessions"] else "NO"),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--generators", type=int, default=RELAYS, help="load processes")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of the idle window")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="client ping interval")
    parser.add_argument("--timeout", type=float, default=900.0, help="bound of the whole run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket a session; inherited
    if args.generate is not None:
        configure_logging(level="error")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(generate(args.generate, args.sessions, args.heartbeat))
        return
    if args.generators % RELAYS:
        parser.error(f"--generators: as many for each relay (a multiple of {RELAYS})")
    if args.sessions < args.generators:
        parser.error("--sessions: at least one a generator")
    if shutil.which("redis-server") is None:
        sys.exit("cluster: redis-server is not installed (./dev bench installs it)")
    with bounded(args.timeout), tempfile.TemporaryDirectory(prefix="bench-cluster-") as home:
        figures = measure(args, Path(home))
    print(report(figures), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
