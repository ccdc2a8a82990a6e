"""The plugin template's overlay example runs under a real client.

The generated overlay is installed, as the template test installs generated plugins, into
a fresh venv with the core and jwt (which checks the tokens ``relay token issue`` mints).
That venv's ``cloudbridge relay serve`` hands out overlay addresses; two ``cloudbridge
p2p`` clients of one tenant bring the example up, and its ``state_file`` (the example
creates no interface) shows what each client asked of it.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_process import stop
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from loopback import free_port
from test_plugin_template import render
from venvs import ROOT, Venv, make_venv, output_tail

#: a hang guard: on loopback the peers see each other within a second or two
WITHIN = 20.0


def nft_usable() -> bool:
    program = shutil.which("nft")
    if program is None:
        return False
    listed = subprocess.run([program, "list", "tables"], capture_output=True, check=False)
    return listed.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    # the client sets the overlay's inbound filter (overlay.allow) itself, whatever the plugin
    pytest.mark.skipif(not nft_usable(), reason="the overlay filter needs nft and CAP_NET_ADMIN"),
]


@dataclass
class Client:
    """A ``cloudbridge p2p`` client; ``home`` holds its config, its state file and (as its
    XDG_STATE_HOME) its device and overlay keys."""

    name: str
    home: Path
    process: subprocess.Popen[str] | None = None

    def write_config(self, state: Path, token: str) -> Path:
        written = yaml.safe_load((state / "client.yaml").read_text())
        document = {
            **written,
            "auth": {"token": token},
            "metrics": {"enabled": False},
            "p2p": {"name": self.name, "peer_discovery_interval": "1s"},
            "overlay": {
                "enabled": True,
                "type": "gen_overlay",
                # names are answered on the overlay address, which the example gives to no
                # interface: there would be nothing to bind
                "dns": False,
                "gen_overlay": {"state_file": str(self.state_file)},
            },
        }
        path = self.home / "client.yaml"
        path.write_text(yaml.safe_dump(document))
        return path

    @property
    def state_file(self) -> Path:
        return self.home / "overlay.json"

    def shown(self) -> Any:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def overlay_keys(self) -> tuple[str, str]:
        """The overlay's private and public keys, base64."""
        [key_file] = (self.home / "cloudbridge").glob("overlay-device-*.key")
        private = key_file.read_text().strip()
        public = X25519PrivateKey.from_private_bytes(base64.b64decode(private)).public_key()
        return private, base64.b64encode(public.public_bytes_raw()).decode()


def up_with(client: Client, addresses: list[str], peers: list[tuple[str, list[str]]]) -> bool:
    """``client``'s state file shows the overlay up with ``addresses`` and exactly
    ``peers`` (public key, allowed IPs)."""
    document = client.shown()
    return (
        document is not None
        and document["up"]
        and document["addresses"] == addresses
        and [(p["public_key"], p["allowed_ips"]) for p in document["peers"]] == peers
    )


def said(process: subprocess.Popen[str], line: str) -> bool:
    return line in output_tail(process)


def wait_for(
    check: Callable[[], bool], what: str, processes: Mapping[str, subprocess.Popen[str]]
) -> None:
    deadline = time.monotonic() + WITHIN
    while not check():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {name}:\n{output_tail(p)}" for name, p in processes.items())
            raise AssertionError(f"not within {WITHIN} s: {what}\n{tails}")
        time.sleep(0.1)


def test_generated_overlay_follows_the_mesh_of_two_real_clients(tmp_path: Path) -> None:
    venv: Venv = make_venv(tmp_path / "venv")
    venv.install(ROOT / "core", ROOT / "plugins" / "cloudbridge-jwt", render("overlay", tmp_path))
    state = tmp_path / "relay"
    relay = venv.start(
        *("cloudbridge", "relay", "serve", "--dev", "--state-dir", state),
        ready="client config:",
        env={
            "CLOUDBRIDGE_SERVER__LISTEN": "127.0.0.1",
            "CLOUDBRIDGE_TRANSPORT__TLS__PORT": str(free_port()),
            "CLOUDBRIDGE_SERVER__STUN_PORT": str(free_port()),
            "CLOUDBRIDGE_METRICS__ENABLED": "false",
        },
    )
    processes = {"relay": relay}
    clients = [Client(name, tmp_path / name) for name in ("laptop", "server")]
    try:
        issued = venv.run(
            *("cloudbridge", "relay", "token", "issue", "--state-dir", state),
            *("--tenant", "acme", "--subject", "laptop"),
            *("--permission", "relay:connect", "--permission", "p2p:mesh"),
        )
        assert issued.returncode == 0, issued.stderr
        token = issued.stdout.strip()
        for client in clients:
            client.home.mkdir()
            client.process = processes[client.name] = venv.start(
                *("cloudbridge", "p2p", "--config", client.write_config(state, token)),
                *("--control-socket", client.home / "control.sock"),
                ready="in the mesh as",
                env={"XDG_STATE_HOME": str(client.home)},
            )

        leases = venv.cloudbridge_json(
            "relay", "ipam", "list", "--state-dir", str(state), "--tenant", "acme"
        )["leases"]
        address = {lease["device"]: lease["address"] for lease in leases}
        assert sorted(address) == ["laptop", "server"]
        keys = {client.name: client.overlay_keys() for client in clients}

        for me, other in (clients, clients[::-1]):
            mine = [f"{address[me.name]}/10"]  # the default pool, 100.64.0.0/10
            peer = (keys[other.name][1], [f"{address[other.name]}/32"])
            wait_for(partial(up_with, me, mine, [peer]), f"{me.name}: up with {peer}", processes)
            announced = f"overlay {me.shown()['interface']} up: {mine[0]}"
            assert me.process is not None
            wait_for(partial(said, me.process, announced), announced, processes)
            assert keys[me.name][0] not in me.state_file.read_text()  # the private key

        for client in clients:
            assert client.process is not None
            assert stop(client.process) == 0, output_tail(client.process)
            document = client.shown()
            assert (document["up"], document["peers"]) == (False, [])
    finally:
        for process in processes.values():
            if process.returncode is None:
                stop(process)
        assert relay.returncode == 0
