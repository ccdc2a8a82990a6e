"""The built-in TLS transport passes the transport conformance kit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from cloudbridge_core.testing.conformance import CHECKS, TransportKit, run_check
from cloudbridge_core.transports.tls import TlsTransport


@pytest.mark.timeout(90)
@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_tls_transport(check: Callable[[TransportKit], Awaitable[None]]) -> None:
    run_check(check, TransportKit(TlsTransport))
