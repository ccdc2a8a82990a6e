"""``cloudbridge relay invite list`` and ``revoke`` through the real CLI, on a relay's state
directory (the memory backend; the store contract covers Redis)."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from cli_process import run_without_keyring
from cloudbridge_core.config.schema import cli_schema
from cloudbridge_core.relay.invites import digest
from cloudbridge_core.relay.state import RelayState
from jsonschema import Draft202012Validator

pytestmark = pytest.mark.timeout(60)


def cloudbridge(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_without_keyring(*args)


def listed(state: Path, *extra: str) -> list[dict[str, object]]:
    result = cloudbridge("relay", "invite", "list", "--state-dir", state, "--json", *extra)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    Draft202012Validator(cli_schema("relay-invite-list")).validate(document)
    invites: list[dict[str, object]] = document["invites"]
    return invites


def test_invites_are_listed_without_their_codes_and_revoked_by_id(tmp_path: Path) -> None:
    state = RelayState.load_or_create(tmp_path / "D", ["localhost"]).directory
    codes = {}
    for tenant, ttl in (("acme", "2h"), ("globex", "1h")):
        created = cloudbridge(
            *("relay", "invite", "create", "--state-dir", state, "--tenant", tenant),
            *("--ttl", ttl, "--uses", "2"),
        )
        assert created.returncode == 0, created.stderr
        query = urllib.parse.urlsplit(created.stdout.strip()).query
        codes[tenant] = urllib.parse.parse_qs(query)["code"][0]

    invites = listed(state)
    assert [(i["tenant"], i["uses_left"]) for i in invites] == [("globex", 2), ("acme", 2)]
    assert [i["invite_id"] for i in invites] == [
        digest(codes["globex"])[:12],
        digest(codes["acme"])[:12],
    ]
    assert not any(code in json.dumps(invites) for code in codes.values())
    table = cloudbridge("relay", "invite", "list", "--state-dir", state, "--tenant", "acme")
    assert table.returncode == 0, table.stderr
    assert digest(codes["acme"])[:12] in table.stdout
    assert "globex" not in table.stdout

    acme_id = digest(codes["acme"])[:12]
    revoke = ("relay", "invite", "revoke", acme_id, "--state-dir", state, "--json")
    elsewhere = cloudbridge(*revoke, "--tenant", "globex")
    assert elsewhere.returncode == 2
    assert f"no usable invite {acme_id} of tenant globex" in elsewhere.stderr
    revoked = cloudbridge(*revoke, "--tenant", "acme")
    assert revoked.returncode == 0, revoked.stderr
    document = json.loads(revoked.stdout)
    Draft202012Validator(cli_schema("relay-invite-revoke")).validate(document)
    assert (document["revoked"], document["invite_id"]) == (True, acme_id)
    assert f"revoked invite {acme_id}" in revoked.stderr
    assert [i["tenant"] for i in listed(state)] == ["globex"]

    again = cloudbridge(*revoke)
    assert again.returncode == 2
    assert json.loads(again.stdout) == {"schema_version": 1, "revoked": False, "invite_id": acme_id}
    assert f"no usable invite {acme_id}" in again.stderr
    malformed = cloudbridge("relay", "invite", "revoke", "xyz", "--state-dir", state)
    assert malformed.returncode == 2
    assert "'xyz' is not an invite id" in malformed.stderr
