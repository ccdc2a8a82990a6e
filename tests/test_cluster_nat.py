"""Issue 19 in network namespaces: two relays of a cluster on the "public" segment, the
laptop's session on one and the server's on the other (tests/nat_mesh.py, ``cluster``).
Their peer tunnel goes direct when UDP passes between them, and over DERP through both
relays and the link between them when it does not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nat_mesh import block_between_peers, namespaces_work, start_mesh
from natbed import NatBed

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture
def nat() -> Iterator[NatBed]:
    why = namespaces_work()
    if why:
        pytest.skip(why)
    with NatBed() as bed:
        yield bed


def test_peers_on_two_relays_go_direct_then_over_derp_across_the_relays(
    nat: NatBed, tmp_path: Path
) -> None:
    mesh, laptop, server, outsider = start_mesh(nat, tmp_path, turn=False, cluster=True)
    mesh.wait_for_path(laptop, "stun", within=40)
    sent, received = mesh.roundtrip(1 << 20, 0)
    assert sent == received
    assert [p["name"] for p in mesh.status(laptop)["peers"]] == ["server"]
    assert [p["name"] for p in mesh.status(server)["peers"]] == ["laptop"]
    assert mesh.status(outsider)["peers"] == []  # another tenant, on the same relay as server
    block_between_peers(nat)
    mesh.wait_for_path(laptop, "derp", within=60)
    sent, received = mesh.roundtrip(2 << 20, 0)
    assert sent == received
    peer = mesh.status(laptop)["peers"][0]
    assert (peer["name"], peer["path"], peer["connected"]) == ("server", "derp", True)
