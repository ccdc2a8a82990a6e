"""Headless Chromium for the web console's tests: Debian's ``chromium`` (installed by
./dev test) driven by playwright, which is told where it is and downloads no browser."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from playwright import sync_api

#: what keeps Chromium off this machine's closed network and quiet in CI (run as root)
FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


@contextmanager
def chromium() -> Iterator[Any]:
    """A launched browser, closed after the block."""
    executable = shutil.which("chromium")
    assert executable is not None, "Debian's chromium is missing: ./dev test installs it"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=list(FLAGS))
        try:
            yield browser
        finally:
            browser.close()
