"""``<prefix>_config_reloads_total{result}``: a watcher's reload attempts, read at scrape time.

The client and the relay each register one for their own :class:`ConfigWatcher`; it lives
apart from ``reload.py`` so that watching a file does not import prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from cloudbridge_core.config.reload import ConfigWatcher


class ReloadCollector(Collector):
    """Reloads applied and rejected (invalid, half-written or empty: the config stayed)."""

    def __init__(self, prefix: str, watcher: ConfigWatcher) -> None:
        self._name = f"{prefix}_config_reloads"
        self._watcher = watcher

    def collect(self) -> Iterator[CounterMetricFamily]:
        reloads = CounterMetricFamily(
            self._name,
            "Config file reloads by result: applied, or rejected (invalid, half-written or"
            " empty; the configuration in force stayed).",
            labels=["result"],
        )
        reloads.add_metric(["applied"], self._watcher.applied)
        reloads.add_metric(["rejected"], self._watcher.rejected)
        yield reloads
