"""Issue 18, the service and the background client, through the real CLI: ``service
status`` says when systemd or the unit is missing; the unit runs ``tunnel`` or ``p2p`` as
the config says; a token given by a flag or the environment reaches the unit's credential;
``up``/``down``/``logout``; relay and client metrics on different ports. No systemd runs
as PID 1 here: units are checked through ``--dry-run``, systemctl is absent or a stand-in."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cli_process import (
    BIN,
    echo_once,
    environment,
    issue_token,
    run_without_keyring,
    start,
    stop,
)
from loopback import free_port
from secret_service import secret_service

pytestmark = pytest.mark.timeout(60)

TOKEN = "eyJhbGciOiJSUzI1NiJ9.not-a-real-token.signature"  # must never appear in a unit


def cloudbridge(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run_without_keyring(*args, env=env, cwd=cwd)


def tunnel_only(tmp_path: Path) -> Path:
    config = tmp_path / "client.yaml"
    config.write_text(
        "relay:\n  host: relay.example.com\n"
        "p2p:\n  enabled: false\n"
        "tunnels:\n  - {local_port: 15432, remote_host: db, remote_port: 5432}\n"
    )
    return config


def fake_systemctl(tmp_path: Path, stderr: str, code: int) -> dict[str, str]:
    """A PATH whose systemctl answers every call with ``stderr`` and exit ``code``."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit {code}\n")
    script.chmod(0o755)
    return {"PATH": str(bin_dir)}


def test_service_status_says_when_systemd_or_the_unit_is_missing(tmp_path: Path) -> None:
    config = tunnel_only(tmp_path)
    no_systemctl = cloudbridge("service", "status", "--config", str(config), env={"PATH": "/"})
    assert no_systemctl.returncode == 1
    assert no_systemctl.stdout == ""
    assert "error: systemd is not available on this machine" in no_systemctl.stderr
    not_booted = cloudbridge(
        "service",
        "status",
        "--config",
        str(config),
        env=fake_systemctl(
            tmp_path, "System has not been booted with systemd as init system (PID 1).", 1
        ),
    )
    assert not_booted.returncode == 1
    assert "error: systemd is not running on this machine" in not_booted.stderr
    no_unit = tmp_path / "no-unit"
    no_unit.mkdir()
    missing = cloudbridge(
        "service",
        "status",
        "--config",
        str(config),
        env=fake_systemctl(no_unit, "Unit cloudbridge-client.service could not be found.", 4),
    )
    assert missing.returncode == 1
    assert "error: the service cloudbridge-client.service is not installed" in missing.stderr
    assert "hint: install it with 'sudo cloudbridge service install" in missing.stderr
    restart = cloudbridge("service", "restart", "--config", str(config), env={"PATH": "/"})
    assert restart.returncode == 1
    assert "systemd is not available" in restart.stderr
    # start, stop and restart say the same as status, in systemctl's words for each
    unit = "cloudbridge-client.service"
    for verb, said, code, error, hint in (
        (
            "restart",
            "System has not been booted with systemd as init system (PID 1).",
            1,
            "error: systemd is not running on this machine",
            "hint: run the client in the foreground",
        ),
        (
            "start",
            f"Failed to start {unit}: Unit {unit} not found.",
            5,
            f"error: the service {unit} is not installed",
            "hint: install it with 'sudo cloudbridge service install",
        ),
        (
            "stop",
            f"Failed to stop {unit}: Unit {unit} not loaded.",
            5,
            f"error: the service {unit} is not installed",
            "hint: install it with 'sudo cloudbridge service install",
        ),
        (
            "restart",
            f"Failed to restart {unit}: Access denied",
            4,
            f"error: systemctl restart {unit} failed: Failed to restart {unit}: Access denied",
            "hint: a system service is managed as root: run it again with sudo",
        ),
    ):
        fake = tmp_path / f"{verb}-{code}"
        fake.mkdir()
        failed = cloudbridge(
            "service", verb, "--config", str(config), env=fake_systemctl(fake, said, code)
        )
        assert failed.returncode == 1
        assert failed.stdout == ""
        said_lines = failed.stderr.splitlines()
        assert len(said_lines) == 2, failed.stderr  # what went wrong, what to do
        assert said_lines[0].startswith(error), failed.stderr
        assert said_lines[1].startswith(hint), failed.stderr


