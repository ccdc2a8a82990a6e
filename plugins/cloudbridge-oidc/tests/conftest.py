"""The OpenID Provider fixture of the plugin's tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from oidc_provider import PROVIDER_DIR, OpenIdProvider, new_key


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[OpenIdProvider]:
    if shutil.which("node") is None or not (PROVIDER_DIR / "node_modules").is_dir():
        pytest.fail(
            "the test provider is not installed: ./dev test runs npm ci in " + str(PROVIDER_DIR)
        )
    started = OpenIdProvider(tmp_path, POLL_INTERVAL="1")
    started.start(new_key("key-1"))
    yield started
    started.stop()
