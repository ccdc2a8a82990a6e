"""A serving relay follows its config file: egress, limits, metrics labels and auth keys
apply to what comes next without dropping a session or an open tunnel; a section the
relay cannot use is refused alone; what needs a restart is logged as such."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from cli_process import BIN, environment
from cloudbridge_core.config import Config, load_config, merged_schema
from cloudbridge_core.config.reload import ConfigWatcher
from cloudbridge_core.errors import EgressDenied, InvalidToken, LimitExceeded
from cloudbridge_core.plugins import PluginSelection, load_plugins
from cloudbridge_core.providers import Stream
from cloudbridge_core.relay.live import follow
from cloudbridge_core.relay.runner import start_relay
from cloudbridge_core.relay.tokens import AUDIENCE, generate_signing_key, issue_token, public_pem
from loopback import free_port
from relaybed import BOTH, Bed, echo_server

pytestmark = pytest.mark.timeout(60)
ISSUER = "https://issuer.test"


@dataclass
class Live:
    """A relay serving in this event loop, following ``path`` as ``relay serve`` does."""

    bed: Bed
    watcher: ConfigWatcher
    path: Path
    settings: dict[str, Any]

    async def edit(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Change the file as an editor saving atomically does; wait for the reload."""
        attempted = self.watcher.applied + self.watcher.rejected
        change(self.settings)
        saved = self.path.with_name("config.yaml.saving")
        saved.write_text(json.dumps(self.settings))
        os.replace(saved, self.path)
        await self.watcher.wait_attempts(attempted + 1)


@asynccontextmanager
async def serving(tmp_path: Path, settings: dict[str, Any]) -> AsyncIterator[Live]:
    # the built-in TLS transport and the jwt plugin: nothing else is needed here
    plugins = load_plugins(PluginSelection(allow=frozenset({"jwt"})))
    schema = merged_schema(plugins.config_sections())
    path = tmp_path / "etc" / "config.yaml"
    path.parent.mkdir()
    server = {"listen": "127.0.0.1", "state_dir": str(tmp_path / "state")}
    settings = {**settings, "server": {**server, **settings.get("server", {})}}
    path.write_text(json.dumps(settings))

    def load() -> Config:
        return load_config(path, environ={}, schema=schema)

    config = load()
    running = await start_relay(config, plugins, dev=True, port_override=0)
    try:
        async with follow(running, config, plugins, load, path, dev=True) as watcher:
            yield Live(Bed(running, plugins, tmp_path / "state"), watcher, path, settings)
    finally:
        await running.aclose()


async def echoed(stream: Stream, payload: bytes) -> bytes:
    await stream.write(payload)
    received = b""
    while len(received) < len(payload):
        received += await stream.read()
    return received


