"""Shared fixtures for cross-package tests."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator

import pytest
from loopback import Echo
from venvs import ROOT, Venv, make_venv


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A threaded TCP echo server on loopback."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """One fresh venv with the core and a test runner, shared by the plugin tests."""
    venv = make_venv(tmp_path_factory.mktemp("plugin-venv") / "venv")
    venv.install(ROOT / "core", "pytest", "prometheus-client")
    return venv
