"""Issue 18, the first hour: global flags in either position, did-you-mean, up-front checks
of permissions and tokens, and what ``health`` says - each through the real CLI."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cli_process import BIN, environment, issue_token, run_without_keyring, start, stop
from cloudbridge_core.client.tokens import require_permission
from cloudbridge_core.errors import Unauthorized
from cloudbridge_core.relay import mesh, server
from cloudbridge_core.relay.console import actions as console_actions
from cloudbridge_core.relay.tokens import PERMISSIONS
from loopback import free_port

pytestmark = pytest.mark.timeout(60)


def cloudbridge(
    *args: str, cwd: Path | None = None, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    return run_without_keyring(*args, env=env, cwd=cwd, stdin=stdin)


@dataclass
class Relay:
    state: Path
    tls_port: int
    websocket_port: int

    @property
    def client_config(self) -> Path:
        return self.state / "client.yaml"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A relay on tls and websocket whose ports come from its config file, not defaults."""
    home = tmp_path_factory.mktemp("relay")
    tls_port, websocket_port = free_port(), free_port()
    config = home / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"listen": "127.0.0.1", "public_host": "127.0.0.1"},
                "transport": {"tls": {"port": tls_port}, "websocket": {"port": websocket_port}},
                "metrics": {"enabled": False},
            }
        )
    )
    env = environment(CLOUDBRIDGE_DISABLE_PLUGINS="quic,grpc")
    serving = start(
        *("relay", "serve", "--dev", "--config", str(config), "--state-dir", str(home / "D")),
        env=env,
        ready="client config:",
    )
    try:
        yield Relay(home / "D", tls_port, websocket_port)
    finally:
        assert stop(serving) == 0


def client_config(relay: Relay, directory: Path, **extra: object) -> Path:
    """The relay's client.yaml with ``extra`` sections, quic and grpc left out."""
    document = yaml.safe_load(relay.client_config.read_text())
    for name in ("quic", "grpc"):
        document["transport"].pop(name, None)
    document["plugins"] = {"disabled": ["quic", "grpc"]}
    document.update(extra)
    path = directory / "client.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


# ---- 1. global flags before or after the subcommand ------------------------------------------


