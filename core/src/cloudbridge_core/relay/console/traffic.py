"""Each tenant's traffic over the last hour, for the overview's chart: the bytes its
devices report carrying to their peers (``mesh_report``), sampled every
:data:`SAMPLE_EVERY` seconds on this relay."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import Any

from cloudbridge_core.relay.mesh import Mesh

SAMPLE_EVERY = 10.0
#: an hour of samples
KEPT = 360


class TrafficHistory:
    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def sample(self) -> None:
        """Take one sample of every tenant with devices here (a tenant gone keeps its
        history until it ages out)."""
        now = time.time()
        totals: dict[str, int] = {}
        for member in self._mesh.members():
            report = member.report
            carried = sum(p.get("bytes_sent", 0) for p in report["peers"]) if report else 0
            totals[member.tenant_id] = totals.get(member.tenant_id, 0) + carried
        for tenant_id in set(totals) | set(self._samples):
            kept = self._samples.setdefault(tenant_id, deque(maxlen=KEPT + 1))
            kept.append((now, totals.get(tenant_id, 0)))
            if not totals.get(tenant_id) and all(total == 0 for _, total in kept):
                del self._samples[tenant_id]

    def of(self, tenant_id: str) -> list[dict[str, Any]]:
        """Bytes per second between samples, oldest first: a device that left (its counters
        gone) counts as none, never as negative."""
        kept = list(self._samples.get(tenant_id, ()))
        return [
            {"at": round(at), "bytes_per_second": max(total - before, 0) / max(at - then, 1e-3)}
            for (then, before), (at, total) in itertools.pairwise(kept)
        ]

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_EVERY)
