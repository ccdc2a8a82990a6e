"""Issue 18, the first hour of connecting: a taken port fails before anything connects, a
relay that is not there is named as such, a client waits for the relay instead of giving
up, Ctrl-C works in every phase, and the relay says once where it listens - each through
the real CLI."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from cli_process import BIN, environment, issue_token, start, stop
from cloudbridge_core.config.schema import cli_schema
from jsonschema import Draft202012Validator
from loopback import free_port

pytestmark = pytest.mark.timeout(60)

TRANSPORTS = ("tls", "websocket", "grpc", "quic")


def relay_env(ports: dict[str, int], **extra: str) -> dict[str, str]:
    """Every transport on its own free port (never a default another process may hold)."""
    return environment(
        **{
            "CLOUDBRIDGE_SERVER__LISTEN": "127.0.0.1",
            "CLOUDBRIDGE_SERVER__PUBLIC_HOST": "127.0.0.1",
            "CLOUDBRIDGE_SERVER__STUN_PORT": str(free_port()),
            "CLOUDBRIDGE_RELAY__HOST": "127.0.0.1",
            "CLOUDBRIDGE_METRICS__ENABLED": "false",
            **{f"CLOUDBRIDGE_TRANSPORT__{name.upper()}__PORT": str(p) for name, p in ports.items()},
            **extra,
        }
    )


def free_ports() -> dict[str, int]:
    return {name: free_port() for name in TRANSPORTS}


def cloudbridge(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    done = subprocess.run(
        [BIN / "cloudbridge", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=30,
    )
    return done, time.monotonic() - began


def tunnel_args(*extra: str) -> list[str]:
    return [
        "tunnel",
        "--local-port",
        "0",
        "--remote-host",
        "127.0.0.1",
        "--remote-port",
        "9",
        *extra,
    ]


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


@contextlib.contextmanager
def closing_server() -> Iterator[int]:
    """A port that takes connections and closes them at once: not a relay."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    running = True

    def serve() -> None:
        while running:
            with contextlib.suppress(OSError):
                connection, _ = server.accept()
                connection.close()  # before the TLS handshake: the empty reason of issue 18

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        running = False
        thread.join()
        server.close()


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[int, threading.Event]]:
    """A port that takes connections and never answers (a relay stuck mid-handshake), and
    an event set once a connection came."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    came = threading.Event()
    held: list[socket.socket] = []
    running = True

    def serve() -> None:
        while running:
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])
                came.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], came
    finally:
        running = False
        thread.join()
        for connection in held:
            connection.close()
        server.close()


def test_a_taken_local_port_fails_before_connecting() -> None:
    env = relay_env(free_ports(), CLOUDBRIDGE_TOKEN="not-even-read")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = tunnel_args()
        args[2] = str(port)
        done, took = cloudbridge(*args, env=env)
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{port} is already in use" in done.stderr
    assert f"hint: stop what listens on port {port}, or choose another --local-port" in done.stderr
    assert "(address_in_use)" in done.stderr
    assert "relay" not in done.stderr  # nothing tried to connect
    assert took < 5
    no_traceback(done.stderr)


def test_a_taken_local_port_of_a_peer_tunnel_fails_before_connecting() -> None:
    env = relay_env(free_ports(), CLOUDBRIDGE_TOKEN="not-even-read")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = ["tunnel", "--local-port", str(port), "--remote-peer", "server"]
        done, took = cloudbridge(*args, "--remote-port", "22", env=env)
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{port} is already in use: the peer tunnel to peer:server:22" in (done.stderr)
    assert "waiting for the relay" not in done.stderr  # nothing tried to connect
    assert took < 5
    no_traceback(done.stderr)


def test_a_token_without_tunnel_create_is_refused_before_connecting() -> None:
    def encoded(part: Mapping[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")

    claims = {"custom:permissions": ["relay:connect", "p2p:mesh"]}
    p2p_only = f"{encoded({'alg': 'RS256'})}.{encoded(claims)}.c2ln"
    done, took = cloudbridge(
        *tunnel_args(), env=relay_env(free_ports(), CLOUDBRIDGE_TOKEN=p2p_only)
    )
    assert done.returncode == 4, done.stderr
    assert "the token lacks the tunnel:create permission (it has: p2p:mesh, relay:connect)" in (
        done.stderr
    )
    assert "waiting for the relay" not in done.stderr  # refused before anything connects
    assert took < 5
    no_traceback(done.stderr)


def test_a_second_relay_on_the_same_ports_says_so(tmp_path: Path) -> None:
    ports = free_ports()
    port = str(free_port())
    metrics = {"CLOUDBRIDGE_METRICS__ENABLED": "true", "CLOUDBRIDGE_METRICS__PROMETHEUS_PORT": port}
    env = relay_env(ports, **metrics)
    serve = ("relay", "serve", "--dev", "--state-dir", str(tmp_path / "D"))
    first = start(*serve, env=env, ready="client config:")
    try:
        done, _ = cloudbridge(*serve, env=env)
        # its own transport ports, the same metrics port (set explicitly: no fallback)
        metrics_taken, _ = cloudbridge(*serve, env=relay_env(free_ports(), **metrics))
    finally:
        assert stop(first) == 0
    assert metrics_taken.returncode == 1, metrics_taken.stderr
    assert f"metrics.prometheus_port {port}" in metrics_taken.stderr
    assert "(address_in_use)" in metrics_taken.stderr
    no_traceback(metrics_taken.stderr)
    assert done.returncode == 1, done.stderr
    # the first transport that cannot listen is named, with the setting that moves it
    assert "the port is already in use (address_in_use)" in done.stderr
    assert "hint: is another relay running? stop it, or set transport." in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) <= 4, done.stderr
    no_traceback(done.stderr)


def test_no_relay_names_the_ports_and_a_wrong_port_gives_a_reason(tmp_path: Path) -> None:
    ports = free_ports()
    done, took = cloudbridge(*tunnel_args("--once"), env=relay_env(ports, CLOUDBRIDGE_TOKEN="x"))
    assert done.returncode == 5, done.stderr
    assert "error: nothing listens at 127.0.0.1 ports " in done.stderr
    for name, port in ports.items():
        assert f"{port} ({name})" in done.stderr
    assert "is the relay running?" in done.stderr
    assert "hint: start it (cloudbridge relay serve)" in done.stderr
    assert took < 5, "every transport was refused: no waiting for a timeout"
    no_traceback(done.stderr)
    joined, _ = cloudbridge(
        *("p2p", "--once", "--control-socket", str(tmp_path / "p2p.sock")),
        env=relay_env(ports, CLOUDBRIDGE_TOKEN="x"),
    )
    assert joined.returncode == 5, joined.stderr
    assert "is the relay running?" in joined.stderr

    with closing_server() as wrong:
        done, _ = cloudbridge(
            *tunnel_args("--once"),
            env=relay_env(
                {**ports, "tls": wrong}, CLOUDBRIDGE_TOKEN="x", CLOUDBRIDGE_TRANSPORT__MODE="tls"
            ),
        )
    assert done.returncode == 5, done.stderr
    assert f"error: tls: cannot connect to 127.0.0.1:{wrong}: the connection was" in done.stderr
    assert "not as a CloudBridge relay: check relay.host and transport.tls.port" in done.stderr
    no_traceback(done.stderr)

    with silent_server() as (silent, _):  # a host that is down, a firewall that drops
        done, _ = cloudbridge(
            *tunnel_args("--once"),
            env=relay_env(
                {**ports, "tls": silent},
                CLOUDBRIDGE_TOKEN="x",
                CLOUDBRIDGE_TRANSPORT__MODE="tls",
                CLOUDBRIDGE_TRANSPORT__CONNECT_TIMEOUT="1s",
            ),
        )
    assert done.returncode == 5, done.stderr
    assert done.stderr.splitlines() == [
        "error: no tls connection to the relay in 1s (timeout)",
        f"hint: nothing answered at 127.0.0.1:{silent}: a host that is down or a firewall that"
        " drops the packets looks like this; check relay.host and transport.tls.port",
    ]


def test_a_client_waits_for_the_relay_then_ctrl_c_exits_130(tmp_path: Path) -> None:
    state = tmp_path / "D"
    ports = free_ports()
    serve = ("relay", "serve", "--dev", "--state-dir", str(state))
    assert stop(start(*serve, env=relay_env(ports), ready="client config:")) == 0  # its CA
    token = issue_token(state)
    env = relay_env(
        ports,
        CLOUDBRIDGE_TOKEN=token,
        CLOUDBRIDGE_RELAY__TLS__CA_FILE=str(state / "ca.pem"),
        CLOUDBRIDGE_RETRY__INITIAL_DELAY="100ms",
        CLOUDBRIDGE_RETRY__MAX_DELAY="300ms",
        CLOUDBRIDGE_RETRY__PER_ERROR="{}",
    )
    sock = ("--control-socket", str(tmp_path / "client.sock"))
    client = start(*tunnel_args(*sock), env=env, ready="waiting for the relay: nothing listens")
    # while it waits, status says what for (the local port is already taken by then)
    waiting, _ = cloudbridge("status", "--json", *sock, env=env)
    assert waiting.returncode == 0, waiting.stderr
    document = json.loads(waiting.stdout)
    assert document["state"] == "connecting", document
    assert "nothing listens at 127.0.0.1" in document["last_error"], document
    relay = start(*serve, env=env, ready="client config:")
    try:
        # the drain thread of start() owns the client's stderr now: ask it, as users do
        deadline = time.monotonic() + 20
        while True:
            # listed from the start (bound before connecting); a transport once connected
            listed, _ = cloudbridge("tunnel", "list", "--json", *sock, env=env)
            if listed.returncode == 0 and json.loads(listed.stdout)["tunnels"][0]["transport"]:
                break
            assert client.poll() is None, "the client gave up"
            assert time.monotonic() < deadline, listed.stderr
            time.sleep(0.2)
        tunnels = json.loads(listed.stdout)
        Draft202012Validator(cli_schema("tunnel-list")).validate(tunnels)
        assert tunnels["tunnels"][0]["target"] == "127.0.0.1:9"
        client.send_signal(signal.SIGINT)
        assert client.wait(10) == 130  # a running client stopped by Ctrl-C
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        assert client.stderr is not None
        client.stderr.close()
        assert stop(relay) == 0


def test_ctrl_c_while_connecting_exits_130_at_once_and_sigterm_0(tmp_path: Path) -> None:
    env = relay_env(
        free_ports(),
        CLOUDBRIDGE_TOKEN="x",
        CLOUDBRIDGE_RETRY__INITIAL_DELAY="50ms",
        CLOUDBRIDGE_RETRY__MAX_DELAY="100ms",
        CLOUDBRIDGE_RETRY__PER_ERROR="{}",
    )
    sock = ("--control-socket", str(tmp_path / "client.sock"))
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 0)):
        client = subprocess.Popen(
            [BIN / "cloudbridge", *tunnel_args(*sock)], stderr=subprocess.PIPE, text=True, env=env
        )
        assert client.stderr is not None
        said = [client.stderr.readline()]
        assert said[0].startswith("waiting for the relay: nothing listens"), said
        time.sleep(1)  # retries: none of them may say it again
        began = time.monotonic()
        client.send_signal(sig)
        assert client.wait(10) == code
        assert time.monotonic() - began < 2
        said += client.stderr.read().splitlines(keepends=True)
        client.stderr.close()
        assert sum("waiting for the relay" in line for line in said) == 1, said
        # each endpoint's circuit opens once; its trial at every retry is not news
        assert sum("circuit_changed" in line for line in said) <= len(TRANSPORTS), said
        no_traceback("".join(said))


def test_ctrl_c_in_a_handshake_that_never_ends_exits_130_at_once(tmp_path: Path) -> None:
    with silent_server() as (port, connected):
        env = relay_env(
            {**free_ports(), "tls": port}, CLOUDBRIDGE_TOKEN="x", CLOUDBRIDGE_TRANSPORT__MODE="tls"
        )
        client = subprocess.Popen(
            [BIN / "cloudbridge", *tunnel_args("--control-socket", str(tmp_path / "c.sock"))],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert connected.wait(20), "the client never connected"
        began = time.monotonic()
        client.send_signal(signal.SIGINT)
        assert client.wait(10) == 130
        assert time.monotonic() - began < 2, "it waited for the connect timeout"
    assert client.stderr is not None
    said = client.stderr.read()
    client.stderr.close()
    no_traceback(said)
    assert said.splitlines()[-1] == "interrupted", said


def test_ctrl_c_while_the_cli_is_still_loading_exits_130_without_a_traceback(
    tmp_path: Path,
) -> None:
    # loading the CLI (click, jsonschema, the plugins) takes a few hundred milliseconds,
    # longer on a busy machine: these moments fall inside it, the last ones after it
    env = relay_env(free_ports(), CLOUDBRIDGE_TOKEN="x")
    for moment in (0.1, 0.2, 0.3, 0.45, 0.6, 2.0):
        client = subprocess.Popen(
            [BIN / "cloudbridge", *tunnel_args("--control-socket", str(tmp_path / "c.sock"))],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        time.sleep(moment)
        client.send_signal(signal.SIGINT)
        assert client.wait(10) == 130, moment
        assert client.stderr is not None
        said = client.stderr.read()
        client.stderr.close()
        no_traceback(said)
        assert said.splitlines()[-1] == "interrupted", (moment, said)


def test_each_relay_listener_is_announced_once(tmp_path: Path) -> None:
    # websocket left out: the websockets library's own "server listening" line is the
    # library-noise part of issue 18 (logging), not the relay's announcement
    ports = {name: free_port() for name in ("tls", "grpc", "quic")}
    env = relay_env(ports, CLOUDBRIDGE_DISABLE_PLUGINS="websocket")
    process = subprocess.Popen(
        [BIN / "cloudbridge", "relay", "serve", "--dev", "--state-dir", str(tmp_path / "D")],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "client config:" in line:
            break
    process.send_signal(signal.SIGTERM)
    lines += process.stderr.read().splitlines(keepends=True)
    process.stderr.close()
    assert process.wait(30) == 0
    for name, port in ports.items():
        mentions = [line for line in lines if f":{port}" in line or f"port={port}" in line]
        assert mentions == [f"relay listening: {name} on 127.0.0.1:{port}\n"], lines


def test_without_a_config_file_the_client_says_where_it_looked(tmp_path: Path) -> None:
    ports = free_ports()
    env = environment(
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        CLOUDBRIDGE_TOKEN="not.a.token",
        CLOUDBRIDGE_METRICS__ENABLED="false",
        # the default host, on ports nothing listens on: whatever runs on this machine
        **{f"CLOUDBRIDGE_TRANSPORT__{name.upper()}__PORT": str(p) for name, p in ports.items()},
    )
    done, _ = cloudbridge(*tunnel_args("--once"), env=env)
    assert done.returncode == 5, done.stderr
    looked = tmp_path / "config" / "cloudbridge" / "config.yaml"
    assert f"no config file (looked for {looked} and /etc/cloudbridge/config.yaml)" in done.stderr
    assert "'cloudbridge join URL' (an invite) or 'cloudbridge init'" in done.stderr
    named = environment(**env, CLOUDBRIDGE_RELAY__HOST="127.0.0.1")
    done, _ = cloudbridge(*tunnel_args("--once"), env=named)
    assert "no config file" not in done.stderr  # a relay named anywhere is what was meant
    no_traceback(done.stderr)


#: what a new user must not read in a client's terminal at the default level: a library's
#: internals (aioice's ICE checks, aioquic's version and ALPN of each peer session, logged
#: as component "quic"), asyncio's own complaints, tracebacks
LIBRARY_NOISE = re.compile(
    r"component=(aioice|aioquic|quic|http3)\b|socket\.send\(\) raised|Exception in callback"
    r"|never retrieved|Traceback"
)


def test_two_peers_meet_and_their_terminals_stay_quiet(tmp_path: Path) -> None:
    state = tmp_path / "D"
    env = relay_env({"tls": free_port()}, CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc,websocket")
    relay = start(
        *("relay", "serve", "--dev", "--state-dir", str(state)), env=env, ready="client config:"
    )
    peers: dict[str, subprocess.Popen[str]] = {}
    try:
        token = issue_token(state, "p2p:mesh")
        sockets = {name: tmp_path / f"{name}.sock" for name in ("alpha", "beta")}
        logs = {name: tmp_path / f"{name}.log" for name in sockets}
        for name, control in sockets.items():
            # a config file each: a device's key is kept per config, and two devices of a
            # tenant may not share one
            config = tmp_path / f"{name}.yaml"
            config.write_text((state / "client.yaml").read_text())
            with logs[name].open("w") as log:
                peers[name] = subprocess.Popen(
                    [
                        *(BIN / "cloudbridge", "p2p", "--config", str(config)),
                        *("--control-socket", str(control)),
                    ],
                    stderr=log,
                    text=True,
                    env={
                        **env,
                        "CLOUDBRIDGE_TOKEN": token,
                        "CLOUDBRIDGE_P2P__NAME": name,
                        "XDG_STATE_HOME": str(tmp_path / "state"),
                    },
                )
        alpha = ("--control-socket", str(sockets["alpha"]))
        deadline = time.monotonic() + 30
        while True:
            shown, _ = cloudbridge("status", "--json", *alpha, env=env)
            met = shown.returncode == 0 and any(
                peer["name"] == "beta" and peer["connected"]
                for peer in json.loads(shown.stdout)["peers"]
            )
            if met:
                break
            exited = [name for name, p in peers.items() if p.poll() is not None]
            assert not exited, "\n".join(logs[name].read_text() for name in exited)
            assert time.monotonic() < deadline, shown.stdout + shown.stderr
            time.sleep(0.2)
        pong, _ = cloudbridge("ping", "beta", "--json", *alpha, env=env)
        assert pong.returncode == 0, pong.stderr
        answer = json.loads(pong.stdout)
        Draft202012Validator(cli_schema("ping")).validate(answer)
        assert answer["peer"] == "beta"
        explained, _ = cloudbridge("status", "--explain", "beta", "--json", *alpha, env=env)
        assert explained.returncode == 0, explained.stderr
        why = json.loads(explained.stdout)
        Draft202012Validator(cli_schema("status-explain")).validate(why)
        assert {attempt["strategy"] for attempt in why["attempts"]} >= {"ice", "derp"}
        for process in peers.values():
            process.send_signal(signal.SIGINT)
        assert [process.wait(10) for process in peers.values()] == [130, 130]
    finally:
        for process in peers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        assert stop(relay) == 0
    for name, log in logs.items():
        said = log.read_text().splitlines()
        assert f"in the mesh as {name}" in "\n".join(said), said
        noisy = [line for line in said if LIBRARY_NOISE.search(line)]
        assert not noisy, "\n".join(noisy)
        failures = [line for line in said if "path_attempt_failed" in line]
        strategies = [re.search(r"strategy=(\w+)", line) for line in failures]
        assert len(failures) == len({s.group(1) for s in strategies if s}), failures
