"""The relay's IPAM: overlay addresses per tenant, sticky per device key, kept in the state
directory by a relay alone (the memory backend; test_cluster_store.py runs the leases of
both backends); and ``cloudbridge relay ipam list``, which reads them."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cloudbridge_core.config import load_config
from cloudbridge_core.config.schema import cli_schema
from cloudbridge_core.errors import CloudBridgeError, ConfigError
from cloudbridge_core.relay.cluster.memory import MemoryStore
from cloudbridge_core.relay.cluster.store import Handlers, RelayRecord
from cloudbridge_core.relay.ipam import Allocation, Ipam, Lease, read_leases
from cloudbridge_core.relay.mesh import is_overlay_key
from cloudbridge_core.settings import ServerOverlaySettings
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

DAY = 86400.0


class Clock:
    """Unix seconds the test moves on by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def overlay(**keys: Any) -> ServerOverlaySettings:
    """``server.overlay`` as the relay reads it, from ``keys`` set in a config."""
    overrides = {f"server.overlay.{key}": (value, "test") for key, value in keys.items()}
    return load_config(None, environ={}, overrides=overrides).settings.server.overlay


def key(n: int) -> str:
    """A device key (its value does not matter to the IPAM, only that it names one)."""
    return base64.b64encode(n.to_bytes(32, "big")).decode()


def opened(
    path: Path, settings: ServerOverlaySettings, clock: Callable[[], float] = time.time
) -> Ipam:
    """The IPAM of a relay alone whose state directory holds ``path`` (its ``ipam.json``)."""
    assert path.name == "ipam.json"
    return Ipam(MemoryStore(path.parent), settings, clock=clock)


async def nothing(*_: object) -> None:
    """A cluster handler with nothing to do: a relay alone hears no other relay."""


def granted(ipam: Ipam, tenant: str, device_key: str, name: str, peer_id: str) -> Allocation:
    return asyncio.run(ipam.lease(tenant, device_key, name, peer_id))


def held(ipam: Ipam, tenant: str) -> dict[str, Lease]:
    return asyncio.run(ipam.leases(tenant))


def lease(ipam: Ipam, tenant: str, n: int, in_mesh: tuple[int, ...] = ()) -> str:
    """Lease device ``n`` of ``tenant`` an address; the address, or the error."""
    got = asyncio.run(
        ipam.lease(tenant, key(n), f"dev{n}", f"peer{n:08d}", [key(m) for m in in_mesh])
    )
    return got.address or got.error


def test_defaults() -> None:
    settings = overlay()
    assert (settings.pool, settings.release_after, settings.tenants) == (
        "100.64.0.0/10",
        30 * DAY,
        {},
    )


def test_an_address_is_sticky_per_device_key_across_a_reload_of_the_state_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "ipam.json"
    first = opened(path, overlay())
    assert [lease(first, "acme", n) for n in (1, 2, 3)] == [
        "100.64.0.1",
        "100.64.0.2",
        "100.64.0.3",
    ]
    assert lease(first, "acme", 2) == "100.64.0.2"  # the same device again
    again = opened(path, overlay())  # a relay restarted on the same state directory
    assert [lease(again, "acme", n) for n in (3, 1, 4, 2)] == [
        "100.64.0.3",
        "100.64.0.1",
        "100.64.0.4",
        "100.64.0.2",
    ]
    leases = held(again, "acme")
    assert len(leases) == 4  # one lease per device key
    assert leases[key(1)].device == "dev1"
    assert leases[key(1)].peer_id == "peer00000001"
    # what the file holds: 0600, replaced whole (no temporary left), an absolute path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["ipam.json"]
    assert read_leases(path)["acme"][key(4)].address == "100.64.0.4"


def test_a_device_renamed_keeps_its_address_and_the_lease_takes_the_new_name(
    tmp_path: Path,
) -> None:
    ipam = opened(tmp_path / "ipam.json", overlay())
    first = granted(ipam, "acme", key(1), "laptop", "peer00000001")
    second = granted(ipam, "acme", key(1), "laptop-2", "peer00000001")
    assert first.address == second.address == "100.64.0.1"
    assert held(ipam, "acme")[key(1)].device == "laptop-2"


