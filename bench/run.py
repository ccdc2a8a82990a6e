"""CloudBridge's benchmark: tunnels against direct TCP, socat, ssh -L and wstunnel, in one run.

Paths, each from a local port to a target (target.py: a sink, a source and an echo in its
own process). On loopback (part "references", then part "relayed"):

    direct          the target itself (how far the bench's clients and target go)
    socat           socat TCP-LISTEN,fork -> TCP
    ssh             ssh -L through a throwaway sshd on loopback (default cipher)
    wstunnel        wstunnel (npm) server and client, a TCP forward over WebSocket
    wstunnel-tls    the same over TLS (wss://), its server behind socat's OpenSSL, as
                    wstunnel's server is run behind a TLS terminator
    cloudbridge-T   `cloudbridge tunnel` over transport T (quic, grpc, websocket, tls: those
                    installed) through a relay (`relay serve --dev`), both on loopback
    peer-derp       a peer tunnel (`tunnel --remote-peer`, relay-only) to a peer on loopback
                    (`cloudbridge p2p`) exposing the target, through the same relay: the
                    DERP path, on the byte stream the relay splices

Across a 1,500-byte MTU link (part "mtu1500": a network namespace joined by a veth pair
holds a second target and relay; needs root and iproute2):

    mtu1500-socat           socat here -> the target there
    mtu1500-cloudbridge-T   a tunnel here over transport T through the relay there
    mtu1500-quic-engine     the QUIC engine alone (quic_engine.py: aioquic with the peer
                            session's datagram size and windows, a bare client here and
                            server there): bulk on 1 and 8 streams, CPU per GiB
    mtu1500-peer            a peer tunnel (`tunnel --remote-peer`, p2p-only) here to a peer
                            there (`cloudbridge p2p`) exposing the target, on the direct path
    mtu1500-peer-udp        the same with TCP across the link blocked (nftables): the peer
                            QUIC session on ICE's direct path

Figures per path: bulk upload and download on 1 and on 8 connections; N parallel bulk
connections (half up, half down; how many completed, and the aggregate rate); 64-byte
request/response round trips (p50, p99); sequential connection setups per second; memory
per idle connection (PSS of the forwarder's processes with N idle connections open, less
before, divided by N); CPU seconds per GiB (user+sys of the forwarder's processes over the
1- and 8-connection bulk runs, divided by the GiB they moved). Then ratio tables per group
(loopback, mtu1500): to socat, to ssh -L (bulk), the WebSocket transport to wstunnel, QUIC
to gRPC, the peer tunnel to the relayed TLS tunnel (on the direct path, or over DERP on
loopback), on a UDP-only path to the QUIC engine;
and issue 15's goals, met or not. Then the floods of floods.py (part "floods"): what a
hostile stranger or tenant costs a bystander. docs/performance.md says how each figure is
taken. Then part "recovery" (recovery.py): --clients clients on one relay, killed and
restarted, and black-holed sessions, against issue 16's bounds. Then part "cluster"
(cluster.py): --sessions idle sessions (tls) over three relays on one Redis, and each
relay's RSS per idle session, heartbeat CPU per 1,000 sessions and setups a second (issue
19; its figures go to FILE with .cluster.json for a suffix under --json). Then part "peers"
(peers.py): two peers behind two NATs (network namespaces, nftables, coturn; needs root,
conntrack and turnserver), their direct path broken three ways (all UDP lost mid-transfer,
both NATs' mappings forgotten, the laptop's public address changed), each once, against
issue 16's bounds for the peers' path. Last, part "overlay" (overlay.py, on the bed of
tests/test_overlay.py; needs root, nftables, wireguard-go, wg and iperf3): iperf3 between
the two hosts over raw wireguard-go configured by hand, over the overlay on its direct (stun)
path and over DERP, and through a relayed tunnel, with the ratios to raw wireguard-go and
issue 17's goal (its figures go to FILE with .overlay.json for a suffix under --json).

    ./dev bench                              everything (about 16 minutes on 2 cores)
    ./dev bench --only socat,ssh,tls         some paths, or parts: references, relayed,
                                             mtu1500, floods, recovery, cluster, peers,
                                             overlay
    ./dev bench --quick --only direct,tls    a smoke run: small sizes, a few seconds a path
    ./dev bench --repeat 3 --json out.json   the median of 3 rounds, every figure in a file

Options: --megabytes (what each bulk run moves: on 1 connection, or shared by 8 or by the
parallel ones), --parallel, --round-trips, --setups, --idle, --timeout (a bulk run's
bound; the parallel run's is at least 3x the path's own 8-connection time), --repeat,
--flood-seconds, --clients (recovery), --sessions (cluster), --json FILE. Tables go to stdout,
progress to stderr. ./dev bench installs the reference tools when missing (socat,
openssh-server and -client, and nftables for the UDP-only peer path, with apt; wstunnel
with `npm ci --prefix bench/wstunnel`); a path that cannot run is skipped with the reason,
one that fails says how. Not part of the tests (a smoke run is: tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import load
import paths
import report
from procs import Unavailable, cpu_seconds, free_port, pss_bytes, started
from report import BULK, MTU, Figures

MIB = 1 << 20
GIB = 1 << 30
TARGET = [sys.executable, str(Path(__file__).with_name("target.py"))]
REFERENCES = ["direct", "socat", "ssh", "wstunnel", "wstunnel-tls"]
PARTS = {
    "references": REFERENCES,
    "relayed": [*(f"cloudbridge-{t}" for t in paths.TRANSPORTS), "peer-derp"],
    # the far end (relay and target) in a namespace behind a 1,500-byte MTU link
    # and a peer tunnel (tunnel --remote-peer) on the direct path across the same link
    "mtu1500": [
        f"{MTU}socat",
        *(f"{MTU}cloudbridge-{t}" for t in paths.TRANSPORTS),
        f"{MTU}peer",
        f"{MTU}quic-engine",
        f"{MTU}peer-udp",
    ],
}
#: parts run by themselves, not paths: not in --quick
PROCESS_PARTS = ["floods", "recovery", "cluster", "peers", "overlay"]


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settle(pids: list[int], limit: float = 5.0) -> None:
    """Wait until the forwarder is idle (closing many connections leaves it busy for a while),
    so that the CPU measured next is the next run's alone."""
    deadline = time.monotonic() + limit
    previous = cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = cpu_seconds(pids)
        if now - previous < 0.01:
            return
        previous = now


