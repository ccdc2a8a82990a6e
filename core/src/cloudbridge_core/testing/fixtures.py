"""Pytest fixtures for transport authors: import ``conformance_check`` into a test module.

A test taking ``conformance_check`` runs once per check of the conformance kit::

    def test_conformance(conformance_check):
        run_check(conformance_check, TransportKit(MyTransport, send_oversized=...))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from cloudbridge_core.testing.conformance import CHECKS, TransportKit

Check = Callable[[TransportKit], Awaitable[None]]


@pytest.fixture(params=CHECKS, ids=[check.__name__ for check in CHECKS])
def conformance_check(request: pytest.FixtureRequest) -> Check:
    check: Check = request.param
    return check