def test_the_unit_runs_tunnel_for_a_tunnel_only_config_with_the_given_token(
    tmp_path: Path,
) -> None:
    config = tunnel_only(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    from_file = cloudbridge(
        "--token-file", str(token_file), "service", "install", "--dry-run", "--config", str(config)
    )
    assert from_file.returncode == 0, from_file.stderr
    lines = from_file.stdout.splitlines()
    command = f"{BIN / 'cloudbridge'} --token-file %d/token tunnel --config {config}"
    assert f"ExecStart={command}" in lines
    assert f"LoadCredential=token:{token_file}" in lines
    late = cloudbridge(  # the flag after the subcommand is carried the same
        "service", "install", "--dry-run", "--config", str(config), "--token-file", str(token_file)
    )
    assert late.returncode == 0, late.stderr
    assert f"LoadCredential=token:{token_file}" in late.stdout.splitlines()
    credential = "/etc/cloudbridge/credentials/cloudbridge-client.token"
    from_env = cloudbridge(
        "service", "install", "--dry-run", "--config", str(config), env={"CLOUDBRIDGE_TOKEN": TOKEN}
    )
    assert from_env.returncode == 0, from_env.stderr
    assert f"LoadCredential=token:{credential}" in from_env.stdout.splitlines()
    assert f"would write {credential} (0600: a copy of the token given by env" in from_env.stderr
    assert TOKEN not in from_env.stdout + from_env.stderr
    from_flag = cloudbridge(
        "--token", TOKEN, "service", "install", "--dry-run", "--config", str(config)
    )
    assert from_flag.returncode == 0, from_flag.stderr
    assert f"LoadCredential=token:{credential}" in from_flag.stdout.splitlines()
    # no token anywhere: refused (exit 4), no unit printed
    none = cloudbridge("service", "install", "--dry-run", "--config", str(config))
    assert none.returncode == 4
    assert none.stdout == ""
    assert "no token is kept for relay.example.com" in none.stderr
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text("relay:\n  host: relay.example.com\np2p:\n  enabled: false\n")
    idle = cloudbridge(
        "service", "install", "--dry-run", "--config", str(nothing), env={"CLOUDBRIDGE_TOKEN": "x"}
    )
    assert idle.returncode == 2
    assert "nothing for the service to run" in idle.stderr


def background_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """State and runtime directories of this test's own (pid file, log, control socket)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    return {
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_RUNTIME_DIR": str(run),
        "CLOUDBRIDGE_DISABLE_PLUGINS": "quic,grpc,websocket",
        **extra,
    }


def test_up_connects_in_the_background_and_down_stops_it(tmp_path: Path, echo_port: int) -> None:
    state = tmp_path / "D"
    relay = start(
        *("relay", "serve", "--dev", "--state-dir", str(state)),
        env=environment(
            CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
            CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket",
            CLOUDBRIDGE_METRICS__PROMETHEUS_PORT=str(free_port()),
            CLOUDBRIDGE_TRANSPORT__TLS__PORT=str(free_port()),
        ),
        ready="client config:",
    )
    try:
        written = yaml.safe_load((state / "client.yaml").read_text())
        local = free_port()
        written["p2p"] = {"enabled": False}
        written["metrics"] = {"prometheus_port": free_port()}
        written["tunnels"] = [
            {"local_port": local, "remote_host": "127.0.0.1", "remote_port": echo_port}
        ]
        config = tmp_path / "client.yaml"
        config.write_text(yaml.safe_dump(written))
        token_file = tmp_path / "token"
        token_file.write_text(issue_token(state))
        token_file.chmod(0o600)
        env = background_env(tmp_path)
        started = cloudbridge(
            "--token-file",
            str(token_file),
            "up",
            "--config",
            str(config),
            "--timeout",
            "20",
            env=env,
        )
        assert started.returncode == 0, started.stderr
        assert "started 'cloudbridge tunnel' in the background" in started.stderr
        assert "connected to localhost via tls" in started.stderr
        assert echo_once(local, b"hello") == b"hello"
        pid_files = list((tmp_path / "state" / "cloudbridge").glob("client-*.pid"))
        assert len(pid_files) == 1
        pid = int(pid_files[0].read_text())
        again = cloudbridge("up", "--config", str(config), env=env)
        assert again.returncode == 0, again.stderr
        assert f"already running (pid {pid})" in again.stderr
        stopped = cloudbridge("down", "--config", str(config), env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped the client (pid {pid})" in stopped.stderr
        assert not pid_files[0].exists()
        status = cloudbridge("status", "--config", str(config), env=env)
        assert status.returncode == 5
        nothing = cloudbridge("down", "--config", str(config), env=env)
        assert nothing.returncode == 0
        assert "no client started by 'cloudbridge up' is running" in nothing.stderr
    finally:
        assert stop(relay) == 0


def test_up_gives_up_with_the_reason_when_the_relay_is_not_running(tmp_path: Path) -> None:
    config = tmp_path / "client.yaml"
    config.write_text(
        "relay:\n  host: 127.0.0.1\n"
        "p2p:\n  enabled: false\n"
        f"tunnels:\n  - {{local_port: {free_port()}, remote_host: db, remote_port: 5432}}\n"
        f"metrics:\n  prometheus_port: {free_port()}\n"
    )
    env = background_env(
        tmp_path,
        CLOUDBRIDGE_TOKEN=TOKEN,
        CLOUDBRIDGE_TRANSPORT__TLS__PORT=str(free_port()),  # nothing listens there
    )
    try:
        done = cloudbridge("up", "--config", str(config), "--timeout", "3", env=env)
        assert done.returncode == 5, done.stderr
        last = done.stderr.strip().splitlines()
        assert any(
            line.startswith(("error: not connected after 3s", "error: the client exited with"))
            for line in last
        ), done.stderr
        assert "127.0.0.1" in done.stderr  # the reason names where it tried
        assert "hint: see " in done.stderr
    finally:
        cloudbridge("down", "--config", str(config), env=env)


def test_logout_forgets_the_token_kept_for_the_relay(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    refresh = tmp_path / "token.refresh"
    refresh.write_text("refresh")
    config = tmp_path / "client.yaml"
    config.write_text(
        "relay:\n  host: relay.example.com\n"
        f"auth:\n  token_storage: file\n  token_file: {token_file}\n"
    )
    done = cloudbridge("logout", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"forgot the token for relay.example.com (file {token_file})" in done.stderr
    assert not token_file.exists()
    assert not refresh.exists()
    again = cloudbridge("logout", "--config", str(config))
    assert again.returncode == 0
    assert "no token was kept for relay.example.com in the file" in again.stderr


def test_logout_on_a_machine_without_a_keyring_says_none_was_kept(tmp_path: Path) -> None:
    config = tmp_path / "client.yaml"
    config.write_text("relay:\n  host: relay.example.com\n")
    done = cloudbridge("logout", "--config", str(config), env={"HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "no token was kept for relay.example.com in the OS keyring (service 'cloudbridge');"
        " no keyring backend is available"
    ]


@contextlib.contextmanager
def taken(port: int) -> Iterator[None]:
    """``port`` on loopback is busy for the block (already busy is as good)."""
    holder = socket.socket()
    try:
        with contextlib.suppress(OSError):
            holder.bind(("127.0.0.1", port))
            holder.listen()
        yield
    finally:
        holder.close()


def said_before(process: subprocess.Popen[str], ready: str) -> list[str]:
    """The lines ``process`` printed up to ``ready``; the rest is drained in the background."""
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line.rstrip("\n"))
        if ready in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return lines
    process.wait()
    pytest.fail(f"exited with {process.returncode} before {ready!r}:\n" + "\n".join(lines))


def test_relay_and_client_metrics_default_apart_and_a_busy_default_moves(
    tmp_path: Path, echo_port: int
) -> None:
    state = tmp_path / "D"
    relay_env = environment(
        CLOUDBRIDGE_SERVER__LISTEN="127.0.0.1",
        CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket",
        CLOUDBRIDGE_TRANSPORT__TLS__PORT=str(free_port()),
    )
    busy = free_port()
    with taken(busy):  # set explicitly and taken: a classified error naming the key
        refused = subprocess.run(
            [BIN / "cloudbridge", "relay", "serve", "--dev", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            env={**relay_env, "CLOUDBRIDGE_METRICS__PROMETHEUS_PORT": str(busy)},
            check=False,
            timeout=30,
        )
    assert refused.returncode == 1
    assert (
        f"error: metrics.prometheus_port {busy} on 127.0.0.1 is in use by another process"
        " (address_in_use)"
    ) in refused.stderr
    assert "Traceback" not in refused.stderr
    with taken(9465), taken(9464):  # the relay's and the client's defaults, both taken
        relay = subprocess.Popen(
            [BIN / "cloudbridge", "relay", "serve", "--dev", "--state-dir", str(state)],
            stderr=subprocess.PIPE,
            text=True,
            env=relay_env,
        )
        try:
            said = "\n".join(said_before(relay, "client config:"))
            assert "metrics_port_busy" in said
            served = re.search(r"metrics and probes: http://127\.0\.0\.1:(\d+)/metrics", said)
            assert served is not None, said
            assert int(served.group(1)) not in (9464, 9465)
            config = tmp_path / "client.yaml"
            written = yaml.safe_load((state / "client.yaml").read_text())
            assert "prometheus_port" not in (written.get("metrics") or {})
            config.write_text(yaml.safe_dump(written))
            env = environment(
                **background_env(tmp_path), CLOUDBRIDGE_AUTH__TOKEN=issue_token(state)
            )
            local = free_port()
            client = start(
                *("tunnel", "--config", str(config), "--local-port", str(local)),
                *("--remote-host", "127.0.0.1", "--remote-port", str(echo_port)),
                env=env,
                ready="tunnel 127.0.0.1:",
            )
            try:
                status = subprocess.run(
                    [BIN / "cloudbridge", "status", "--config", str(config)],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=False,
                    timeout=30,
                )
                assert status.returncode == 0, status.stderr
                shown = re.search(r"Metrics: +http://127\.0\.0\.1:(\d+)/metrics", status.stdout)
                assert shown is not None, status.stdout
                assert int(shown.group(1)) not in (9464, 9465, int(served.group(1)))
                # a client started in the foreground is found, not started twice
                up = cloudbridge("up", "--config", str(config), env=env)
                assert up.returncode == 0, up.stderr
                assert "a client for this config already runs" in up.stderr
                assert "connected to localhost via tls" in up.stderr
            finally:
                assert stop(client) == 0
        finally:
            assert stop(relay) == 0


def test_logout_forgets_the_token_in_the_keyring(tmp_path: Path) -> None:
    config = tmp_path / "client.yaml"
    config.write_text("relay:\n  host: relay.example.com\nauth:\n  token_storage: keyring\n")
    read = "import keyring, sys; print(keyring.get_password('cloudbridge', sys.argv[1]))"
    with secret_service(tmp_path / "home") as keyring_env:
        env = {**environment(), **keyring_env}
        for account, secret in (("relay.example.com", TOKEN), ("relay.example.com#refresh", "r")):
            stored = subprocess.run(
                [
                    *(
                        sys.executable,
                        "-c",
                        "import keyring, sys; keyring.set_password(*sys.argv[1:])",
                    ),
                    *("cloudbridge", account, secret),
                ],
                env=env,
                check=False,
            )
            assert stored.returncode == 0
        done = subprocess.run(
            [BIN / "cloudbridge", "logout", "--config", str(config)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert "forgot the token for relay.example.com (keyring" in done.stderr
        for account in ("relay.example.com", "relay.example.com#refresh"):
            left = subprocess.run(
                [sys.executable, "-c", read, account],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            assert left.stdout.strip() == "None"
