"""Issue 18, the first hour: the README's first command, ``./dev demo --duration 3``, prints
no traceback and no warning, and exits 0; its ``--json`` report is the documented one."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from cli_process import BIN, environment
from cloudbridge_core.config.schema import cli_schema
from jsonschema import Draft202012Validator

pytestmark = pytest.mark.timeout(90)

#: what a new user must not see: a traceback, an exception a task dropped, a warning
#: (structlog's level column, Python's warnings module, asyncio's own messages)
NOISE = re.compile(r"Traceback|Task exception|Exception in callback|never retrieved|warning", re.I)


def run_demo(home: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "cloudbridge", "demo", *options],
        capture_output=True,
        text=True,
        env=environment(HOME=str(home)),
        cwd=home,
        check=False,
        timeout=60,
    )


def test_the_demo_is_clean(tmp_path: Path) -> None:
    ran = run_demo(tmp_path, "--duration", "3")
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output
    noisy = [line for line in output.splitlines() if NOISE.search(line)]
    assert not noisy, "\n".join(noisy)
    assert "throughput_bytes_per_second" in ran.stdout  # it did push traffic


def test_the_demo_reports_in_json_as_documented(tmp_path: Path) -> None:
    ran = run_demo(tmp_path, "--duration", "1", "--json")
    assert ran.returncode == 0, ran.stderr
    document = json.loads(ran.stdout)
    Draft202012Validator(cli_schema("demo")).validate(document)
    assert document["tunnel"]["bytes_sent"] > 0
    assert document["tunnel"]["throughput_bytes_per_second"] > 0