def measure(forwarder: paths.Forwarder, args: argparse.Namespace, errors: list[str]) -> Figures:
    name, port, pids = forwarder.name, forwarder.port, forwarder.pids
    figures: Figures = {}
    note(f"{name}: round trips")
    p50, p99 = load.round_trips(port, args.round_trips, args.timeout)
    figures["rtt_p50_seconds"], figures["rtt_p99_seconds"] = p50, p99
    note(f"{name}: connection setup")
    figures["setup_per_second"] = load.setup_rate(port, args.setups, args.timeout)
    if pids:
        note(f"{name}: {args.idle} idle connections")
        before = pss_bytes(pids)
        try:
            held = load.open_idle(port, args.idle, args.timeout)
        except OSError as error:
            # a path that holds fewer connections still has its other figures
            errors.append(f"idle: {error}")
        else:
            figures["idle_bytes_per_connection"] = (pss_bytes(pids) - before) / args.idle
            load.close_all(held)
        settle(pids)
    size = args.megabytes * MIB
    cpu_before, moved = cpu_seconds(pids), 0
    for connections in (1, 8):
        for direction in ("up", "down"):
            note(f"{name}: bulk {direction}, {connections} connection(s)")
            run = load.transfers(port, [direction] * connections, size // connections, args.timeout)
            errors += run.errors
            figures[f"bulk_{direction}_{connections}_bytes_per_second"] = run.rate
            moved += run.moved
    if pids and moved:
        figures["cpu_seconds_per_gib"] = (cpu_seconds(pids) - cpu_before) / (moved / GIB)
    note(f"{name}: bulk, {args.parallel} connections")
    # as many bytes as each run above, and time for three times what the path's own
    # 8-connection rate needs: a connection that does not complete then stalled
    slowest = min(figures["bulk_up_8_bytes_per_second"], figures["bulk_down_8_bytes_per_second"])
    bound = max(args.timeout, 3 * size / slowest) if slowest else args.timeout
    directions = ["up", "down"] * (args.parallel // 2)
    run = load.transfers(port, directions, max(1, size // len(directions)), bound)
    errors += run.errors
    figures["parallel_bytes_per_second"] = run.rate
    figures["parallel_completed"] = run.completed
    return figures


def measure_engine(engine: paths.Engine, args: argparse.Namespace) -> Figures:
    """The QUIC engine's bulk figures (one connection: 1 stream, then 8 sharing it) and its
    CPU per GiB (the server's, read here, and the client's, as it reports it)."""
    note(f"{engine.name}: bulk up and down, 1 and 8 streams")
    before = cpu_seconds(engine.pids)
    run = subprocess.run(
        engine.client(args.megabytes, args.timeout),
        capture_output=True,
        text=True,
        timeout=len(BULK) * args.timeout + 30,
        check=False,
    )
    if run.returncode != 0:
        raise RuntimeError(f"the engine's client failed: {run.stderr.strip()[-500:]}")
    found = json.loads(run.stdout)
    figures: Figures = {key: found[key] for key in BULK}
    cpu = cpu_seconds(engine.pids) - before + found["client_cpu_seconds"]
    figures["cpu_seconds_per_gib"] = cpu / (found["moved_bytes"] / GIB)
    return figures


def selected(only: str | None, quick: bool) -> list[str]:
    every = [*REFERENCES, *PARTS["relayed"], *PARTS["mtu1500"], *PROCESS_PARTS]
    if only is None:
        return [name for name in every if not (quick and name in PROCESS_PARTS)]
    wanted: list[str] = []
    for word in (part.strip() for part in only.split(",")):
        names = PARTS.get(word) or [
            name for name in every if word in (name, name.replace("cloudbridge-", ""))
        ]
        if not names:
            valid = ", ".join([*PARTS, *(n.replace("cloudbridge-", "") for n in every)])
            raise ValueError(f"no path or part {word!r} (installed: {valid})")
        wanted += [name for name in names if name not in wanted]
    return [name for name in every if name in wanted]


REFERENCE_PATHS: dict[str, Callable[[int], AbstractContextManager[paths.Forwarder]]] = {
    "direct": paths.direct,
    "socat": paths.socat,
    "ssh": paths.ssh,
    "wstunnel": paths.wstunnel,
    "wstunnel-tls": paths.wstunnel_tls,
}


class Bed:
    """The targets, relays and namespace the paths share, each started when first needed
    and kept for every round."""

    def __init__(self, stack: ExitStack, args: argparse.Namespace) -> None:
        self.stack = stack
        # the client holds every connection of the idle set or the parallel run at once
        self.connections = max(args.idle, args.parallel) + 64
        self.target = free_port()
        stack.enter_context(started([*TARGET, str(self.target)], "ready"))
        self._relay: paths.Relay | None = None
        self._far: tuple[paths.Namespace, int, paths.Relay | None] | None = None

    def start(self, name: str) -> AbstractContextManager[paths.Forwarder | paths.Engine]:
        if name.startswith(MTU):
            return self._start_far(name.removeprefix(MTU))
        if name in REFERENCE_PATHS:
            return REFERENCE_PATHS[name](self.target)
        if self._relay is None:
            self._relay = self.stack.enter_context(paths.relay())
        if name == "peer-derp":
            return paths.derp_peer(self._relay, self.target, self.connections)
        transport = name.removeprefix("cloudbridge-")
        return paths.cloudbridge(self._relay, transport, self.target, self.connections)

    def _start_far(self, name: str) -> AbstractContextManager[paths.Forwarder | paths.Engine]:
        if self._far is None:
            space = self.stack.enter_context(paths.namespace(mtu=1500))
            target = free_port()
            # on every address there: the relay reaches it on loopback, socat over the link
            command = space.command([*TARGET, str(target), "0.0.0.0"])  # noqa: S104
            self.stack.enter_context(started(command, "ready"))
            self._far = (space, target, None)
        space, target, relay = self._far
        if name == "socat":
            return paths.socat(target, host=space.address)
        if name == "quic-engine":
            return paths.quic_engine(space)
        if relay is None:
            relay = self.stack.enter_context(paths.relay(space))
            self._far = (space, target, relay)
        if name == "peer":
            return paths.peer(relay, space, target, self.connections)
        if name == "peer-udp":
            return paths.udp_peer(relay, space, target, self.connections)
        transport = name.removeprefix("cloudbridge-")
        return paths.cloudbridge(relay, transport, target, self.connections)


def run_paths(
    names: list[str], args: argparse.Namespace
) -> tuple[dict[str, Figures], dict[str, str], dict[str, list[str]]]:
    rounds: dict[str, list[Figures]] = {}
    skipped: dict[str, str] = {}
    errors: dict[str, list[str]] = {}
    with ExitStack() as stack:
        bed = Bed(stack, args)
        for round_number in range(args.repeat):
            if args.repeat > 1:
                note(f"round {round_number + 1} of {args.repeat}")
            for name in names:
                if name in skipped:
                    continue
                try:
                    with bed.start(name) as forwarder:
                        forwarder.name = name
                        figures = (
                            measure_engine(forwarder, args)
                            if isinstance(forwarder, paths.Engine)
                            else measure(forwarder, args, errors.setdefault(name, []))
                        )
                except Unavailable as reason:
                    skipped[name] = str(reason)
                except (OSError, RuntimeError) as error:
                    # a tunnel that does not start or a connection that breaks: the other
                    # paths are still worth measuring
                    skipped[name] = f"failed: {type(error).__name__}: {error}"
                else:
                    rounds.setdefault(name, []).append(figures)
                    continue
                note(f"{name}: skipped: {skipped[name]}")
    results = {name: _median(figures) for name, figures in rounds.items()}
    return results, skipped, {name: found for name, found in errors.items() if found}


def _median(rounds: list[Figures]) -> Figures:
    # completions: the worst round, so that one timed-out round is not hidden
    return {
        key: min(r[key] for r in rounds)
        if key == "parallel_completed"
        else statistics.median(r[key] for r in rounds)
        for key in rounds[0]
    }


def check_target(results: dict[str, Figures]) -> None:
    """Warn when the bench's own clients and target may be what limits the forwarders."""
    direct = results.get("direct")
    others = [figures for name, figures in results.items() if name != "direct"]
    if direct is None or not others:
        return
    for key in BULK:
        fastest = max(figures.get(key, 0.0) for figures in others)
        if fastest and direct[key] < 3 * fastest:
            note(
                f"warning: direct TCP {key} is only {direct[key] / fastest:.1f}x the fastest "
                "forwarder: the target or the bench's clients may limit the figures"
            )


def context() -> dict[str, Any]:
    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command],
            check=False,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
    }


def main() -> None:
    # thousands of idle connections need more descriptors than the usual 1024 (children inherit it)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="comma-separated paths or parts (default: all)")
    parser.add_argument("--quick", action="store_true", help="a smoke run with small sizes")
    parser.add_argument("--megabytes", type=int, help="MiB per 1-connection bulk run (128)")
    parser.add_argument("--parallel", type=int, help="connections of the parallel run (64)")
    parser.add_argument("--round-trips", type=int, help="64-byte round trips (2000)")
    parser.add_argument("--setups", type=int, help="connections for the setup rate (300)")
    parser.add_argument("--idle", type=int, help="idle connections for the memory figure (1000)")
    parser.add_argument("--timeout", type=float, default=60.0, help="bound of a bulk run (60 s)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; figures are medians")
    parser.add_argument("--flood-seconds", type=float, default=5.0, help="length of each flood")
    parser.add_argument("--clients", type=int, help="client links of the recovery runs (1000)")
    parser.add_argument("--sessions", type=int, default=10_000, help="idle sessions (cluster)")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args()
    defaults = (
        {"megabytes": 16, "parallel": 8, "round_trips": 100, "setups": 20, "idle": 20}
        | {"clients": 50}
        if args.quick
        else {"megabytes": 128, "parallel": 64, "round_trips": 2000, "setups": 300, "idle": 1000}
        | {"clients": 1000}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        names = selected(args.only, args.quick)
    except ValueError as error:
        parser.error(f"--only: {error}")
    path_names = [name for name in names if name not in PROCESS_PARTS]
    if path_names:
        results, skipped, errors = run_paths(path_names, args)
        check_target(results)
        print(report.render(results, skipped, errors, args.parallel), flush=True)
        if args.json:
            settings = {k: v for k, v in vars(args).items() if k != "json"}
            document = report.document(results, skipped, errors, settings, context())
            args.json.write_text(json.dumps(document, indent=2) + "\n")
    run_process_parts(names, args)


def run_process_parts(names: list[str], args: argparse.Namespace) -> None:
    if "floods" in names:
        from floods import run_floods  # noqa: PLC0415 - aioquic and the core: only for floods

        asyncio.run(run_floods(args.flood_seconds))
    if "recovery" in names:
        # a process of its own: a thousand client links want the descriptors and the loop
        recovery = [sys.executable, str(Path(__file__).with_name("recovery.py"))]
        subprocess.run([*recovery, "--clients", str(args.clients)], check=True)
    if "cluster" in names and shutil.which("redis-server") is None:
        print("bench: part cluster skipped: redis-server is not installed", file=sys.stderr)
    elif "cluster" in names:
        # thousands of sessions in load generators of their own, and three relays
        cluster = [sys.executable, str(Path(__file__).with_name("cluster.py"))]
        cluster += ["--sessions", str(args.sessions)]
        if args.json:
            cluster += ["--json", str(args.json.with_suffix(".cluster.json"))]
        subprocess.run(cluster, check=True)
    if "peers" in names:
        # network namespaces and a minute of watching: a process of its own, as recovery
        subprocess.run([sys.executable, str(Path(__file__).with_name("peers.py"))], check=True)
    if "overlay" in names:
        # iperf3 over the overlay against raw wireguard-go (issue 17): namespaces, a process
        overlay = [sys.executable, str(Path(__file__).with_name("overlay.py"))]
        if args.json:
            overlay += ["--json", str(args.json.with_suffix(".overlay.json"))]
        subprocess.run(overlay, check=True)


if __name__ == "__main__":
    main()
