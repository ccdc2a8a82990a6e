"""Hot reload with real files: in-place writes, atomic replaces, ConfigMap swaps, SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cloudbridge_core.config import Config, load_config
from cloudbridge_core.config.reload import ConfigWatcher

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
