"""The built-in TLS transport passes the transport conformance kit."""

from __future__ import annotations

import pytest
from cloudbridge_core.testing.conformance import (
    TransportKit,
    oversized_mux_frame_over_tls,
    run_check,
)
from cloudbridge_core.testing.fixtures import Check, conformance_check  # noqa: F401 - fixture
from cloudbridge_core.transports.tls import TlsTransport


@pytest.mark.timeout(90)
def test_tls_transport(conformance_check: Check) -> None:  # noqa: F811 - the fixture
    run_check(conformance_check, TransportKit(TlsTransport, oversized_mux_frame_over_tls))
