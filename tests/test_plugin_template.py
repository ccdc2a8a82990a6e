"""The plugin template renders working, tested plugins, and broken plugins stay contained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import copier
import pytest
from cli_process import echo_once, stop
from loopback import free_port
from venvs import ROOT, Venv, output_tail

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAMILIES = ["transport", "auth_provider", "nat_strategy", "overlay", "exporter"]

BROKEN_PYPROJECT = """
[build-system]
requires = ["hatchling>=1.27"]
build-backend = "hatchling.build"

[project]
name = "cloudbridge-broken"
version = "0.0.1"
dependencies = ["cloudbridge-core"]

[project.entry-points.cloudbridge]
broken = "cloudbridge_broken.hooks"

[tool.hatch.build.targets.wheel]
packages = ["src/cloudbridge_broken"]
"""


def render(family: str, destination: Path) -> Path:
    name = f"gen_{family}"
    target = destination / f"cloudbridge-{name}"
    copier.run_copy(
        str(ROOT / "plugin-template"),
        str(target),
        data={"plugin_name": name, "family": family, "description": f"Generated {family} plugin"},
        defaults=True,
        quiet=True,
    )  # plugin-template/ is not a git root: copier renders the working tree as it is
    return target


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_plugin_passes_its_tests_and_is_listed(
    family: str, plugin_venv: Venv, tmp_path: Path
) -> None:
    project = render(family, tmp_path)
    name = f"gen_{family}"
    tools = Path(sys.executable).parent
    checks = (
        [tools / "ruff", "check", "--no-cache", "."],
        [tools / "ruff", "format", "--no-cache", "--check", "."],
        [tools / "mypy", "--no-incremental"],  # the generated pyproject asks for --strict on src/
    )
    for check in checks:
        linted = subprocess.run(check, cwd=project, capture_output=True, text=True, check=False)
        assert linted.returncode == 0, linted.stdout + linted.stderr

    plugin_venv.install(project)
    tested = plugin_venv.run(
        "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", project / "tests"
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr

    listed = {p["name"]: p for p in plugin_venv.cloudbridge_json("plugins", "list")["plugins"]}
    record = listed[name]
    assert record["status"] == "active", record["error"]
    assert record["distribution"] == f"cloudbridge-gen-{family.replace('_', '-')}"
    assert record["families"] == [family]
    assert record["providers"] == {family: [name]}


def test_broken_plugin_is_listed_as_failed_next_to_working_ones(
    plugin_venv: Venv, tmp_path: Path
) -> None:
    working = render("exporter", tmp_path)
    broken = tmp_path / "cloudbridge-broken"
    (broken / "src" / "cloudbridge_broken").mkdir(parents=True)
    (broken / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (broken / "src" / "cloudbridge_broken" / "__init__.py").write_text("")
    (broken / "src" / "cloudbridge_broken" / "hooks.py").write_text("raise RuntimeError('boom')\n")
    plugin_venv.install(working, broken)

    result = plugin_venv.run("cloudbridge", "plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert listed["gen_exporter"]["status"] == "active"
    assert listed["broken"]["status"] == "failed"
    assert "RuntimeError: boom" in listed["broken"]["error"]
    assert listed["broken"]["distribution"] == "cloudbridge-broken"
    # everything else still works with the broken plugin installed
    assert plugin_venv.run("cloudbridge", "--help").returncode == 0
    selected = plugin_venv.run("cloudbridge", "--plugin", "broken", "config", "show")
    assert selected.returncode == 1
    assert "plugin 'broken' was selected but failed to load" in selected.stderr


def test_generated_transport_alone_carries_a_tunnel_through_relay_serve_and_tunnel(
    plugin_venv: Venv, tmp_path: Path, echo_port: int
) -> None:
    """A third-party transport needs nothing but its own section: the relay serves it on
    ``transport.gen_transport.port``, client.yaml lists that port, the client uses it."""
    # no quic, grpc or websocket here; jwt checks the tokens `relay token issue` mints
    plugin_venv.install(render("transport", tmp_path), ROOT / "plugins" / "cloudbridge-jwt")
    state = tmp_path / "D"
    port = free_port()
    relay = plugin_venv.start(
        *("cloudbridge", "relay", "serve", "--dev", "--state-dir", state),
        ready="client config:",
        env={
            "CLOUDBRIDGE_SERVER__LISTEN": "127.0.0.1",
            "CLOUDBRIDGE_TRANSPORT__GEN_TRANSPORT__PORT": str(port),
            "CLOUDBRIDGE_TRANSPORT__TLS__PORT": str(free_port()),
            "CLOUDBRIDGE_SERVER__STUN_PORT": str(free_port()),
            "CLOUDBRIDGE_METRICS__ENABLED": "false",
        },
    )
    try:
        client_yaml = state / "client.yaml"
        assert f"gen_transport:\n    port: {port}\n" in client_yaml.read_text()
        issued = plugin_venv.run(
            *("cloudbridge", "relay", "token", "issue", "--state-dir", state),
            *("--tenant", "acme", "--subject", "laptop"),
            *("--permission", "relay:connect", "--permission", "tunnel:create"),
        )
        assert issued.returncode == 0, issued.stderr
        local = free_port()
        tunnel = plugin_venv.start(
            *("cloudbridge", "tunnel", "--config", client_yaml, "--local-port", str(local)),
            *("--remote-host", "127.0.0.1", "--remote-port", str(echo_port)),
            ready="tunnel 127.0.0.1:",
            env={
                "CLOUDBRIDGE_AUTH__TOKEN": issued.stdout.strip(),
                "CLOUDBRIDGE_TRANSPORT__MODE": "gen_transport",
                "CLOUDBRIDGE_METRICS__ENABLED": "false",
            },
        )
        try:
            payload = bytes(range(256)) * 256
            try:
                echoed = echo_once(local, payload)
            except OSError as exc:
                tails = f"relay:\n{output_tail(relay)}\ntunnel:\n{output_tail(tunnel)}"
                raise AssertionError(f"{exc!r}\n{tails}") from exc
            assert echoed == payload
            status = plugin_venv.cloudbridge_json("status", "--config", str(client_yaml))
            assert status["transport"]["name"] == "gen_transport"
            assert status["transport"]["reason"] == "transport.mode is gen_transport"
        finally:
            assert stop(tunnel) == 0
    finally:
        assert stop(relay) == 0
