"""The overlay against raw wireguard-go, over DERP and against a relayed tunnel (issue 17).

    .venv/bin/python bench/overlay.py [--seconds 5] [--rounds 2] [--no-reverse] [--json FILE]

On the bed of tests/test_overlay.py (tests/natbed.py: two hosts h1 and h2 behind two
port-preserving NATs, the relay on the "public" segment), iperf3 (Debian) from h1 to h2,
one stream, the same length each, in one run:

    raw wireguard-go   wireguard-go configured by hand (`wg set`, `ip addr`) in h1 and h2,
                       on addresses of its own (198.19.250.1 and .2, outside the overlay's
                       pool), each end's endpoint the other's router and the same port (the
                       NATs keep it), keepalives punching the hole; only iperf3 and ping
                       may enter it (nftables), or the mesh would take it for a path
    overlay (stun)     `cloudbridge p2p` with `overlay.enabled` in both hosts (default
                       settings otherwise), to the peer's overlay address once `status`
                       shows the stun (or direct) path
    overlay (derp)     the same with every UDP packet dropped by both routers, once `status`
                       shows derp; UDP passes again afterwards
    relayed tunnel     `cloudbridge tunnel --remote-host` from h1 through the relay to an
                       iperf3 server beside it (on the relay's address, let through its egress
                       policy by `server.egress.allow`)

Raw wireguard-go and the overlay on its direct path alternate, run after run, for --rounds
rounds (figures: medians), so that what else the machine does weighs on both alike; raw
wireguard-go is removed before DERP. Each runs h1 -> h2 ("up") and, unless --no-reverse,
h2 -> h1 ("down", iperf3 -R): Mbit/s received, iperf3's CPU at the sending end, and the CPU
of the path's own processes (wireguard-go, the cloudbridge clients and relay) as a share of
one core. Then the ratios to raw wireguard-go and issue 17's goal: the overlay carries at
least 70% of raw wireguard-go on the direct path; over DERP, measured and reported. Needs
root, iproute2, nftables, wireguard-go, wg and iperf3; skips, saying why, without them.
Tables to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from procs import children_of

# the bed and its helpers are the overlay tests' own (tests/natbed.py, tests/nat_mesh.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nat_mesh import BIN, Mesh, namespaces_work
from natbed import ROUTER, WAN, NatBed

GOAL = 0.70
IPERF_PORT = 5201
TUNNEL_PORT = 7400
#: raw wireguard-go: outside the overlay's pool (100.64.0.0/10) and the bed's LANs
RAW_ADDRESS = {1: "198.19.250.1", 2: "198.19.250.2"}
RAW_PORT = 51999
RAW_TABLE = "cbbench_raw"
MTU = 1420  # the overlay's default (overlay.mtu), and wireguard-go's
#: how long a path may take to come up, or to change (default heartbeats: a lost path is
#: noticed within heartbeat_interval + heartbeat_timeout, 40 s)
PATIENCE = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PATHS = {
    "raw": "raw wireguard-go",
    "stun": "overlay (stun)",
    "derp": "overlay (derp)",
    "tunnel": "relayed tunnel",
}


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def missing() -> str | None:
    """Why the bed cannot be built here, or None."""
    why = namespaces_work()
    if why:
        return why
    absent = [tool for tool in ("wireguard-go", "wg", "iperf3") if shutil.which(tool) is None]
    if absent:
        return f"{' and '.join(absent)} not installed (./dev bench installs them)"
    return None


def cpu_by_role(roles: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) of each role's process and its descendants; every
    wireguard-go among them counted under its own name."""
    found: dict[str, float] = {}
    for role, root in roles.items():
        for pid in children_of(root):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            seconds = sum(int(value) for value in fields[11:13]) / CLOCK_TICKS
            key = name if name == "wireguard-go" else role
            found[key] = found.get(key, 0.0) + seconds
    return found


