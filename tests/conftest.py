"""Shared fixtures for cross-package tests."""

from __future__ import annotations

import pytest
from venvs import ROOT, Venv, make_venv


@pytest.fixture(scope="session")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """One fresh venv with the core and a test runner, shared by the plugin tests."""
    venv = make_venv(tmp_path_factory.mktemp("plugin-venv") / "venv")
    venv.install(ROOT / "core", "pytest", "prometheus-client")
    return venv
