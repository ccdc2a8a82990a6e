"""``mesh_report``: whatever the peer manager holds, the report a client builds is one the
relay takes (within the schema, within its size limit), keeping each peer's path first."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cloudbridge_core.errors import ProtocolViolation
from cloudbridge_core.p2p.report import MAX_CANDIDATE_PAIRS, MAX_REPORTED_PEERS, mesh_report
from cloudbridge_core.protocol import messages

STARTED = 1.7e9
#: of the 12 pairs each attempt checked, the one a path runs on
SUCCEEDED = 9


def checked_pairs(text: str, size: int) -> list[dict[str, str]]:
    """Candidate pairs as the ICE strategies write them into an attempt's details."""
    return [
        {
            "local": f"host 10.0.0.{n}:5000" + text * size,
            "remote": "srflx 192.0.2.4:6000" + text * size,
            "state": "succeeded" if n == SUCCEEDED else "failed",
        }
        for n in range(12)
    ]


def explained(number: int, text: str = "x", size: int = 10) -> dict[str, Any]:
    """A peer as ``PeerManager.explain`` documents it, its strings ``size`` long."""
    return {
        "name": f"device-{number}-" + text * size,
        "peer_id": f"peer{number:012d}",
        "path": "derp",
        "protocol": "quic",
        "endpoint": "relay",
        "connected": True,
        "rtt_seconds": 0.012,
        "rtt_ms": 12.0,
        "last_seen": "2026-12-03T21:30:00+00:00",
        "bytes_sent": 1234,
        "bytes_received": 5678,
        "paths": ["derp"],
        "overlay_ip": None,
        "controlling": True,
        "attempts": [
            {
                "strategy": f"strategy-{attempt}" + text * size,
                "attempt": attempt,
                "state": "failed",
                "started_at": STARTED,
                "ended_at": STARTED + 5,
                "error": text * size,
                "details": {
                    "kind": "stun",
                    "endpoint": "192.0.2.1:4000",
                    "candidate_pairs": checked_pairs(text, size),
                    "local_candidate_types": ["host", "srflx"],
                },
            }
            for attempt in range(12)
        ],
        "path_changes": [
            {
                "at": STARTED + i,
                "from": None,
                "to": "derp",
                "reason": text * size,
                "protocol": "quic",
            }
            for i in range(20)
        ],
        "next_retry_in_seconds": 3.0,
        "summary": text * size,
    }


def sent(report: messages.MeshReport) -> messages.Message | None:
    """What the relay reads of ``report``: ``encode`` checks the schema and its own size
    limit, the reader the relay's control stream limit."""
    reader = messages.MessageReader(messages.MAX_CONTROL_MESSAGE_SIZE)
    reader.feed(messages.encode(report))
    return reader.next_message()


def test_a_small_report_carries_everything_the_schema_allows() -> None:
    report = mesh_report([explained(1), explained(2)])
    assert sent(report) == report
    first = report.peers[0]
    assert (first["peer_id"], first["name"], first["path"]) == (
        "peer000000000001",
        "device-1-" + "x" * 10,
        "derp",
    )
    assert (first["bytes_sent"], first["bytes_received"], first["rtt_seconds"]) == (
        1234,
        5678,
        0.012,
    )
    assert len(first["attempts"]) == 8  # the schema's bound, of the 12 held
    assert [a["attempt"] for a in first["attempts"]] == list(range(4, 12))
    assert "details" not in first["attempts"][0]
    assert len(first["attempts"][0]["candidate_pairs"]) == MAX_CANDIDATE_PAIRS
    assert len(first["path_changes"]) == 20
    assert first["path_changes"][0]["protocol"] == "quic"


def test_huge_strings_and_300_peers_are_cut_to_a_report_the_relay_takes() -> None:
    huge = "x" * 1_000_000
    report = mesh_report([{**explained(n, size=1000), "summary": huge} for n in range(300)])
    assert sent(report) == report
    assert len(messages.encode(report)) <= messages.MAX_CONTROL_MESSAGE_SIZE
    assert len(report.peers) == MAX_REPORTED_PEERS
    # the details went, each peer's path stayed
    assert all(p["path"] == "derp" and p["bytes_sent"] == 1234 for p in report.peers)
    assert all(len(p["name"]) == 16 for p in report.peers)


def test_candidate_pairs_are_carried_cut_and_the_one_that_worked_is_kept() -> None:
    peer = explained(1, size=100)
    peer["attempts"] = [
        peer["attempts"][0],
        {**peer["attempts"][1], "details": {"kind": "derp"}},  # no ICE, no pairs
        {key: value for key, value in peer["attempts"][2].items() if key != "details"},
    ]
    report = mesh_report([peer])
    assert sent(report) == report
    ice, derp, older = report.peers[0]["attempts"]
    pairs = ice["candidate_pairs"]
    # the first ones ICE checked, and the one that succeeded though it came later
    assert [p["local"][: len("host 10.0.0.0")] for p in pairs] == [
        f"host 10.0.0.{n}" for n in (0, 1, 2, 3, 4, 5, 6, SUCCEEDED)
    ]
    assert [p["state"] for p in pairs] == ["failed"] * 7 + ["succeeded"]
    assert all(len(p["local"]) == len(p["remote"]) == 64 for p in pairs)
    assert pairs[0]["remote"] == ("srflx 192.0.2.4:6000" + "x" * 100)[:64]
    assert derp["candidate_pairs"] == older["candidate_pairs"] == []