def iperf(
    bed: NatBed, address: str, port: int, seconds: float, reverse: bool, roles: dict[str, int]
) -> dict[str, Any]:
    """One iperf3 run from h1 to ``address``:``port`` (the other way with ``reverse``)."""
    command = ["iperf3", "-c", address, "-p", str(port), "-t", f"{seconds:g}", "-J"]
    command += ["--connect-timeout", "5000", *(["-R"] if reverse else [])]
    before, started = cpu_by_role(roles), time.monotonic()
    done = subprocess.run(
        ["ip", "netns", "exec", bed.hosts[1], *command],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    elapsed = time.monotonic() - started
    try:
        found = json.loads(done.stdout)
    except json.JSONDecodeError as error:
        raise RuntimeError(f"iperf3 said: {(done.stdout + done.stderr).strip()[-300:]}") from error
    if "error" in found:
        raise RuntimeError(f"iperf3: {found['error']}")
    end = found["end"]
    cpu = end["cpu_utilization_percent"]
    used = {
        name: 100 * (seconds_used - before.get(name, 0.0)) / elapsed
        for name, seconds_used in cpu_by_role(roles).items()
    }
    return {
        "mbit_per_second": end["sum_received"]["bits_per_second"] / 1e6,
        "retransmits": end["sum_sent"].get("retransmits"),
        # the client (h1) is the sender, except with -R
        "sender_cpu_percent": cpu["remote_total"] if reverse else cpu["host_total"],
        "receiver_cpu_percent": cpu["host_total"] if reverse else cpu["remote_total"],
        "path_cpu_percent": {name: share for name, share in used.items() if share >= 0.5},
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the rounds, and each round's Mbit/s."""
    names = {name for run in runs for name in run["path_cpu_percent"]}
    shares = {n: statistics.median(r["path_cpu_percent"].get(n, 0.0) for r in runs) for n in names}
    return {
        "mbit_per_second": statistics.median(r["mbit_per_second"] for r in runs),
        "rounds_mbit_per_second": [r["mbit_per_second"] for r in runs],
        "retransmits": statistics.median(r["retransmits"] or 0 for r in runs),
        "sender_cpu_percent": statistics.median(r["sender_cpu_percent"] for r in runs),
        "receiver_cpu_percent": statistics.median(r["receiver_cpu_percent"] for r in runs),
        "path_cpu_percent": {n: share for n, share in shares.items() if share >= 0.5},
    }


def wait_until(check: Callable[[], bool], within: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise RuntimeError(f"{what} within {within:g} s")
        time.sleep(0.2)
    return time.monotonic() - started


def pings(bed: NatBed, address: str) -> bool:
    done = subprocess.run(
        ["ip", "netns", "exec", bed.hosts[1], "ping", "-c", "1", "-W", "1", address],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def only_iperf_inside(interface: str) -> str:
    """An nft table letting only iperf3 and ping into ``interface``: the overlay's peers
    would otherwise find each other's raw address and take it for a direct path (the
    overlay's packets inside raw wireguard-go's)."""
    head = f'  oifname "{interface}"'
    return (
        f"table inet {RAW_TABLE} {{\n chain output {{\n"
        "  type filter hook output priority filter; policy accept;\n"
        f"{head} tcp dport {IPERF_PORT} accept\n{head} tcp sport {IPERF_PORT} accept\n"
        f"{head} icmp type {{ echo-request, echo-reply }} accept\n{head} drop\n }}\n}}\n"
    )


def _key() -> tuple[str, str]:
    private = X25519PrivateKey.generate()
    raw = private.private_bytes_raw()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode(), base64.b64encode(public).decode()


@contextmanager
def raw_wireguard(bed: NatBed, tmp: Path) -> Iterator[dict[str, int]]:
    """wireguard-go in h1 and h2 configured by hand; yields its processes by host and removes
    both interfaces at the end (SIGTERM: wireguard-go deletes its link and UAPI socket)."""
    tag = bed.wan.removeprefix("cbw")
    names = {i: f"wgraw{i}{tag}" for i in (1, 2)}
    keys = {i: _key() for i in (1, 2)}
    processes: list[subprocess.Popen[str]] = []
    try:
        for i in (1, 2):
            processes.append(
                bed.spawn(
                    bed.hosts[i],
                    ["wireguard-go", "-f", names[i]],
                    ready="UAPI listener started",
                    env={"LOG_LEVEL": "verbose"},
                )
            )
            ns = bed.hosts[i]
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-f", "-"],
                input=only_iperf_inside(names[i]),
                text=True,
                capture_output=True,
                check=True,
            )
            bed.exec(ns, ["ip", "addr", "add", f"{RAW_ADDRESS[i]}/24", "dev", names[i]])
            bed.exec(ns, ["ip", "link", "set", names[i], "mtu", str(MTU), "up"])
        # h1 first: its handshake opens r1's mapping (r2 drops it), so h2's gets through
        for i, other in ((1, 2), (2, 1)):
            key_file = tmp / f"raw{i}.key"
            key_file.write_text(keys[i][0] + "\n")
            key_file.chmod(0o600)
            bed.exec(
                bed.hosts[i],
                [
                    *("wg", "set", names[i], "listen-port", str(RAW_PORT)),
                    *("private-key", key_file, "peer", keys[other][1]),
                    *("endpoint", f"{ROUTER[other]}:{RAW_PORT}"),
                    *("allowed-ips", f"{RAW_ADDRESS[other]}/32", "persistent-keepalive", "1"),
                ],
            )

        def shaken() -> bool:
            found = bed.exec(bed.hosts[1], ["wg", "show", names[1], "latest-handshakes"])
            return all(line.split()[-1] != "0" for line in found.splitlines())

        took = wait_until(shaken, 20, "no WireGuard handshake between the raw interfaces")
        note(f"raw wireguard-go: handshake after {took:.1f} s")
        wait_until(lambda: pings(bed, RAW_ADDRESS[2]), 10, "no ping over raw wireguard-go")
        yield {f"h{i}": process.pid for i, process in enumerate(processes, 1)}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for i in (1, 2):
            # a wireguard-go killed rather than stopped leaves its link
            for command in (
                ["ip", "-n", bed.hosts[i], "link", "del", names[i]],
                ["ip", "netns", "exec", bed.hosts[i], "nft", "delete", "table", "inet", RAW_TABLE],
            ):
                subprocess.run(command, capture_output=True, check=False)


class Overlay:
    """The relay in the wan and two overlay peers, laptop (h1) and server (h2), as
    tests/test_overlay.py starts them, and a client token for a relayed tunnel."""

    def __init__(self, bed: NatBed, tmp: Path) -> None:
        state = tmp / "relay"
        env = {
            "CLOUDBRIDGE_SERVER__PUBLIC_HOST": WAN,
            "CLOUDBRIDGE_METRICS__ENABLED": "false",
            # the relayed tunnel's iperf3 server beside the relay (TEST-NET-3 is denied
            # unless allowed)
            "CLOUDBRIDGE_SERVER__EGRESS__ALLOW": json.dumps([f"{WAN}:{IPERF_PORT}"]),
        }
        relay: list[Any] = [BIN / "cloudbridge", "relay", "serve", "--state-dir", state]
        started = bed.spawn(bed.wan, relay, ready="client config:", env=env, log=tmp / "relay.log")
        self.mesh = Mesh(bed, tmp, started, relay, env)
        self.bed, self.tmp = bed, tmp
        token = self.mesh.cloudbridge(
            *("relay", "token", "issue", "--state-dir", str(state), "--tenant", "acme"),
            *("--subject", "peer", "--permission", "relay:connect", "--permission", "p2p:mesh"),
            *("--permission", "tunnel:create"),
        ).strip()
        self.written = yaml.safe_load((state / "client.yaml").read_text())
        self.configs: dict[str, Path] = {}
        for name, overlay in (("laptop", True), ("server", True), ("tunnel", False)):
            document: dict[str, Any] = {
                **self.written,
                "auth": {"token": token},
                "metrics": {"enabled": False},
                "p2p": {"name": name, "ice": self.written["p2p"]["ice"]},
            }
            if overlay:
                document["overlay"] = {"enabled": True}
            self.configs[name] = tmp / f"{name}.yaml"
            self.configs[name].write_text(yaml.safe_dump(document))
        self.pids: dict[str, int] = {"relay": started.pid}

    def start(self, name: str, host: int) -> None:
        config = self.configs[name]
        process = self.bed.spawn(
            self.bed.hosts[host],
            [BIN / "cloudbridge", "p2p", "--config", config],
            ready="overlay ",
            log=config.with_suffix(".log"),
        )
        self.pids[name] = process.pid

    def address(self, name: str) -> str:
        done = self.mesh.cloudbridge("ip", "--config", str(self.configs[name]), "--json")
        addresses: list[str] = json.loads(done)["addresses"]
        return addresses[0]

    def path(self) -> str | None:
        return self.mesh.peer_path(self.configs["laptop"])

    def where(self) -> str:
        """The laptop's path to the server and its endpoint there, e.g. "stun 203.0.113.12:P"."""
        peers = self.mesh.status(self.configs["laptop"])["peers"]
        if not peers or not peers[0]["connected"]:
            return "none"
        return f"{peers[0]['path']} {peers[0].get('endpoint')}"

    def wait_for_path(self, wanted: set[str]) -> float:
        seen: list[str | None] = [None]

        def there() -> bool:
            seen[0] = self.path()
            return seen[0] in wanted

        try:
            return wait_until(there, PATIENCE, f"the laptop's path is {seen[0]}, not {wanted}")
        except RuntimeError as error:
            raise RuntimeError(f"{error}: {self.mesh.explain(self.configs['laptop'])}") from None

    def tunnel(self) -> int:
        """A relayed tunnel from h1 to the iperf3 server beside the relay; its process id."""
        config = self.configs["tunnel"]
        process = self.bed.spawn(
            self.bed.hosts[1],
            [
                *(BIN / "cloudbridge", "tunnel", "--config", config),
                *("--local-port", str(TUNNEL_PORT), "--remote-host", WAN),
                *("--remote-port", str(IPERF_PORT)),
            ],
            ready=f"tunnel 127.0.0.1:{TUNNEL_PORT}",
            log=config.with_suffix(".log"),
        )
        return process.pid


class Runs:
    """Every iperf3 run of each path, by direction; a path that failed once says why and is
    not run again; the overlay's path before and after each of its runs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.directions = ["up"] if args.no_reverse else ["up", "down"]
        self.runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.failed: dict[str, str] = {}
        self.paths: dict[str, list[str]] = {}
        #: what else is known of a path (the tunnel's transport)
        self.details: dict[str, dict[str, Any]] = {}

    def fail(self, name: str, error: BaseException | str) -> None:
        why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.failed.setdefault(name, why[:800])
        note(f"{PATHS[name]}: failed: {self.failed[name]}")

    def measure(
        self,
        name: str,
        direction: str,
        bed: NatBed,
        target: tuple[str, int],
        roles: dict[str, int],
        overlay: Overlay | None = None,
    ) -> None:
        if name in self.failed:
            return
        note(f"{PATHS[name]}: iperf3 {direction}, {self.args.seconds:g} s")
        try:
            if overlay is not None:
                self.paths.setdefault(name, []).append(overlay.where())
            found = iperf(bed, *target, self.args.seconds, direction == "down", roles)
            if overlay is not None:
                self.paths[name].append(overlay.where())
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            # a path that fails still leaves the others worth measuring
            self.fail(name, error)
            return
        self.runs.setdefault(name, {}).setdefault(direction, []).append(found)
        note(f"{PATHS[name]}: {direction} {found['mbit_per_second']:.0f} Mbit/s")

    def results(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in PATHS:
            if name in self.failed:
                found[name] = {"failed": self.failed[name]}
            elif name in self.runs:
                found[name] = {d: summary(runs) for d, runs in self.runs[name].items()}
                if name in self.paths:
                    found[name]["paths"] = sorted({path.split()[0] for path in self.paths[name]})
                    # before and after each run, in order
                    found[name]["path_each_run"] = self.paths[name]
                found[name].update(self.details.get(name, {}))
        found["ratios"] = ratios(found)
        return found


def start_overlay(bed: NatBed, tmp: Path, runs: Runs) -> tuple[Overlay | None, str]:
    """The relay and both peers, once the laptop's path to the server is stun (or direct)
    and a ping crosses the overlay; the server's overlay address."""
    note("the overlay")
    overlay: Overlay | None = None
    try:
        overlay = Overlay(bed, tmp)
        overlay.start("server", 2)
        overlay.start("laptop", 1)
        address = overlay.address("server")
        took = overlay.wait_for_path({"stun", "direct"})
        runs.details["stun"] = {"seconds_to_path": took}
        note(f"the overlay: on {overlay.path()} after {took:.1f} s")
        wait_until(lambda: pings(bed, address), 20, "no ping over the overlay")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        for name in ("stun", "derp"):
            runs.fail(name, f"the overlay did not start: {error}")
        return overlay, ""
    return overlay, address


def over_derp(bed: NatBed, overlay: Overlay, address: str, runs: Runs) -> None:
    """The overlay with every UDP packet dropped by both routers, until it is on DERP."""
    note(PATHS["derp"])
    bed.block("no_udp", "meta l4proto udp")
    try:
        took = overlay.wait_for_path({"derp"})
        runs.details["derp"] = {"seconds_to_path": took}
        note(f"the overlay: on derp {took:.1f} s after UDP was dropped")
        wait_until(lambda: pings(bed, address), 20, "no ping over the overlay")
        for direction in runs.directions:
            runs.measure("derp", direction, bed, (address, IPERF_PORT), overlay.pids, overlay)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        runs.fail("derp", error)
    finally:
        bed.unblock("no_udp")


def relayed(bed: NatBed, overlay: Overlay, runs: Runs) -> None:
    note(PATHS["tunnel"])
    try:
        roles = {"tunnel": overlay.tunnel(), "relay": overlay.pids["relay"]}
        status = overlay.mesh.status(overlay.configs["tunnel"])
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        runs.fail("tunnel", error)
        return
    runs.details["tunnel"] = {"transport": status["transport"]["name"]}
    for direction in runs.directions:
        runs.measure("tunnel", direction, bed, ("127.0.0.1", TUNNEL_PORT), roles)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Raw wireguard-go and the overlay on its direct path alternate, direction by direction,
    for ``args.rounds``; then the overlay over DERP and the relayed tunnel, once each way."""
    runs = Runs(args)
    with (
        tempfile.TemporaryDirectory(prefix="bench-overlay-") as tmp,
        NatBed() as bed,
        ExitStack() as raw_stack,
    ):
        iperf_server = ["iperf3", "-s", "-p", str(IPERF_PORT), "--forceflush"]
        bed.spawn(bed.hosts[2], iperf_server, ready="Server listening")
        bed.spawn(bed.wan, [*iperf_server, "-B", WAN], ready="Server listening")
        # the overlay first, so that its peers' first candidates hold no raw address
        overlay, address = start_overlay(bed, Path(tmp), runs)
        note(PATHS["raw"])
        raw: dict[str, int] = {}
        try:
            raw = raw_stack.enter_context(raw_wireguard(bed, Path(tmp)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            runs.fail("raw", error)
        for _ in range(args.rounds):
            for direction in runs.directions:
                runs.measure("raw", direction, bed, (RAW_ADDRESS[2], IPERF_PORT), raw)
                if overlay is not None:
                    target = (address, IPERF_PORT)
                    runs.measure("stun", direction, bed, target, overlay.pids, overlay)
        raw_stack.close()
        if overlay is None:
            runs.fail("tunnel", "the relay did not start")
        else:
            if "derp" not in runs.failed:
                over_derp(bed, overlay, address, runs)
            relayed(bed, overlay, runs)
    return {**runs.results(), "overlay_address": address}


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each path's Mbit/s over raw wireguard-go's, by direction."""
    raw = results.get("raw", {})
    found: dict[str, dict[str, float]] = {}
    for name in ("stun", "derp", "tunnel"):
        figures = results.get(name, {})
        for direction in ("up", "down"):
            if direction in figures and direction in raw:
                rate = figures[direction]["mbit_per_second"]
                found.setdefault(name, {})[direction] = rate / raw[direction]["mbit_per_second"]
    return found


def _yes(met: bool) -> str:
    return "yes" if met else "NO"


def _figures(results: dict[str, Any], directions: list[str]) -> list[list[str]]:
    rows = [["path", "", "Mbit/s", "each run", "sender CPU", "path's processes (CPU, % of a core)"]]
    for name, label in PATHS.items():
        figures, title = results.get(name, {}), label
        if "failed" in figures:
            rows.append([title, "failed", "", "", "", figures["failed"].splitlines()[0][:70]])
            continue
        if "paths" in figures:
            title = f"overlay (on {' and '.join(figures['paths'])})"
        if figures.get("transport"):
            title += f" ({figures['transport']})"
        for direction in directions:
            one = figures[direction]
            shares = sorted(one["path_cpu_percent"].items(), key=lambda item: -item[1])
            rows.append(
                [
                    title if direction == directions[0] else "",
                    direction,
                    f"{one['mbit_per_second']:.0f}",
                    ", ".join(f"{rate:.0f}" for rate in one["rounds_mbit_per_second"]),
                    f"{one['sender_cpu_percent']:.0f}%",
                    ", ".join(f"{who} {share:.0f}%" for who, share in shares),
                ]
            )
    return rows


def _ratios(found: dict[str, dict[str, float]], directions: list[str]) -> list[str]:
    rows = [["path", *directions]]
    for name in ("stun", "derp", "tunnel"):
        if name in found:
            shown = [f"{found[name][d]:.2f}x" if d in found[name] else "" for d in directions]
            rows.append([PATHS[name], *shown])
    if len(rows) == 1:
        return ["(none: raw wireguard-go has no figures)"]
    return _table(rows, numeric=set(range(1, len(directions) + 1)))


def _goals(results: dict[str, Any]) -> list[str]:
    found, lines = results["ratios"], ["Goals (issue 17)"]
    if "stun" in found:
        worst = min(found["stun"].values())
        paths = " and ".join(results["stun"]["paths"])
        lines.append(
            f"the overlay on its {paths} path carries >= {GOAL:.0%} of raw wireguard-go: "
            f"{worst:.0%} (the worse direction)  {_yes(worst >= GOAL and paths != 'derp')}"
        )
    else:
        lines.append(f"the overlay carries >= {GOAL:.0%} of raw wireguard-go: not measured  NO")
    if "derp" in found:
        worst = min(found["derp"].values())
        lines.append(f"over DERP: measured, {worst:.0%} of raw wireguard-go  yes")
    elif "up" in results.get("derp", {}):
        rate = results["derp"]["up"]["mbit_per_second"]
        lines.append(f"over DERP: measured, {rate:.0f} Mbit/s up (no ratio)  yes")
    else:
        lines.append("over DERP: measured  NO")
    return lines


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    directions = ["up"] if args.no_reverse else ["up", "down"]
    lines = [
        f"Overlay (issue 17): iperf3, one stream, {args.seconds:g} s a run, up = h1 -> h2, "
        f"down = h2 -> h1 (-R); raw and stun alternate for {args.rounds} round(s), medians",
        *_table(_figures(results, directions), numeric={2, 3, 4}),
        "",
        "Ratios to raw wireguard-go",
        *_ratios(results["ratios"], directions),
        "",
    ]
    waits = [
        f"{what} {results[name]['seconds_to_path']:.1f} s {when}"
        for name, what, when in (
            ("stun", "on stun", "after both peers started"),
            ("derp", "on derp", "after UDP was dropped (default heartbeats)"),
        )
        if "seconds_to_path" in results.get(name, {})
    ]
    if waits:
        lines += [f"The overlay: {'; '.join(waits)}", ""]
    return "\n".join([*lines, *_goals(results)])


def _table(rows: list[list[str]], numeric: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            (cell.rjust(width) if i in numeric else cell.ljust(width))
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="each iperf3 run (5 s)")
    parser.add_argument("--no-reverse", action="store_true", help="h1 -> h2 only")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of raw wireguard-go and the overlay (2)"
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args()
    why = missing()
    if why:
        print(f"overlay: skipped: {why}", flush=True)
        results: dict[str, Any] = {"skipped": why}
    else:
        load = os.getloadavg()[0]
        if load > 0.5:
            note(f"warning: load average {load:.2f} before the run: others share the cores")
        results = {"load_average_before": load, **run(args)}
        print(report(results, args), flush=True)
    if args.json is not None:
        settings = {"seconds": args.seconds, "reverse": not args.no_reverse, "rounds": args.rounds}
        args.json.write_text(json.dumps({"settings": settings, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