def test_two_tenants_with_the_same_pool_are_separate_namespaces(tmp_path: Path) -> None:
    ipam = opened(tmp_path / "ipam.json", overlay())
    assert lease(ipam, "acme", 1) == "100.64.0.1"
    assert lease(ipam, "globex", 2) == "100.64.0.1"  # the same address, another tenant
    assert lease(ipam, "globex", 1) == "100.64.0.2"  # even the same key: another namespace
    assert lease(ipam, "acme", 3) == "100.64.0.2"
    assert set(read_leases(tmp_path / "ipam.json")) == {"acme", "globex"}


def test_a_tenant_with_its_own_pool_leases_from_it(tmp_path: Path) -> None:
    settings = overlay(tenants={"acme": {"pool": "10.20.0.0/24"}, "beta": {"pool": "10.20.0.0/24"}})
    ipam = opened(tmp_path / "ipam.json", settings)
    assert lease(ipam, "acme", 1) == "10.20.0.1"
    assert lease(ipam, "beta", 1) == "10.20.0.1"  # overlapping pools are fine
    assert lease(ipam, "other", 1) == "100.64.0.1"  # the default pool
    assert granted(ipam, "acme", key(2), "d", "peer00000002").wire() == {
        "address": "10.20.0.2",
        "pool": "10.20.0.0/24",
    }


