"""A plaintext keyring backend counts as no keyring: join and init refuse to write a
long-lived token through it unless --insecure-storage, and health and status say when a
token is kept in one. Black box: the CLI, with a backend like keyrings.alt's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_onboarding import inviting_relay

pytestmark = pytest.mark.timeout(120)
TESTS = Path(__file__).resolve().parent


def plaintext(tmp_path: Path) -> dict[str, str]:
    return {
        "PYTHON_KEYRING_BACKEND": "plaintext_keyring.PlaintextKeyring",
        "PYTHONPATH": str(TESTS),
        "PLAINTEXT_KEYRING_FILE": str(tmp_path / "keyring.json"),
    }


def test_join_refuses_a_plaintext_keyring_and_says_where_a_token_is_kept(
    tmp_path: Path,
) -> None:
    env = plaintext(tmp_path)
    with inviting_relay(tmp_path) as relay:
        url = relay.invite("--ttl", "1h", "--uses", "2")
        refused = relay.cloudbridge(
            "join", url, "--no-start", "--config-dir", str(tmp_path / "K"), env=env
        )
        assert refused.returncode == 4, refused.stderr
        assert "PlaintextKeyring is not an OS keyring" in refused.stderr
        assert "--insecure-storage" in refused.stderr
        assert not (tmp_path / "K").exists()
        assert not (tmp_path / "keyring.json").exists()  # the token was never written

        joined = relay.cloudbridge(
            *("join", url, "--no-start", "--config-dir", str(tmp_path / "J")),
            "--insecure-storage",
            env=env,
        )
        assert joined.returncode == 0, joined.stderr
        assert (tmp_path / "J" / "token").stat().st_mode & 0o777 == 0o600

        # a config written for a keyring, on a host whose keyring turns out plaintext
        config = tmp_path / "J" / "config.yaml"
        written = yaml.safe_load(config.read_text())
        written["auth"] = {"type": "jwt", "token_storage": "keyring"}
        config.write_text(yaml.safe_dump(written))
        token = (tmp_path / "J" / "token").read_text().strip()
        (tmp_path / "keyring.json").write_text(json.dumps({"cloudbridge/127.0.0.1": token}))
        health = relay.cloudbridge("health", "--config", str(config), "--format", "json", env=env)
        assert health.returncode == 0, health.stderr
        source = json.loads(health.stdout)["details"]["authentication"]["token_source"]
        assert source.startswith("keyring ")
        assert "is not an OS keyring (it may keep plaintext)" in source
