"""./dev bench in its quickest mode, so that the benchmark cannot rot unnoticed.

No figure is asserted (speed belongs to the bench itself): only that a run over direct TCP,
socat and the TLS transport completes and reports every figure, ratio and goal it should.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from venvs import ROOT

pytestmark = [pytest.mark.bench, pytest.mark.timeout(90)]

FIGURES = {
    "bulk_up_1_bytes_per_second",
    "bulk_down_1_bytes_per_second",
    "bulk_up_8_bytes_per_second",
    "bulk_down_8_bytes_per_second",
    "parallel_bytes_per_second",
    "parallel_completed",
    "rtt_p50_seconds",
    "rtt_p99_seconds",
    "setup_per_second",
}
BULK = [
    "bulk_up_1_bytes_per_second",
    "bulk_down_1_bytes_per_second",
    "bulk_up_8_bytes_per_second",
    "bulk_down_8_bytes_per_second",
]
#: what a path with a forwarder adds (direct TCP has none)
COSTS = {"idle_bytes_per_connection", "cpu_seconds_per_gib"}


def test_a_quick_run_reports_every_figure_ratio_and_goal(tmp_path: Path) -> None:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed (./dev test installs it): no reference to compare")
    output = tmp_path / "bench.json"
    run = subprocess.run(
        [
            *(sys.executable, str(ROOT / "bench" / "run.py"), "--quick"),
            *("--only", "direct,socat,tls", "--json", str(output)),
        ],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(output.read_text())

    assert report["skipped"] == {}, report["skipped"]
    assert report["errors"] == {}, report["errors"]
    assert set(report["paths"]["direct"]) == FIGURES
    assert set(report["paths"]["socat"]) == FIGURES | COSTS
    tls = report["paths"]["cloudbridge-tls"]
    assert set(tls) == FIGURES | COSTS
    assert tls["parallel_completed"] == report["settings"]["parallel"]
    ratios = report["ratios"]["loopback"]["socat"]["cloudbridge-tls"]
    assert set(ratios) == (FIGURES | COSTS) - {"parallel_completed"}
    goals = {(goal["goal"], goal["path"]) for goal in report["goals"]}
    assert ("RTT p50 <= 2x socat", "cloudbridge-tls") in goals
    assert ("CPU per GiB <= 3x socat", "cloudbridge-tls") in goals
    assert len(report["commit"]) == 40
    for heading in ("Figures", "Ratio to socat", "Goals (issue 15)"):
        assert heading in run.stdout


def test_the_quic_engine_moves_every_run_and_reports_it() -> None:
    """bench/quic_engine.py, the peer path's reference across the MTU-1500 link, on loopback."""
    engine = ROOT / "bench" / "quic_engine.py"
    with socket.socket(type=socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    with subprocess.Popen(
        [sys.executable, str(engine), "serve", "127.0.0.1", port],
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            assert server.stdout is not None
            assert "ready" in server.stdout.readline()
            run = subprocess.run(
                [sys.executable, str(engine), "run", "127.0.0.1", port, "--megabytes", "2"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            server.terminate()
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    # four runs of 2 MiB each: up and down, on one stream and on eight
    assert figures["moved_bytes"] == 4 * 2 * 1024 * 1024
    assert all(figures[key] > 0 for key in BULK)


def test_the_peer_tunnel_is_held_to_the_quic_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    assert spec is not None
    assert spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, report)  # its dataclasses look themselves up
    spec.loader.exec_module(report)
    engine = dict.fromkeys(BULK, 10e6) | {"cpu_seconds_per_gib": 60.0}
    peer = dict.fromkeys(BULK, 12e6) | {"cpu_seconds_per_gib": 70.0}
    peer["bulk_down_8_bytes_per_second"] = 5e6
    results = {"mtu1500-quic-engine": engine, "mtu1500-peer-udp": peer}

    (goal,) = report.goals(results, 64)
    assert goal["path"] == "mtu1500-peer-udp"
    assert goal["value"] == pytest.approx(0.5)  # the worst of the four bulk ratios
    assert not goal["met"]
    text = report.render(results, {}, {}, 64)
    assert "UDP-only peer tunnel to the QUIC engine alone" in text


def test_the_cluster_part_holds_every_session_and_reports_each_relay(tmp_path: Path) -> None:
    """bench/cluster.py with a handful of sessions: three relays on a real Redis."""
    if shutil.which("redis-server") is None:
        assert not os.environ.get("CI"), "redis-server is not installed (./dev test installs it)"
        pytest.skip("redis-server is not installed (./dev test installs it)")
    output = tmp_path / "cluster.json"
    run = subprocess.run(
        [
            *(sys.executable, str(ROOT / "bench" / "cluster.py"), "--sessions", "6"),
            *("--idle", "1", "--timeout", "70", "--json", str(output)),
        ],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(output.read_text())

    assert figures["sessions_held"] == 6
    assert {name: relay["sessions_held"] for name, relay in figures["relays"].items()} == {
        "r1": 2,
        "r2": 2,
        "r3": 2,
    }
    assert all(relay["setups_per_second"] > 0 for relay in figures["relays"].values())
    assert "sessions held 6 of 6  yes" in run.stdout
