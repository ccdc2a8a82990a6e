"""Hot reload with real files: in-place writes, atomic replaces, ConfigMap swaps, SIGHUP."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cloudbridge_core.client.metrics import ClientMetrics
from cloudbridge_core.config import Config, load_config
from cloudbridge_core.config.reload import ConfigWatcher
from cloudbridge_core.log import configure_logging
from prometheus_client import generate_latest

pytestmark = pytest.mark.timeout(30)

GOOD = "relay:\n  host: {host}\n"
BROKEN = "relay:\n  host: [not, a, host]\n  hots: typo\n"


def replace_atomically(path: Path, text: str) -> None:
    """What editors and config managers do: write a sibling file, rename it over."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def watching(
    path: Path, scenario: Callable[[ConfigWatcher, asyncio.Queue[Config]], Awaitable[None]]
) -> None:
    def load() -> Config:
        return load_config(path, environ={})

    applied: asyncio.Queue[Config] = asyncio.Queue()
    async with ConfigWatcher(path, load, load()) as watcher:
        watcher.subscribe(applied.put_nowait)
        await scenario(watcher, applied)


def test_broken_replacement_keeps_old_config_then_good_one_applies(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.format(host="one.example.com"))

    async def scenario(watcher: ConfigWatcher, applied: asyncio.Queue[Config]) -> None:
        replace_atomically(path, BROKEN)
        await watcher.wait_attempts(1)
        assert watcher.rejected == 1
        assert watcher.current.get("relay.host") == "one.example.com"
        assert applied.empty()

        replace_atomically(path, GOOD.format(host="two.example.com"))
        config = await applied.get()
        assert config.get("relay.host") == "two.example.com"
        assert watcher.current is config

    asyncio.run(watching(path, scenario))


def test_in_place_rewrite_applies(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.format(host="one.example.com"))

    async def scenario(watcher: ConfigWatcher, applied: asyncio.Queue[Config]) -> None:
        with path.open("w") as handle:  # same inode, truncated and rewritten
            handle.write(GOOD.format(host="three.example.com"))
        while (await applied.get()).get("relay.host") != "three.example.com":
            pass
        assert watcher.current.get("relay.host") == "three.example.com"

    asyncio.run(watching(path, scenario))


def test_configmap_symlink_swap_applies(tmp_path: Path) -> None:
    """Kubernetes mounts config.yaml -> ..data/config.yaml and swaps the ..data link."""
    first, second = tmp_path / "..2026_1", tmp_path / "..2026_2"
    for directory, host in ((first, "one.example.com"), (second, "four.example.com")):
        directory.mkdir()
        (directory / "config.yaml").write_text(GOOD.format(host=host))
    (tmp_path / "..data").symlink_to(first.name)
    path = tmp_path / "config.yaml"
    path.symlink_to("..data/config.yaml")

    async def scenario(watcher: ConfigWatcher, applied: asyncio.Queue[Config]) -> None:
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        assert (await applied.get()).get("relay.host") == "four.example.com"

    asyncio.run(watching(path, scenario))


def test_sighup_reloads_and_subscriber_errors_are_contained(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.format(host="one.example.com"))

    async def scenario(watcher: ConfigWatcher, applied: asyncio.Queue[Config]) -> None:
        def broken_subscriber(_config: Config) -> None:
            raise RuntimeError("subscriber bug")

        watcher.subscribe(broken_subscriber)
        os.kill(os.getpid(), signal.SIGHUP)
        assert (await applied.get()).get("relay.host") == "one.example.com"
        assert watcher.applied == 1

    asyncio.run(watching(path, scenario))


FULL = "relay:\n  host: two.example.com\n  connect_timeout: 2s\nlogging:\n  level: debug\n"


def test_a_file_caught_half_written_in_place_is_refused(tmp_path: Path) -> None:
    """A slow writer (a copy over a slow link) rewrites the file in place: while it is at
    it, the first two lines are valid YAML and a valid config, but not the config meant."""
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.format(host="one.example.com"))
    head, rest = FULL[: FULL.index("  connect")], FULL[FULL.index("  connect") :]

    async def scenario(watcher: ConfigWatcher, applied: asyncio.Queue[Config]) -> None:
        with path.open("w") as handle:  # same inode, truncated and rewritten
            handle.write(head)
            handle.flush()
            # still writing (a byte at a time, as a slow link delivers them) until the
            # watcher has looked at the unfinished file and refused it
            for padding in itertools.count():
                assert applied.empty(), "a half-written file was applied"
                if watcher.rejected:
                    break
                assert padding < 3000, "the half-written file was never looked at"
                handle.write(" ")
                handle.flush()
                await asyncio.sleep(0.01)
            handle.write("\n" + rest)
        assert watcher.current.get("relay.host") == "one.example.com"
        config = await applied.get()
        assert (config.get("relay.host"), config.get("relay.connect_timeout")) == (
            "two.example.com",
            "2s",
        )

    log = tmp_path / "cloudbridge.log"
    configure_logging(level="info", fmt="json", output=str(log))
    try:
        asyncio.run(watching(path, scenario))
    finally:
        configure_logging()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"the file changed while being read (half-written?)"} == {
        error for r in records if r["event"] == "reload_rejected" for error in r["errors"]
    }


@pytest.mark.parametrize("text", ["", "  \n\n", "# relay:\n#   host: gone.example.com\n"])
def test_an_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.format(host="one.example.com"))
    log = tmp_path / "cloudbridge.log"

    async def scenario(watcher: ConfigWatcher, applied: asyncio.Queue[Config]) -> None:
        path.write_text(text)
        await watcher.wait_attempts(1)
        assert watcher.rejected == 1
        assert watcher.current.get("relay.host") == "one.example.com"
        assert applied.empty()

    configure_logging(level="info", fmt="json", output=str(log))
    try:
        asyncio.run(watching(path, scenario))
    finally:
        configure_logging()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    [rejected] = [r for r in records if r["event"] == "reload_rejected"]
    assert rejected["level"] == "warning"
    assert rejected["errors"] == ["the file is empty (only blank lines or comments)"]


def test_reloads_are_counted_in_the_metrics(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.format(host="one.example.com"))
    metrics = ClientMetrics([])

    async def scenario(watcher: ConfigWatcher, applied: asyncio.Queue[Config]) -> None:
        metrics.watch_reloads(watcher)
        replace_atomically(path, BROKEN)
        await watcher.wait_attempts(1)
        replace_atomically(path, GOOD.format(host="two.example.com"))
        await applied.get()

    asyncio.run(watching(path, scenario))
    scraped = generate_latest(metrics.registry).decode()
    assert 'cloudbridge_client_config_reloads_total{result="applied"} 1.0' in scraped
    assert 'cloudbridge_client_config_reloads_total{result="rejected"} 1.0' in scraped
