"""Issue 19, token revocation: ``cloudbridge relay token revoke`` against a running relay
process and real clients - open sessions end with invalid_token, new hellos are refused."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cli_process import BIN, environment, run_without_keyring, start, stop
from cloudbridge_core.config.schema import cli_schema
from cloudbridge_core.errors import InvalidToken
from cloudbridge_core.relay.cluster.store import Revocation
from cloudbridge_core.testing.waiting import until
from jsonschema import Draft202012Validator
from loopback import free_port
from relaybed import Bed, echo_server, run

pytestmark = pytest.mark.timeout(90)

#: a revocation reaches the relay within its poll (1 s) and ends the session at once: this
#: only bounds how long a broken relay keeps the test waiting
SESSION_END_BOUND = 30.0
PLUGINS_OFF = "quic,grpc"


@dataclass
class Relay:
    state: Path
    client_config: Path


@dataclass
class Issued:
    token: str
    token_id: str


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    home = tmp_path_factory.mktemp("relay")
    config = home / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"listen": "127.0.0.1", "public_host": "127.0.0.1"},
                "transport": {"tls": {"port": free_port()}, "websocket": {"port": free_port()}},
                "metrics": {"enabled": False},
            }
        )
    )
    serving = start(
        *("relay", "serve", "--dev", "--config", str(config), "--state-dir", str(home / "D")),
        env=environment(CLOUDBRIDGE_DISABLE_PLUGINS=PLUGINS_OFF),
        ready="client config:",
    )
    document = yaml.safe_load((home / "D" / "client.yaml").read_text())
    for name in ("quic", "grpc"):
        document["transport"].pop(name, None)
    document["plugins"] = {"disabled": ["quic", "grpc"]}
    document["metrics"] = {"enabled": False}
    client_config = home / "client.yaml"
    client_config.write_text(yaml.safe_dump(document))
    try:
        yield Relay(home / "D", client_config)
    finally:
        assert stop(serving) == 0


def cloudbridge(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_without_keyring(*args, env={"CLOUDBRIDGE_DISABLE_PLUGINS": PLUGINS_OFF})


def issue(relay: Relay, tenant: str, subject: str) -> Issued:
    issued = cloudbridge(
        *("relay", "token", "issue", "--state-dir", relay.state, "--tenant", tenant),
        *("--subject", subject, "--permission", "relay:connect", "--permission", "tunnel:create"),
    )
    assert issued.returncode == 0, issued.stderr
    [token_id] = [
        line.removeprefix("token id: ")
        for line in issued.stderr.splitlines()
        if line.startswith("token id: ")
    ]
    return Issued(issued.stdout.strip(), token_id)


def revoke(relay: Relay, *args: str) -> subprocess.CompletedProcess[str]:
    return cloudbridge("relay", "token", "revoke", "--state-dir", relay.state, *args)


def health(relay: Relay, token: str) -> subprocess.CompletedProcess[str]:
    """One connect with ``token``: exit 0 when the relay takes it, 4 when it refuses."""
    return run_without_keyring(
        *("health", "--config", relay.client_config),
        env={"CLOUDBRIDGE_DISABLE_PLUGINS": PLUGINS_OFF, "CLOUDBRIDGE_AUTH__TOKEN": token},
    )


class Tunnel:
    """A running ``cloudbridge tunnel``, its messages in a file to read while it runs."""

    def __init__(self, relay: Relay, token: str, directory: Path) -> None:
        self.log = directory / "tunnel.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [
                    *(BIN / "cloudbridge", "tunnel", "--config", relay.client_config),
                    *("--control-socket", directory / "tunnel.sock"),
                    *("--local-port", str(free_port()), "--remote-host", "127.0.0.1"),
                    *("--remote-port", str(free_port())),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
                env=environment(
                    CLOUDBRIDGE_AUTH__TOKEN=token, CLOUDBRIDGE_DISABLE_PLUGINS=PLUGINS_OFF
                ),
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + SESSION_END_BOUND
        while "tunnel 127.0.0.1:" not in self.output():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def exit_code(self) -> int:
        """How it ended (bounded: a session a revocation missed fails the test here)."""
        try:
            return self.process.wait(timeout=SESSION_END_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the tunnel still runs after the revocation:\n{self.output()}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def tunnels(tmp_path: Path) -> Iterator[list[Tunnel]]:
    running: list[Tunnel] = []
    yield running
    for tunnel in running:
        tunnel.close()


def open_tunnel(relay: Relay, token: str, directory: Path, tunnels: list[Tunnel]) -> Tunnel:
    directory.mkdir()
    tunnel = Tunnel(relay, token, directory)
    tunnels.append(tunnel)
    tunnel.wait_until_serving()
    return tunnel


def next_second() -> None:
    """Wait until the clock is in the next whole second: ``iat`` counts whole seconds, and
    a subject's revocation covers the tokens issued in its own second too."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)