def test_an_egress_rule_added_denies_new_tunnels_and_open_ones_still_echo(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with serving(tmp_path, {}) as live, echo_server() as target:
            connection = await live.bed.connect()
            opened, _ = await connection.open_tunnel(f"127.0.0.1:{target}")
            assert await echoed(opened, b"before the reload") == b"before the reload"

            def deny(settings: dict[str, Any]) -> None:
                settings["server"]["egress"] = {"deny": [f"127.0.0.1:{target}"]}

            await live.edit(deny)
            with pytest.raises(EgressDenied, match="denied by the relay's egress policy"):
                await connection.open_tunnel(f"127.0.0.1:{target}")
            assert await echoed(opened, b"after the reload") == b"after the reload"
            await opened.close_write()
            await connection.aclose()

    asyncio.run(main())


def test_a_reloaded_egress_policy_still_denies_the_relays_own_ports(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, {}) as live, echo_server() as target:
            connection = await live.bed.connect()
            own = live.bed.relay.listeners["tls"].port

            def allow(settings: dict[str, Any]) -> None:
                settings["server"]["egress"] = {"allow": ["127.0.0.0/8", "localhost"]}

            await live.edit(allow)
            assert live.watcher.applied == 1
            with pytest.raises(EgressDenied, match="the relay itself"):
                await connection.open_tunnel(f"localhost:{own}")
            opened, _ = await connection.open_tunnel(f"127.0.0.1:{target}")
            assert await echoed(opened, b"still served") == b"still served"
            await opened.close_write()
            await connection.aclose()

    asyncio.run(main())


def test_lowered_session_limit_refuses_the_next_session_and_keeps_the_open_ones(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with serving(tmp_path, {"server": {"max_sessions_per_tenant": 3}}) as live:
            relay = live.bed.relay.relay
            first, second = await live.bed.connect(), await live.bed.connect()
            registry = relay.metrics.registry
            by_tenant = ("cloudbridge_relay_tenant_sessions", {"tenant_id": "acme"})
            assert registry.get_sample_value(*by_tenant) is None

            def lower(settings: dict[str, Any]) -> None:
                settings["server"].update(max_sessions_per_tenant=1, handshake_timeout="2s")
                settings["metrics"] = {"tenant_labels": True}

            await live.edit(lower)
            with pytest.raises(LimitExceeded, match="already holds 1 sessions"):
                await live.bed.connect()
            for kept in (first, second):
                await kept.ping(5)
            assert relay.sessions_by_tenant["acme"] == 2
            assert relay.limits.handshake_timeout == 2.0
            assert registry.get_sample_value(*by_tenant) == 2
            await first.aclose()
            await second.aclose()

    asyncio.run(main())


def jwt_settings(key_file: Path) -> dict[str, Any]:
    return {"public_key_file": str(key_file), "issuer": ISSUER, "audience": AUDIENCE}


def signed_by(private_pem: bytes) -> str:
    return issue_token(
        private_pem, issuer=ISSUER, tenant="acme", subject="laptop", permissions=BOTH, ttl=3600
    )


def key_files(tmp_path: Path) -> tuple[tuple[bytes, Path], tuple[bytes, Path]]:
    keys = tmp_path / "keys"
    keys.mkdir()
    pairs = []
    for name in ("old", "new"):
        private = generate_signing_key()
        (keys / f"{name}.pem").write_bytes(public_pem(private))
        pairs.append((private, keys / f"{name}.pem"))
    return pairs[0], pairs[1]


def test_a_rotated_jwt_key_validates_new_hellos_and_sessions_made_before_stay(
    tmp_path: Path,
) -> None:
    (old_key, old_file), (new_key, new_file) = key_files(tmp_path)

    async def main() -> None:
        async with (
            serving(tmp_path, {"auth": {"jwt": jwt_settings(old_file)}}) as live,
            echo_server() as target,
        ):
            established = await live.bed.connect(signed_by(old_key))
            with pytest.raises(InvalidToken):
                await live.bed.connect(signed_by(new_key))

            def rotate(settings: dict[str, Any]) -> None:
                settings["auth"]["jwt"]["public_key_file"] = str(new_file)

            await live.edit(rotate)
            rotated = await live.bed.connect(signed_by(new_key))
            with pytest.raises(InvalidToken):
                await live.bed.connect(signed_by(old_key))
            await established.ping(5)
            stream, _ = await established.open_tunnel(f"127.0.0.1:{target}")
            assert await echoed(stream, b"made with the old key") == b"made with the old key"
            await stream.close_write()
            await rotated.aclose()
            await established.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("unusable", ["not-a-key.pem", "private.pem"])
def test_an_auth_section_the_provider_rejects_is_refused_and_the_old_one_keeps_working(
    tmp_path: Path, unusable: str
) -> None:
    (old_key, old_file), _ = key_files(tmp_path)
    (tmp_path / "keys" / "not-a-key.pem").write_text("not a PEM key\n")
    (tmp_path / "keys" / "private.pem").write_bytes(old_key)  # the private half by mistake

    async def main() -> None:
        async with serving(tmp_path, {"auth": {"jwt": jwt_settings(old_file)}}) as live:
            established = await live.bed.connect(signed_by(old_key))

            def break_it(settings: dict[str, Any]) -> None:
                settings["auth"]["jwt"]["public_key_file"] = str(tmp_path / "keys" / unusable)

            with structlog.testing.capture_logs() as logs:
                await live.edit(break_it)
            refused = [log for log in logs if log["event"] == "reload_refused"]
            assert [log["section"] for log in refused] == ["auth.jwt"], logs
            assert refused[0]["errors"][0].startswith("auth.jwt:"), refused
            assert live.watcher.applied == 1  # the rest of the file was valid and applied
            again = await live.bed.connect(signed_by(old_key))
            await established.ping(5)
            await again.aclose()
            await established.aclose()

    asyncio.run(main())


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def wait_for(log: Path, found: Callable[[str], bool], process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not found(log.read_text()):
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)


def test_relay_serve_logs_a_change_that_needs_a_restart_and_applies_the_rest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "etc" / "config.yaml"
    path.parent.mkdir()
    settings: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1",
            "stun_port": free_port(),
            "state_dir": str(tmp_path / "state"),
        },
        "transport": {"tls": {"port": free_port()}},
        "metrics": {"prometheus_port": free_port()},
        "plugins": {"enabled": ["jwt"]},
    }
    path.write_text(json.dumps(settings))
    log = tmp_path / "relay.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [BIN / "cloudbridge", "--log-format", "json", "relay", "serve", "--config", path],
            stderr=sink,
            env=environment(),
        )
    try:
        wait_for(log, lambda text: f"following {path}" in text, process)
        settings["server"].update(listen="127.0.0.2", max_sessions_per_tenant=5)
        settings["metrics"]["prometheus_port"] = free_port()  # /metrics moves
        saved = path.with_name("config.yaml.saving")
        saved.write_text(json.dumps(settings))
        os.replace(saved, path)
        wait_for(log, lambda text: '"reloaded"' in text, process)
        events = {record["event"]: record for record in records(log)}
        assert events["restart_required"]["keys"] == ["server.listen"]
        assert events["reloaded"]["applied"] == [
            "server.max_sessions_per_tenant",
            "exporter prometheus",
        ]
        moved = f"http://127.0.0.1:{settings['metrics']['prometheus_port']}/metrics"
        with urllib.request.urlopen(moved, timeout=10) as scraped:
            assert b"cloudbridge_relay_sessions" in scraped.read()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