def test_an_idle_lease_is_released_at_the_tenants_next_lease(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "ipam.json"
    ipam = opened(path, overlay(release_after="1d"), clock=clock)
    assert [lease(ipam, "acme", n) for n in (1, 2, 3)] == [
        "100.64.0.1",
        "100.64.0.2",
        "100.64.0.3",
    ]
    clock.now += 0.5 * DAY
    asyncio.run(ipam.seen("acme", key(2)))  # device 2 leaves the mesh half a day later
    clock.now += 0.75 * DAY  # 1 and 3 were last seen 1.25 days ago, 2 only 0.75
    # device 3 is still in the mesh (a long session): its lease stays, 1's goes
    assert lease(ipam, "acme", 4, in_mesh=(3,)) == "100.64.0.1"
    assert set(held(ipam, "acme")) == {key(2), key(3), key(4)}
    assert lease(ipam, "acme", 1, in_mesh=(3, 4)) == "100.64.0.4"  # 1 is back: a new address
    # after a restart, the first join of the tenant releases what is idle longer than a day
    clock.now += 0.5 * DAY
    restarted = opened(path, overlay(release_after="1d"), clock=clock)
    assert set(held(restarted, "acme")) == {key(1), key(2), key(3), key(4)}
    assert lease(restarted, "acme", 5) == "100.64.0.2"  # 2's address, free again
    assert set(read_leases(path)["acme"]) == {key(4), key(1), key(5)}
    clock.now += 2 * DAY
    assert lease(restarted, "acme", 4) == "100.64.0.1"  # renewed: its own lease stays
    assert set(read_leases(path)["acme"]) == {key(4)}


def test_an_exhausted_pool_says_why_and_leases_nothing(tmp_path: Path) -> None:
    settings = overlay(tenants={"acme": {"pool": "10.0.0.0/30"}}, release_after="7d")
    ipam = opened(tmp_path / "ipam.json", settings)
    # a /30 has two addresses to lease: its network and broadcast addresses are skipped
    assert [lease(ipam, "acme", n) for n in (1, 2)] == ["10.0.0.1", "10.0.0.2"]
    refused = granted(ipam, "acme", key(3), "dev3", "peer00000003")
    assert refused.address == ""
    assert "10.0.0.0/30 is exhausted" in refused.error
    assert "all 2 of its addresses" in refused.error
    assert "7d" in refused.error
    assert "server.overlay.tenants.acme.pool" in refused.error
    assert refused.wire() == {"error": refused.error}
    assert key(3) not in held(ipam, "acme")
    assert lease(ipam, "acme", 1) == "10.0.0.1"  # holders keep theirs
    # a /31 leases both its addresses, a /32 its one
    tiny = opened(tmp_path / "tiny" / "ipam.json", overlay(pool="10.1.0.0/31"))
    assert [lease(tiny, "t", n) for n in (1, 2)] == ["10.1.0.0", "10.1.0.1"]
    assert "server.overlay.pool" in lease(tiny, "t", 3)
    single = opened(tmp_path / "single" / "ipam.json", overlay(pool="10.2.0.7/32"))
    assert lease(single, "t", 1) == "10.2.0.7"


def test_a_lease_outside_a_changed_pool_is_replaced_at_the_next_join(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    before = opened(path, overlay())
    assert [lease(before, "acme", n) for n in (1, 2)] == ["100.64.0.1", "100.64.0.2"]
    after = opened(path, overlay(tenants={"acme": {"pool": "10.30.0.0/24"}}))
    assert lease(after, "acme", 2) == "10.30.0.1"
    # device 1 has not joined since: its lease stays as it was until it does
    assert read_leases(path)["acme"][key(1)].address == "100.64.0.1"
    assert lease(after, "acme", 1) == "10.30.0.2"
    assert {one.address for one in held(after, "acme").values()} == {"10.30.0.1", "10.30.0.2"}


def test_two_leases_of_one_address_in_a_file_edited_by_hand_become_one(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    ipam = opened(path, overlay())
    lease(ipam, "acme", 1)
    lease(ipam, "acme", 2)
    document = json.loads(path.read_text())
    document["tenants"]["acme"][key(2)]["address"] = "100.64.0.1"
    document["tenants"]["acme"][key(2)]["last_seen"] -= 10
    path.write_text(json.dumps(document))
    reopened = opened(path, overlay())
    assert set(held(reopened, "acme")) == {key(1)}  # the one seen last keeps it
    assert lease(reopened, "acme", 2) == "100.64.0.2"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not JSON"),
        ('{"version": 2, "tenants": {}}', "version 2"),
        ('{"version": 1, "tenants": {"acme": {"k": {"address": "x"}}}}', "shape"),
        ('{"version": 1, "tenants": []}', "shape"),
    ],
)
def test_a_damaged_lease_file_is_refused_naming_it(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "ipam.json"
    path.write_text(content)
    with pytest.raises(CloudBridgeError) as caught:
        lease(opened(path, overlay()), "acme", 1)
    assert str(path) in caught.value.message
    # a relay starting on it refuses to start, rather than move every device
    handlers = Handlers(nothing, nothing, nothing)
    with pytest.raises(CloudBridgeError) as caught:
        asyncio.run(MemoryStore(tmp_path).start(handlers, RelayRecord("", "")))
    assert str(path) in caught.value.message
    assert problem in caught.value.message
    assert caught.value.hint is not None


@pytest.mark.parametrize(
    ("key_path", "value", "where"),
    [
        ("server.overlay.pool", "100.64.0.1/10", "server.overlay.pool"),  # host bits set
        ("server.overlay.pool", "100.64.0.0", "server.overlay.pool"),  # no prefix length
        ("server.overlay.pool", "fd00::/48", "server.overlay.pool"),
        ("server.overlay.pool", "10.0.0.0/33", "server.overlay.pool"),
        (
            "server.overlay.tenants",
            {"acme": {"pool": "10.0.0.300/24"}},
            "server.overlay.tenants.acme.pool",
        ),
        ("server.overlay.tenants", {"acme": {}}, "server.overlay.tenants.acme"),
        ("server.overlay.tenants", {"Acme!": {"pool": "10.0.0.0/8"}}, "server.overlay.tenants"),
        ("server.overlay.release_after", "10s", "server.overlay.release_after"),
    ],
)
def test_a_bad_pool_is_refused_when_the_config_is_read(
    key_path: str, value: object, where: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={}, overrides={key_path: (value, "test")})
    assert [issue.path for issue in caught.value.issues] == [where]


def test_overlay_keys_are_base64_of_32_bytes() -> None:
    good = base64.b64encode(bytes(range(32))).decode()
    assert is_overlay_key(good)
    for bad in (
        "",
        "x",
        good[:-1],
        good + "=",
        good.replace("A", "*"),
        key(1)[:-2] + "==",
        " " + good,
    ):
        assert not is_overlay_key(bad), bad
    assert not is_overlay_key(base64.b64encode(bytes(33)).decode())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 9)), max_size=40))