def test_revoking_a_token_ends_its_session_and_refuses_it_again(
    relay: Relay, tmp_path: Path, tunnels: list[Tunnel]
) -> None:
    revoked = issue(relay, "acme", "laptop")
    kept = issue(relay, "acme", "laptop")  # same subject, another token: untouched
    doomed = open_tunnel(relay, revoked.token, tmp_path / "doomed", tunnels)
    survivor = open_tunnel(relay, kept.token, tmp_path / "survivor", tunnels)
    done = revoke(relay, "--tenant", "acme", "--id", revoked.token_id, "--json")
    assert done.returncode == 0, done.stderr
    assert f"revoked token {revoked.token_id} of tenant acme" in done.stderr
    document = json.loads(done.stdout)
    Draft202012Validator(cli_schema("relay-token-revoke")).validate(document)
    assert (document["tenant"], document["token_id"]) == ("acme", revoked.token_id)
    # the open session ends with the classified error, and the client gives up on the token
    assert doomed.exit_code() == 4, doomed.output()
    assert "the token has been revoked (invalid_token)" in doomed.output()
    assert "hint: get a new token" in doomed.output()
    # a new connect with it is refused; the other token of the subject still serves
    refused = health(relay, revoked.token)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "the token has been revoked" in refused.stdout + refused.stderr
    assert survivor.process.poll() is None, survivor.output()
    assert health(relay, kept.token).returncode == 0
    assert revoked.token not in done.stdout + done.stderr + doomed.output()


def test_a_subject_revocation_covers_tokens_issued_before_it_and_one_tenant_only(
    relay: Relay, tmp_path: Path, tunnels: list[Tunnel]
) -> None:
    before = issue(relay, "acme", "build-box")
    other_tenant = issue(relay, "globex", "build-box")
    doomed = open_tunnel(relay, before.token, tmp_path / "doomed", tunnels)
    neighbour = open_tunnel(relay, other_tenant.token, tmp_path / "neighbour", tunnels)
    next_second()
    done = revoke(relay, "--tenant", "acme", "--subject", "build-box")
    assert done.returncode == 0, done.stderr
    assert "the tokens of subject 'build-box' issued so far" in done.stderr
    assert doomed.exit_code() == 4, doomed.output()
    assert "the token has been revoked (invalid_token)" in doomed.output()
    next_second()
    after = issue(relay, "acme", "build-box")
    assert health(relay, after.token).returncode == 0
    assert health(relay, before.token).returncode == 4
    assert neighbour.process.poll() is None, neighbour.output()
    assert health(relay, other_tenant.token).returncode == 0
    listed = cloudbridge("relay", "token", "revocations", "--state-dir", relay.state, "--json")
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    Draft202012Validator(cli_schema("relay-token-revocations")).validate(document)
    [row] = [r for r in document["revocations"] if r["subject"] == "build-box"]
    assert (row["tenant"], row["token_id"]) == ("acme", None)
    table = cloudbridge("relay", "token", "revocations", "--state-dir", relay.state)
    assert "subject build-box" in table.stdout
    # revoked again: now the token issued after the first revocation goes too
    again = open_tunnel(relay, after.token, tmp_path / "again", tunnels)
    assert revoke(relay, "--tenant", "acme", "--subject", "build-box").returncode == 0
    assert again.exit_code() == 4, again.output()
    assert "the token has been revoked (invalid_token)" in again.output()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--tenant", "acme", "--id", "abc", "--subject", "laptop"), "--id and --subject"),
        (("--tenant", "acme"), "--id and --subject"),
        (("--tenant", "Not A Tenant", "--id", "abc"), "--tenant"),
        (("--tenant", "acme", "--id", "x" * 300), "--id"),
        (("--tenant", "acme", "--subject", ""), "--subject"),
    ],
    ids=["both", "neither", "bad-tenant", "long-id", "empty-subject"],
)
def test_bad_revoke_input_is_a_usage_error_naming_the_flag(
    tmp_path: Path, args: tuple[str, ...], named: str
) -> None:
    state = tmp_path / "D"
    state.mkdir()
    refused = cloudbridge("relay", "token", "revoke", "--state-dir", state, *args)
    assert refused.returncode == 2, refused.stderr
    assert named in refused.stderr
    assert not (state / "revocations.json").exists()


def test_revoking_needs_the_relays_state_directory(tmp_path: Path) -> None:
    refused = revoke(Relay(tmp_path / "missing", tmp_path), "--tenant", "acme", "--id", "abc")
    assert refused.returncode == 2, refused.stderr
    assert f"no relay state in {tmp_path / 'missing'}" in refused.stderr


def jti_of(token: str) -> str:
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


def test_a_refresh_with_a_revoked_token_is_refused_and_the_session_keeps_its_own(
    tmp_path: Path,
) -> None:
    async def scenario(bed: Bed) -> None:
        async with echo_server() as port:
            session = await bed.connect(bed.token())
            revoked = bed.token()  # the same tenant and subject: a refresh would take it
            now = time.time()
            revocation = Revocation("acme", now, now + 3600, token_id=jti_of(revoked))
            await bed.relay.relay.cluster.revoke(revocation)  # as relay token revoke does
            await until(lambda: len(bed.relay.relay.revocations) == 1)
            with pytest.raises(InvalidToken, match="the token has been revoked"):
                await session.refresh(revoked, 5)
            stream, _ = await session.open_tunnel(f"127.0.0.1:{port}")
            await stream.write(b"still here")
            assert await stream.read() == b"still here"
            await stream.aclose()
            await session.aclose()

    run(tmp_path, scenario)
