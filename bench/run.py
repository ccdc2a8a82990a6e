"""CloudBridge's benchmark: tunnels against direct TCP, socat, ssh -L and wstunnel, in one run.

Paths, each from a local port to the same target (target.py: a sink, a source and an echo
in its own process):

    direct          the target itself (how far the bench's clients and target go)
    socat           socat TCP-LISTEN,fork -> TCP
    ssh             ssh -L through a throwaway sshd on loopback (default cipher)
    wstunnel        wstunnel (npm) server and client, a TCP forward over WebSocket
    cloudbridge-T   `cloudbridge tunnel` over transport T (quic, grpc, websocket, tls: those
                    installed) through a relay (`relay serve --dev`), both on loopback

Figures per path: bulk upload and download on 1 and on 8 connections; N parallel bulk
connections (half up, half down; how many completed, and the aggregate rate); 64-byte
request/response round trips (p50, p99); sequential connection setups per second; memory
per idle connection (PSS of the forwarder's processes with N idle connections open, less
before, divided by N); CPU seconds per GiB (user+sys of the forwarder's processes over the
1- and 8-connection bulk runs, divided by the GiB they moved). Then ratio tables: to socat,
to ssh -L (bulk), the WebSocket transport to wstunnel, and issue 15's goals. Then the floods
of floods.py: what a hostile stranger or tenant costs a bystander.

    ./dev bench                              everything (about 3 minutes on 2 cores)
    ./dev bench --only socat,ssh,tls         some paths (or parts: references, relayed, floods)
    ./dev bench --quick --only direct,tls    a smoke run: small sizes, a few seconds a path
    ./dev bench --repeat 3 --json out.json   the median of 3 rounds, every figure in a file

Options: --megabytes (per 1-connection run; 8 connections move as much in total, each
parallel connection 1/16 of it), --parallel, --round-trips, --setups, --idle, --timeout
(a bulk run's bound), --repeat, --flood-seconds, --json FILE. Tables go to stdout,
progress to stderr. ./dev bench installs the reference tools when missing (socat,
openssh-server and -client with apt; wstunnel with `npm ci --prefix bench/wstunnel`); a
path whose tool is missing is skipped with the reason. Not part of the tests (a smoke
run is: tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
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
from report import BULK, Figures

MIB = 1 << 20
GIB = 1 << 30
REFERENCES = ["direct", "socat", "ssh", "wstunnel"]
PARTS = {
    "references": REFERENCES,
    "relayed": [f"cloudbridge-{t}" for t in paths.TRANSPORTS],
}


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
        held = load.open_idle(port, args.idle, args.timeout)
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
    if pids:
        figures["cpu_seconds_per_gib"] = (cpu_seconds(pids) - cpu_before) / (moved / GIB)
    note(f"{name}: bulk, {args.parallel} connections")
    run = load.transfers(
        port, ["up", "down"] * (args.parallel // 2), max(1, size // 16), args.timeout
    )
    errors += run.errors
    figures["parallel_bytes_per_second"] = run.rate
    figures["parallel_completed"] = run.completed
    return figures


def selected(only: str | None, quick: bool) -> list[str]:
    every = [*REFERENCES, *PARTS["relayed"], "floods"]
    if only is None:
        return [name for name in every if not (quick and name == "floods")]
    wanted: list[str] = []
    for word in (part.strip() for part in only.split(",")):
        names = PARTS.get(word) or [
            name for name in every if word in (name, name.removeprefix("cloudbridge-"))
        ]
        if not names:
            valid = ", ".join([*PARTS, *(n.removeprefix("cloudbridge-") for n in every)])
            raise SystemExit(f"--only: no path or part {word!r} (installed: {valid})")
        wanted += [name for name in names if name not in wanted]
    return [name for name in every if name in wanted]


REFERENCE_PATHS: dict[str, Callable[[int], AbstractContextManager[paths.Forwarder]]] = {
    "direct": paths.direct,
    "socat": paths.socat,
    "ssh": paths.ssh,
    "wstunnel": paths.wstunnel,
}


def run_paths(
    names: list[str], args: argparse.Namespace
) -> tuple[dict[str, Figures], dict[str, str], dict[str, list[str]]]:
    rounds: dict[str, list[Figures]] = {}
    skipped: dict[str, str] = {}
    errors: dict[str, list[str]] = {}
    target = free_port()
    with (
        ExitStack() as stack,
        started([sys.executable, str(Path(__file__).with_name("target.py")), str(target)], "ready"),
    ):
        relay: paths.Relay | None = None

        def start(name: str) -> AbstractContextManager[paths.Forwarder]:
            nonlocal relay
            if name in REFERENCE_PATHS:
                return REFERENCE_PATHS[name](target)
            if relay is None:
                # one relay for every transport and round, started with the first tunnel
                relay = stack.enter_context(paths.relay())
            transport = name.removeprefix("cloudbridge-")
            return paths.cloudbridge(relay, transport, target, max(args.idle, args.parallel) + 64)

        for round_number in range(args.repeat):
            if args.repeat > 1:
                note(f"round {round_number + 1} of {args.repeat}")
            for name in names:
                if name in skipped:
                    continue
                try:
                    with start(name) as forwarder:
                        figures = measure(forwarder, args, errors.setdefault(name, []))
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
    parser.add_argument("--timeout", type=float, default=60.0, help="bound of a bulk run (s)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; figures are medians")
    parser.add_argument("--flood-seconds", type=float, default=5.0, help="length of each flood")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args()
    defaults = (
        {"megabytes": 16, "parallel": 8, "round_trips": 100, "setups": 20, "idle": 20}
        if args.quick
        else {"megabytes": 128, "parallel": 64, "round_trips": 2000, "setups": 300, "idle": 1000}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = selected(args.only, args.quick)
    path_names = [name for name in names if name != "floods"]
    if path_names:
        results, skipped, errors = run_paths(path_names, args)
        check_target(results)
        print(report.render(results, skipped, args.parallel), flush=True)
        for name, found in errors.items():
            note(f"{name}: {len(found)} transfer(s) failed, first: {found[0]}")
        if args.json:
            settings = {k: v for k, v in vars(args).items() if k != "json"}
            document = report.document(results, skipped, errors, settings, context())
            args.json.write_text(json.dumps(document, indent=2) + "\n")
    if "floods" in names:
        from floods import run_floods  # noqa: PLC0415 - aioquic and the core: only for floods

        asyncio.run(run_floods(args.flood_seconds))


if __name__ == "__main__":
    main()