def test_leases_stay_unique_in_the_pool_and_sticky(joins: list[tuple[str, int]]) -> None:
    # a directory per example: hypothesis runs them all in one call of the test
    with tempfile.TemporaryDirectory() as directory:
        ipam = opened(Path(directory) / "ipam.json", overlay(pool="10.0.0.0/29"))  # 6 for 10
        given_out: dict[tuple[str, int], str] = {}
        for tenant, n in joins:
            got = granted(ipam, tenant, key(n), f"d{n}", f"peer{n:08d}")
            if got.address:
                assert given_out.setdefault((tenant, n), got.address) == got.address
                assert ipaddress.IPv4Address(got.address) in ipaddress.IPv4Network("10.0.0.0/29")
            else:
                assert len(held(ipam, tenant)) == 6
        for tenant in ("a", "b"):
            addresses = [one.address for one in held(ipam, tenant).values()]
            assert len(addresses) == len(set(addresses))
            assert not {"10.0.0.0", "10.0.0.7"} & set(addresses)


# --- cloudbridge relay ipam list -----------------------------------------------------------


def test_relay_ipam_list_shows_a_tenants_leases(
    cloudbridge: Callable[..., Any], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    ipam = opened(state / "ipam.json", overlay())
    for n, name in ((2, "server"), (1, "laptop")):
        granted(ipam, "acme", key(n), name, f"peer{n:08d}")
    granted(ipam, "globex", key(9), "\x1b[31mred", "peer00000009")
    as_json = cloudbridge(
        "relay", "ipam", "list", "--state-dir", str(state), "--tenant", "acme", "--json"
    )
    assert as_json.code == 0, as_json.err
    document = as_json.json()
    Draft202012Validator(cli_schema("relay-ipam-list")).validate(document)
    assert document["tenant"] == "acme"
    assert [(r["device"], r["peer_id"], r["address"]) for r in document["leases"]] == [
        ("server", "peer00000002", "100.64.0.1"),
        ("laptop", "peer00000001", "100.64.0.2"),
    ]
    assert document["leases"][0]["last_seen"].endswith("Z")
    text = cloudbridge("relay", "ipam", "list", "--state-dir", str(state), "--tenant", "acme")
    assert text.code == 0
    header, *rows = text.out.splitlines()
    assert header.split() == ["DEVICE", "PEER", "ID", "ADDRESS", "LAST", "SEEN"]
    assert rows[0].split()[:3] == ["server", "peer00000002", "100.64.0.1"]
    escaped = cloudbridge("relay", "ipam", "list", "--state-dir", str(state), "--tenant", "globex")
    assert "\x1b" not in escaped.out
    assert "\\x1b[31mred" in escaped.out


def test_relay_ipam_list_says_what_is_missing(
    cloudbridge: Callable[..., Any], tmp_path: Path
) -> None:
    missing = cloudbridge(
        "relay", "ipam", "list", "--state-dir", str(tmp_path / "no"), "--tenant", "acme"
    )
    assert missing.code == 2
    assert "no relay state in" in missing.err
    assert missing.out == ""
    state = tmp_path / "state"
    state.mkdir()
    none = cloudbridge(
        "relay", "ipam", "list", "--state-dir", str(state), "--tenant", "acme", "--json"
    )
    assert none.code == 2
    error = json.loads(none.err.strip().splitlines()[-1])
    Draft202012Validator(cli_schema("error")).validate(error)
    assert error["error"]["code"] == "usage"
    assert "holds no overlay addresses" in error["error"]["message"]
    granted(opened(state / "ipam.json", overlay()), "globex", key(1), "d", "peer00000001")
    other = cloudbridge("relay", "ipam", "list", "--state-dir", str(state), "--tenant", "acme")
    assert other.code == 2
    assert f"tenant 'acme' holds no overlay addresses in {state}" in other.err
    bad = cloudbridge("relay", "ipam", "list", "--state-dir", str(state), "--tenant", "../x")
    assert bad.code == 2
    (state / "ipam.json").write_text("{")
    damaged = cloudbridge("relay", "ipam", "list", "--state-dir", str(state), "--tenant", "globex")
    assert damaged.code == 1
    assert "cannot read the overlay leases" in damaged.err