def test_global_flags_work_after_the_subcommand(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a.b.c\n")
    token_file.chmod(0o600)
    config = tmp_path / "config.yaml"
    config.write_text("relay:\n  host: relay.test\n")
    for args in (
        ("--token-file", str(token_file), "config", "show", "--origin"),
        ("config", "show", "--origin", "--token-file", str(token_file)),
        ("config", "show", "--config", str(config), "--origin", "--token-stdin"),
    ):
        shown = cloudbridge(*args, stdin="a.b.c\n")
        assert shown.returncode == 0, shown.stderr
        assert "auth.token = <redacted>  # flag --token-" in shown.stdout
    after = cloudbridge("config", "show", "--config", str(config), "--json", "-q")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["config"]["relay"]["host"] == "relay.test"
    before = cloudbridge("--json", "config", "path", "--config", str(config))
    assert json.loads(before.stdout)["path"] == str(config)
    # the token flags of the issue's report: no "No such option" any more
    p2p = cloudbridge("p2p", "--token-file", str(token_file), "--config", str(tmp_path / "no"))
    assert p2p.returncode == 3, p2p.stderr
    assert "No such option" not in p2p.stderr
    assert "config file not found" in p2p.stderr
    both = cloudbridge("--token-file", str(token_file), "config", "show", "--token-stdin")
    assert both.returncode == 2
    assert "--token-file and --token-stdin both give the token" in both.stderr
    # --json after the command: the error as one JSON line
    failed = cloudbridge("config", "show", "--config", str(tmp_path / "no"), "--json")
    assert failed.returncode == 3
    assert json.loads(failed.stderr)["error"]["code"] == "config_invalid"
    # tracebacks only with --debug, in either position
    quiet = cloudbridge("config", "show", "--config", str(tmp_path / "no"))
    assert "Traceback" not in quiet.stderr
    assert len(quiet.stderr.strip().splitlines()) <= 3
    for debug in (("--debug", "config", "show"), ("config", "show", "--debug")):
        debugged = cloudbridge(*debug, "--config", str(tmp_path / "no"))
        assert debugged.returncode == 3
        assert "Traceback" in debugged.stderr


# ---- 2. did-you-mean -----------------------------------------------------------------------


def test_a_misspelled_command_gets_a_suggestion() -> None:
    typo = cloudbridge("stauts")
    assert typo.returncode == 2
    assert "No such command 'stauts'. Did you mean 'status'?" in typo.stderr
    nested = cloudbridge("relay", "tokn", "issue")
    assert nested.returncode == 2
    assert "No such command 'tokn'. Did you mean 'token'?" in nested.stderr
    unknown = cloudbridge("frobnicate")
    assert unknown.returncode == 2
    assert "No such command 'frobnicate'" in unknown.stderr


# ---- 3. up-front checks ----------------------------------------------------------------------


def test_token_issue_takes_only_known_permissions(relay: Relay) -> None:
    issue = ("relay", "token", "issue", "--state-dir", str(relay.state), "--tenant", "acme")
    none = cloudbridge(*issue, "--subject", "laptop")
    assert none.returncode == 2
    assert none.stdout == ""
    assert "--permission: give at least one" in none.stderr
    assert "relay:connect, tunnel:create, p2p:mesh" in none.stderr
    typo = cloudbridge(
        *(*issue, "--subject", "laptop", "--permission", "relay:connect"),
        *("--permission", "tunel:create"),
    )
    assert typo.returncode == 2
    assert typo.stdout == ""
    assert "'tunel:create' is not a permission the relay knows" in typo.stderr
    assert "did you mean 'tunnel:create'?" in typo.stderr
    invite = cloudbridge(
        *("relay", "invite", "create", "--state-dir", str(relay.state), "--tenant", "acme"),
        *("--permission", "p2p:mesch"),
    )
    assert invite.returncode == 2
    assert "'p2p:mesch' is not a permission" in invite.stderr


def test_the_server_checks_no_permission_token_issue_does_not_know() -> None:
    assert {server.CONNECT, server.TUNNEL, mesh.P2P, console_actions.ADMIN} == set(PERMISSIONS)


def test_a_client_can_refuse_a_tunnel_its_token_does_not_allow() -> None:
    def encode(document: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")

    def jwt(claims: dict[str, object]) -> str:
        return f"{encode({'alg': 'RS256'})}.{encode(claims)}.c2ln"

    p2p_only = jwt({"custom:permissions": ["relay:connect", "p2p:mesh"]})
    with pytest.raises(Unauthorized) as refused:
        require_permission(p2p_only, "tunnel:create", "a tunnel")
    assert refused.value.code == "unauthorized"
    assert refused.value.exit_code == 4
    assert "the token lacks the tunnel:create permission (it has: p2p:mesh, relay:connect)" in (
        refused.value.message
    )
    assert "--permission tunnel:create" in (refused.value.hint or "")
    require_permission(jwt({"custom:permissions": ["tunnel:create"]}), "tunnel:create", "a tunnel")
    require_permission(jwt({"sub": "x"}), "tunnel:create", "a tunnel")  # only the relay knows


def test_health_says_when_the_token_cannot_create_tunnels(relay: Relay, tmp_path: Path) -> None:
    token = issue_token(relay.state)  # relay:connect and tunnel:create
    p2p_only = subprocess.run(
        [
            *(BIN / "cloudbridge", "relay", "token", "issue", "--state-dir", str(relay.state)),
            *("--tenant", "acme", "--subject", "laptop"),
            *("--permission", "relay:connect", "--permission", "p2p:mesh"),
        ],
        capture_output=True,
        text=True,
        env=environment(),
        check=True,
    ).stdout.strip()
    tunnels = [{"local_port": free_port(), "remote_host": "127.0.0.1", "remote_port": 9}]
    config = client_config(relay, tmp_path, tunnels=tunnels)
    checked = cloudbridge("health", "--config", str(config), CLOUDBRIDGE_TOKEN=p2p_only)
    assert checked.returncode == 0, checked.stderr  # degraded still answers
    assert "Status:     degraded" in checked.stdout
    assert "the token lacks the tunnel:create permission" in checked.stdout
    assert "Allows:     p2p:mesh, relay:connect" in checked.stdout
    fine = cloudbridge("--json", "health", "--config", str(config), CLOUDBRIDGE_TOKEN=token)
    document = json.loads(fine.stdout)
    assert document["status"] == "healthy", document
    assert "tunnel:create" in document["details"]["authentication"]["permissions"]


def test_init_refuses_a_token_that_is_no_jwt_or_that_the_relay_refuses(
    relay: Relay, tmp_path: Path
) -> None:
    flags = (
        *("init", "--non-interactive", "--relay-host", "127.0.0.1", "--transport", "tls"),
        *("--relay-port", str(relay.tls_port), "--ca-file", str(relay.state / "ca.pem")),
        *("--auth", "jwt", "--token-stdin", "--insecure-storage", "--no-metrics", "--no-service"),
    )
    garbage = cloudbridge(*flags, "--config-dir", str(tmp_path / "g"), stdin="garbage\n")
    assert garbage.returncode == 2
    assert "--token-stdin: this is not a JWT" in garbage.stderr
    assert not (tmp_path / "g").exists()
    # a JWT signed by no key the relay trusts
    forged = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    refused = cloudbridge(*flags, "--config-dir", str(tmp_path / "f"), stdin=forged + "\n")
    assert refused.returncode == 4, refused.stderr
    assert "the relay at 127.0.0.1 refused the connection" in refused.stderr
    assert not (tmp_path / "f" / "config.yaml").exists()
    good = cloudbridge(
        *flags, "--config-dir", str(tmp_path / "ok"), stdin=issue_token(relay.state) + "\n"
    )
    assert good.returncode == 0, good.stderr
    assert "the relay at 127.0.0.1 accepted the token" in good.stderr


# ---- 4. health ----------------------------------------------------------------------------


def test_health_words_exit_codes_and_silent_checks(relay: Relay, tmp_path: Path) -> None:
    config = client_config(relay, tmp_path)
    # no token, no keyring: an auth failure (4), the keyring not named by its class
    missing = cloudbridge("health", "--config", str(config))
    assert missing.returncode == 4, missing.stdout + missing.stderr
    assert "fail Keyring" not in missing.stdout + missing.stderr
    assert "no keyring backend is available" in missing.stdout
    assert cloudbridge("health", "--config", str(config), "--check", "ready").returncode == 4

    token_file = tmp_path / "token"
    token_file.write_text(issue_token(relay.state))
    token_file.chmod(0o644)
    healthy = cloudbridge("health", "--config", str(config), "--token-file", str(token_file))
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "expires in 23h 59m" in healthy.stdout
    assert f"warning: {token_file} is readable by others" in healthy.stderr
    assert f"chmod 600 {token_file}" in healthy.stderr

    # a probe prints nothing, not even the warnings about how its token was given
    for check in ("live", "ready"):
        for given in (
            ("--token-file", str(token_file)),
            ("--token", token_file.read_text()),
        ):
            for args in (
                ("health", "--config", str(config), "--check", check, *given),
                (*given, "health", "--config", str(config), "--check", check),
            ):
                silent = cloudbridge(*args)
                assert (silent.returncode, silent.stdout, silent.stderr) == (0, "", ""), args
    broken = tmp_path / "broken.yaml"
    broken.write_text("relay: [\n")
    invalid = cloudbridge("health", "--config", str(broken), "--check", "live")
    assert (invalid.returncode, invalid.stdout, invalid.stderr) == (3, "", "")


# ---- 5. invites name the port the relay serves ---------------------------------------------


def test_invite_create_without_config_names_the_served_port(relay: Relay, tmp_path: Path) -> None:
    created = cloudbridge(
        *("relay", "invite", "create", "--state-dir", str(relay.state), "--tenant", "acme"),
        cwd=tmp_path,  # no config file here: only defaults, whose tls port is not the relay's
    )
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith(f"cloudbridge://127.0.0.1:{relay.tls_port}/join?")


# ---- 6. a port that speaks TLS but is not the transport's -----------------------------------


def test_a_tls_port_of_another_transport_is_named_as_a_likely_cause(
    relay: Relay, tmp_path: Path
) -> None:
    config = client_config(relay, tmp_path)
    mixed_up = cloudbridge(
        *("tunnel", "--config", str(config), "--local-port", "0", "--once"),
        *("--remote-host", "127.0.0.1", "--remote-port", "9"),
        CLOUDBRIDGE_TOKEN=issue_token(relay.state),
        CLOUDBRIDGE_TRANSPORT__MODE="tls",
        CLOUDBRIDGE_TRANSPORT__TLS__PORT=str(relay.websocket_port),  # the websocket listener
        CLOUDBRIDGE_TRANSPORT__CONNECT_TIMEOUT="1s",
    )
    assert mixed_up.returncode == 5, mixed_up.stderr
    said = mixed_up.stderr.splitlines()
    assert said[0].startswith("error: the relay took the tls connection but sent no answer"), said
    assert said[1:] == [
        "hint: is transport.tls.port the port the relay prints for tls?"
        " (a relay too busy to answer looks alike)"
    ]


def test_a_missing_or_forbidden_path_is_one_classified_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    missing = cloudbridge("relay", "serve", "--state-dir", str(tmp_path / "a-file" / "state"))
    assert missing.returncode == 1, missing.stderr
    assert missing.stderr.splitlines() == [
        f"error: no such file or directory: {tmp_path / 'a-file' / 'state'} (file_missing)",
        "hint: check the path (given on the command line or in the config)",
    ]
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the CLI as a user who may not read the path")
    forbidden = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
            *(BIN / "cloudbridge", "--json", "relay", "serve", "--state-dir", tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        env=environment(HOME=str(tmp_path)),
        check=False,
        timeout=30,
    )
    assert forbidden.returncode == 1, forbidden.stderr
    (line,) = forbidden.stderr.splitlines()
    error = json.loads(line)["error"]
    assert error["code"] == "permission_denied", error
    assert error["message"].startswith(f"permission denied: {tmp_path}"), error
