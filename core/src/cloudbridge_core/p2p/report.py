"""The ``mesh_report`` a device sends its relay: how it reaches each peer, cut to fit.

The relay takes a report of :data:`~cloudbridge_core.protocol.messages.MAX_CONTROL_MESSAGE_SIZE`
at most, within the schema's bounds, or ends the session; so every string is cut and every
list trimmed here, and when a report is still too large its details go first (old path
changes, then the attempts' candidate pairs, then attempts, then the summary) and its last
peers after them: which path each peer is on matters most to whoever reads it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cloudbridge_core.protocol import messages

#: the schema's bounds on a report (``mesh_report`` in messages.schema.json)
MAX_REPORTED_PEERS = 256
MAX_ATTEMPTS = 8
MAX_PATH_CHANGES = 20
MAX_CANDIDATE_PAIRS = 8
MAX_CANDIDATE = 64
MAX_NAME = 63
MAX_SUMMARY = 512
MAX_REASON = 256
MAX_WORD = 32
MAX_TIMESTAMP_TEXT = 64
MAX_RTT = 3600.0
MAX_COUNT = 2**53 - 1
MAX_TIME = 1e11
PEER_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
#: what a report may take, its type and brackets included
REPORT_BUDGET = messages.MAX_CONTROL_MESSAGE_SIZE - 64

#: each step leaves less detail per peer: (path changes kept, attempts kept, candidate
#: pairs kept per attempt, summary cut, name cut); one pair still names the one that worked;
#: the relay knows each peer's full name by its id, and 256 peers fit the last
_DETAIL_STEPS = (
    (MAX_PATH_CHANGES, MAX_ATTEMPTS, MAX_CANDIDATE_PAIRS, MAX_SUMMARY, MAX_NAME),
    (5, MAX_ATTEMPTS, MAX_CANDIDATE_PAIRS, MAX_SUMMARY, MAX_NAME),
    (5, MAX_ATTEMPTS, 1, MAX_SUMMARY, MAX_NAME),
    (1, 3, 0, 256, MAX_NAME),
    (0, 0, 0, 128, MAX_NAME),
    (0, 0, 0, 0, 16),
)


def mesh_report(peers: Iterable[Mapping[str, Any]]) -> messages.MeshReport:
    """The report of ``peers``, each as ``PeerManager.explain`` documents it; always within
    the schema and :data:`REPORT_BUDGET` (a peer with a malformed id is left out)."""
    valid = [p for p in peers if PEER_ID.fullmatch(str(p.get("peer_id", "")))]
    valid = valid[:MAX_REPORTED_PEERS]
    for step in _DETAIL_STEPS:
        entries = [_entry(peer, *step) for peer in valid]
        sizes = [_size(entry) + 1 for entry in entries]  # the comma after each
        if sum(sizes) <= REPORT_BUDGET:
            return messages.MeshReport(entries)
    kept, total = 0, 0
    while kept < len(entries) and total + sizes[kept] <= REPORT_BUDGET:
        total += sizes[kept]
        kept += 1
    return messages.MeshReport(entries[:kept])


def _entry(
    peer: Mapping[str, Any], changes: int, attempts: int, pairs: int, summary: int, name: int
) -> dict[str, Any]:
    return {
        "peer_id": str(peer["peer_id"]),
        "name": _text(peer.get("name"), name) or "",
        "path": _text(peer.get("path"), MAX_WORD),
        "rtt_seconds": _number(peer.get("rtt_seconds"), MAX_RTT),
        "last_seen": _text(peer.get("last_seen"), MAX_TIMESTAMP_TEXT),
        "bytes_sent": _count(peer.get("bytes_sent")),
        "bytes_received": _count(peer.get("bytes_received")),
        "summary": (_text(peer.get("summary"), summary) or "") if summary else "",
        "attempts": [_attempt(a, pairs) for a in _last(peer.get("attempts"), attempts)],
        "path_changes": [_change(c) for c in _last(peer.get("path_changes"), changes)],
    }


def _attempt(attempt: Mapping[str, Any], pairs: int) -> dict[str, Any]:
    details = attempt.get("details")
    checked = details.get("candidate_pairs") if isinstance(details, Mapping) else None
    return {
        "strategy": _text(attempt.get("strategy"), MAX_WORD) or "",
        "attempt": _count(attempt.get("attempt")),
        "state": _text(attempt.get("state"), MAX_WORD) or "",
        "error": _text(attempt.get("error"), MAX_REASON),
        "started_at": _number(attempt.get("started_at"), MAX_TIME) or 0.0,
        "ended_at": _number(attempt.get("ended_at"), MAX_TIME),
        "candidate_pairs": [_pair(p) for p in _pairs_kept(checked, pairs)],
    }


def _pair(pair: Mapping[str, Any]) -> dict[str, str]:
    return {
        "local": _text(pair.get("local"), MAX_CANDIDATE) or "",
        "remote": _text(pair.get("remote"), MAX_CANDIDATE) or "",
        "state": _text(pair.get("state"), MAX_WORD) or "",
    }


def _change(change: Mapping[str, Any]) -> dict[str, Any]:
    entry = {
        "at": _number(change.get("at"), MAX_TIME) or 0.0,
        "from": _text(change.get("from"), MAX_WORD),
        "to": _text(change.get("to"), MAX_WORD),
        "reason": _text(change.get("reason"), MAX_REASON) or "",
    }
    protocol = _text(change.get("protocol"), MAX_WORD)
    return entry if protocol is None else {**entry, "protocol": protocol}


def _last(items: Any, count: int) -> list[Mapping[str, Any]]:
    """The last ``count`` mappings of ``items`` (the newest, for path changes)."""
    return _mappings(items)[-count:] if count > 0 else []


def _pairs_kept(pairs: Any, count: int) -> list[Mapping[str, Any]]:
    """``count`` mappings of ``pairs`` in their order (ICE checks them by priority), those
    that succeeded chosen before the others: the pair a path runs on says the most."""
    mappings = _mappings(pairs)
    kept = sorted(range(len(mappings)), key=lambda i: mappings[i].get("state") != "succeeded")
    return [mappings[i] for i in sorted(kept[: max(count, 0)])]


def _mappings(items: Any) -> list[Mapping[str, Any]]:
    if not isinstance(items, Iterable):
        return []
    return [item for item in items if isinstance(item, Mapping)]


def _text(value: Any, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]


def _number(value: Any, limit: float) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return None
    return min(max(float(value), 0.0), limit)


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        return 0
    return min(max(value, 0), MAX_COUNT)


def _size(entry: dict[str, Any]) -> int:
    """Bytes of ``entry`` as :func:`messages.encode` writes it."""
    return len(json.dumps(entry, separators=(",", ":")))
