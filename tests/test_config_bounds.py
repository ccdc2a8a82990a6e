"""Config files and other user-controlled inputs are read with bounds: a file too large,
nested too deep or holding an alias bomb is refused quickly, with bounded memory and a
config error naming the limit (exit 3), never a hang or a traceback. Black box: the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_process import BIN, environment

pytestmark = pytest.mark.timeout(60)

#: nine levels of ten aliases each: a billion values once expanded
BILLION_LAUGHS = "\n".join(
    [
        'lol0: &lol0 ["lol"]',
        *(f"lol{n}: &lol{n} [{', '.join([f'*lol{n - 1}'] * 10)}]" for n in range(1, 10)),
        "relay:",
        "  host: *lol9",
    ]
)


#: runs the command it is given, then prints the peak RSS of that command alone (KiB): a
#: child of the test itself would count pytest's pages (a fork copies them), a fresh
#: process's children do not
PEAK_OF = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], capture_output=True, check=False)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def peak_kib(*args: str) -> int:
    measured = subprocess.run(
        [sys.executable, "-c", PEAK_OF, BIN / "cloudbridge", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        env=environment(),
    )
    return int(measured.stdout)


def cloudbridge(*args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [BIN / "cloudbridge", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env=environment(**env),
    )
    return done, time.monotonic() - started


@pytest.mark.parametrize(
    ("content", "says"),
    [
        pytest.param(BILLION_LAUGHS, "once its aliases are expanded", id="billion-laughs"),
        pytest.param("a: " + "[" * 5000 + "]" * 5000, "nested deeper than 64", id="deep-flow"),
        pytest.param(
            "".join(f"{'  ' * level}k{level}:\n" for level in range(200)),
            "nested deeper than 64",
            id="deep-block",
        ),
        pytest.param("# padding\n" * 120_000, "larger than 1048576 bytes", id="too-large"),
    ],
)
def test_a_hostile_config_file_is_refused_quickly(tmp_path: Path, content: str, says: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(content)
    done, took = cloudbridge("config", "validate", str(config))
    assert peak_kib("config", "validate", str(config)) < 400 * 1024  # bounded, whatever it said
    assert done.returncode == 3, done.stderr
    assert says in done.stdout
    assert "a security limit" in done.stdout
    assert "Traceback" not in done.stderr
    assert took < 10


def test_a_config_within_the_bounds_still_uses_aliases(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("relay:\n  host: &relay relay.example.com\nserver:\n  public_host: *relay\n")
    done, _ = cloudbridge("config", "validate", str(config))
    assert done.returncode == 0, done.stderr


def test_deeply_nested_json_in_the_environment_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("relay:\n  host: relay.example.com\n")
    nested = "[" * 60_000 + "]" * 60_000  # under the 128 KiB an environment string may hold
    done, took = cloudbridge(
        "--config", str(config), "config", "show", CLOUDBRIDGE_SERVER__EGRESS__ALLOW=nested
    )
    assert done.returncode == 3, done.stderr
    assert "server.egress.allow" in done.stderr
    assert "Traceback" not in done.stderr
    assert took < 10


@pytest.mark.parametrize(
    ("url", "says"),
    [
        pytest.param("cloudbridge://relay:99999/join?code=x&ca=y", "port", id="bad-port"),
        pytest.param(
            "cloudbridge://relay:5556/join?" + "&".join(f"f{n}=v" for n in range(10_000)),
            "invite URL",
            id="many-fields",
        ),
        pytest.param(
            "cloudbridge://relay:5556/join?code=" + "x" * 100_000, "longer than", id="too-long"
        ),
    ],
)
def test_a_hostile_invite_url_is_a_usage_error(tmp_path: Path, url: str, says: str) -> None:
    done, _ = cloudbridge(
        "join", url, "--no-start", "--config-dir", str(tmp_path / "J"), "--insecure-storage"
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "J").exists()
