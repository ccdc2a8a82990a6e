"""Everything the relay generates lives in its state directory, created on first start.

ca.pem / ca.key             the relay's private CA (clients pin it)
server.pem / server.key     its TLS certificate, signed by the CA
signing-key.pem             RS256 key that signs the tokens it issues
signing-key.pub.pem         its public half (the auth plugin validates with it)
reset.key                   the secret QUIC stateless reset tokens derive from, so that a
                            restarted relay can reset its predecessor's connections
client.yaml                 a ready client config that only lacks a token
invites.json                the hashes of invite codes not used up yet
ipam.json                   each tenant's overlay address leases, by device key (relay/ipam.py)
revocations.json            the token revocations in force (relay token revoke)

The last three are a relay alone's (``server.cluster.backend: memory``); a cluster keeps
them in Redis (relay/cluster).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import yaml

from cloudbridge_core import tlsutil
from cloudbridge_core.relay import tokens
from cloudbridge_core.secretfile import write_secret

#: bytes of the stateless reset key (HMAC-SHA256's block is 64; 32 are its strength)
RESET_KEY_SIZE = 32
#: the invites, overlay address leases and revocations of a relay alone (relay/cluster/memory.py)
INVITES_FILE = "invites.json"
IPAM_FILE = "ipam.json"
REVOCATIONS_FILE = "revocations.json"


def default_state_dir() -> Path:
    return platformdirs.user_state_path("cloudbridge") / "relay"


@dataclass(frozen=True)
class RelayState:
    directory: Path
    ca: tlsutil.KeyPair
    server: tlsutil.KeyPair
    signing_key: bytes

    @property
    def issuer(self) -> str:
        return f"cloudbridge-relay:{tokens.key_id(self.signing_key)}"

    @property
    def public_key_file(self) -> Path:
        return self.directory / "signing-key.pub.pem"

    @property
    def reset_key_file(self) -> Path:
        return self.directory / "reset.key"

    @property
    def reset_key(self) -> bytes:
        """The secret stateless reset tokens derive from (created on first start)."""
        return self.reset_key_file.read_bytes()

    @classmethod
    def load_or_create(cls, directory: Path, hostnames: list[str]) -> RelayState:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = _pair(directory, "ca", lambda: tlsutil.generate_ca("CloudBridge relay CA"))
        server = _pair(directory, "server", lambda: tlsutil.issue_server_certificate(ca, hostnames))
        key_file = directory / "signing-key.pem"
        if not key_file.exists():
            write_secret(key_file, tokens.generate_signing_key())
        signing_key = key_file.read_bytes()
        (directory / "signing-key.pub.pem").write_bytes(tokens.public_pem(signing_key))
        state = cls(directory, ca, server, signing_key)
        if not state.reset_key_file.exists():
            write_secret(state.reset_key_file, secrets.token_bytes(RESET_KEY_SIZE))
        return state

    @classmethod
    def load(cls, directory: Path) -> RelayState:
        """An existing state directory (for ``relay token issue``); never creates one."""
        key_file = directory / "signing-key.pem"
        if not key_file.is_file():
            raise FileNotFoundError(
                f"no relay state in {directory}: start 'cloudbridge relay serve' first"
            )
        ca = tlsutil.KeyPair(
            (directory / "ca.pem").read_bytes(), (directory / "ca.key").read_bytes()
        )
        server = tlsutil.KeyPair(
            (directory / "server.pem").read_bytes(), (directory / "server.key").read_bytes()
        )
        return cls(directory, ca, server, key_file.read_bytes())

    def write_client_config(
        self, host: str, ports: dict[str, int], stun: str | None, cluster: list[str] | None = None
    ) -> Path:
        """``cluster``: the hosts of the cluster's relays, listed in ``relay.hosts`` (this
        relay's ``host`` first) when there are others."""
        path = self.directory / "client.yaml"
        # absolute: the file is used from other directories (a service runs from /)
        ca_file = os.path.abspath(self.directory / "ca.pem")
        relay: dict[str, Any] = {"host": host}
        others = [other for other in cluster or [] if other != host]
        if others:
            relay["hosts"] = [host, *sorted(set(others))]
        config: dict[str, Any] = {
            "relay": {**relay, "tls": {"ca_file": ca_file}},
            "transport": {name: {"port": port} for name, port in ports.items()},
            "auth": {"type": "jwt"},
        }
        if stun is not None:
            config["p2p"] = {"ice": {"stun_servers": [stun]}}
        header = (
            "# Written by 'cloudbridge relay serve'. The token goes in auth.token,\n"
            "# CLOUDBRIDGE_AUTH__TOKEN or CLOUDBRIDGE_TOKEN: see 'cloudbridge relay token issue'.\n"
        )
        path.write_text(header + yaml.safe_dump(config, sort_keys=False))
        return path


def _pair(directory: Path, name: str, make: Callable[[], tlsutil.KeyPair]) -> tlsutil.KeyPair:
    certificate, key = directory / f"{name}.pem", directory / f"{name}.key"
    if not certificate.exists() or not key.exists():
        pair = make()
        certificate.write_bytes(pair.certificate)
        write_secret(key, pair.key)
    return tlsutil.KeyPair(certificate.read_bytes(), key.read_bytes())


def local_hostnames() -> list[str]:
    return ["localhost", "127.0.0.1", "::1", socket.gethostname()]