def test_a_report_too_large_for_every_pair_keeps_the_one_that_worked_per_attempt() -> None:
    report = mesh_report([explained(n, size=1000) for n in range(4)])
    assert sent(report) == report
    assert len(messages.encode(report)) <= messages.MAX_CONTROL_MESSAGE_SIZE
    for peer in report.peers:
        assert len(peer["attempts"]) == 8  # the pairs went before the attempts
        for attempt in peer["attempts"]:
            (pair,) = attempt["candidate_pairs"]
            assert pair["local"].startswith(f"host 10.0.0.{SUCCEEDED}:")
            assert pair["state"] == "succeeded"


def test_escaped_text_that_fits_no_peer_detail_drops_the_last_peers() -> None:
    # each of these characters takes 12 bytes as JSON escapes it (a surrogate pair)
    report = mesh_report([explained(n, text="\U0001f600", size=100) for n in range(300)])
    assert sent(report) == report
    assert len(messages.encode(report)) <= messages.MAX_CONTROL_MESSAGE_SIZE
    assert 0 < len(report.peers) < MAX_REPORTED_PEERS
    assert report.peers[0]["peer_id"] == "peer000000000000"


def test_values_out_of_the_schema_are_brought_within_it() -> None:
    odd = {
        **explained(1),
        "rtt_seconds": 1e9,
        "bytes_sent": -5,
        "bytes_received": 2**70,
        "path": "p" * 100,
        "attempts": [
            {
                "strategy": "stun",
                "attempt": True,
                "started_at": float("nan"),
                "details": {"candidate_pairs": ["junk", {"remote": 5, "state": "s" * 40}]},
            },
            {"strategy": "turn", "details": "junk"},
        ],
        "path_changes": [{"at": -1.0, "to": None, "reason": None}],
    }
    malformed_id = {**explained(2), "peer_id": "no spaces allowed"}
    report = mesh_report([odd, malformed_id])
    assert sent(report) == report
    (peer,) = report.peers
    assert (peer["rtt_seconds"], peer["bytes_sent"], peer["bytes_received"]) == (
        3600.0,
        0,
        2**53 - 1,
    )
    assert peer["path"] == "p" * 32
    assert peer["attempts"] == [
        {
            "strategy": "stun",
            "attempt": 0,
            "state": "",
            "error": None,
            "started_at": 0.0,
            "ended_at": None,
            "candidate_pairs": [{"local": "", "remote": "5", "state": "s" * 32}],
        },
        {
            "strategy": "turn",
            "attempt": 0,
            "state": "",
            "error": None,
            "started_at": 0.0,
            "ended_at": None,
            "candidate_pairs": [],
        },
    ]
    assert peer["path_changes"] == [{"at": 0.0, "from": None, "to": None, "reason": ""}]


def test_a_report_out_of_bounds_is_neither_sent_nor_read() -> None:
    peer = mesh_report([{**explained(1), "attempts": []}]).peers[0]
    with pytest.raises(ValueError, match="'peers' fails 'maxItems'"):
        messages.encode(messages.MeshReport([peer] * 257))
    body = {"type": "mesh_report", "peers": [{**peer, "summary": "x" * 513}]}
    with pytest.raises(ProtocolViolation, match=r"'peers\.0\.summary' fails 'maxLength'"):
        messages.decode_body(json.dumps(body).encode())
    attempt = mesh_report([explained(1)]).peers[0]["attempts"][0]
    pairs = attempt["candidate_pairs"] + attempt["candidate_pairs"][:1]
    body = {
        "type": "mesh_report",
        "peers": [{**peer, "attempts": [{**attempt, "candidate_pairs": pairs}]}],
    }
    with pytest.raises(
        ProtocolViolation, match=r"'peers\.0\.attempts\.0\.candidate_pairs' fails 'maxItems'"
    ):
        messages.decode_body(json.dumps(body).encode())


def test_an_older_device_reporting_no_candidate_pairs_is_read() -> None:
    peer = mesh_report([explained(1)]).peers[0]
    older = [{k: v for k, v in a.items() if k != "candidate_pairs"} for a in peer["attempts"]]
    body = {"type": "mesh_report", "peers": [{**peer, "attempts": older}]}
    read = messages.decode_body(json.dumps(body).encode())
    assert isinstance(read, messages.MeshReport)
    assert read.peers[0]["attempts"] == older
