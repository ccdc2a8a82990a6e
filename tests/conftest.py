"""Shared fixtures for cross-package tests."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from loopback import echo, serving
from relay_clients import StartTunnel, tunnel_clients
from venvs import ROOT, Venv, make_venv


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A threaded TCP echo server on loopback."""
    with serving(echo) as port:
        yield port


@pytest.fixture
def tunnel(tmp_path: Path, echo_port: int) -> Iterator[StartTunnel]:
    """Starts ``cloudbridge tunnel`` clients to ``echo_port`` (tests/relay_clients.py)."""
    yield from tunnel_clients(tmp_path, echo_port)


@pytest.fixture(scope="session")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """One fresh venv with the core and a test runner, shared by the plugin tests."""
    venv = make_venv(tmp_path_factory.mktemp("plugin-venv") / "venv")
    venv.install(ROOT / "core", "pytest", "prometheus-client")
    return venv


@pytest.hookimpl(hookwrapper=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, None, None]:
    """On a timeout inside an event loop, print every pending task's stack first: the
    thread stacks pytest-timeout prints only show the loop waiting."""
    yield
    if settings.method != "signal":
        return
    timed_out = signal.getsignal(signal.SIGALRM)
    if not callable(timed_out):
        return

    def dump_tasks_then_fail(signum: int, frame: FrameType | None) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            for task in asyncio.all_tasks(loop):
                task.print_stack(file=sys.stderr)
        timed_out(signum, frame)

    signal.signal(signal.SIGALRM, dump_tasks_then_fail)
