"""Fixtures of the WireGuard plugin's tests; the helpers are in wgbed.py beside this file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# with --import-mode=importlib only the repository's tests/ is on sys.path: add this
# folder after it, so these tests can import wgbed (whose name, like theirs, is unique)
sys.path.append(str(Path(__file__).parent))

from wgbed import Pair, needs_root_tools


@pytest.fixture
def pair() -> Iterator[Pair]:
    needs_root_tools()
    bed = Pair()
    try:
        bed.build()
        for side in "ab":
            bed.driver(side)
        yield bed
    finally:
        bed.close()
