"""./dev bench in its quickest mode, so that the benchmark cannot rot unnoticed.

No figure is asserted (speed belongs to the bench itself): only that a run over direct TCP,
socat and the TLS transport completes and reports every figure, ratio and goal it should.
"""

from __future__ import annotations

import json
import shutil
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
