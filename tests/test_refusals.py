"""A refused token is the same classified error on every transport, every time (issue 16):
over QUIC the relay's close used to overtake its refusal every time, over gRPC now and then,
and the client took ``transport_closed`` for a connection to retry."""

from __future__ import annotations

from pathlib import Path

import pytest
from cloudbridge_core.errors import InvalidToken
from relaybed import Bed, run

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("transport", ["tls", "websocket", "grpc", "quic"])
def test_a_refused_token_is_invalid_token_ten_times_of_ten(tmp_path: Path, transport: str) -> None:
    async def scenario(bed: Bed) -> None:
        forged = bed.token()[:-8] + "AAAAAAAA"
        for _ in range(10):
            with pytest.raises(InvalidToken):
                await bed.connect(forged)
        good = await bed.connect()  # the relay keeps serving
        await good.aclose()

    run(tmp_path, scenario, transport)
