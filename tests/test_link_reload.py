"""The relay link follows a reload that changes where or how it reaches the relay."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cloudbridge_core.client.link import RelayLink

from tests.relaybed import relay_bed


def test_a_new_relay_in_the_file_moves_the_session_and_a_timeout_does_not(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with relay_bed(tmp_path / "one") as one, relay_bed(tmp_path / "two") as two:
            link = RelayLink(one.client_config(one.token()), one.plugins)
            await link.start()
            assert one.relay.relay.sessions_by_tenant == {"acme": 1}
            first = link.current

            await link.apply(one.client_config(one.token(), **{"relay.connect_timeout": "9s"}))
            assert link.current is first  # a timeout applies from its next use

            await link.apply(two.client_config(two.token()))
            assert link.current is not first
            assert two.relay.relay.sessions_by_tenant == {"acme": 1}
            assert "relay.tls.ca_file" in link.status()["reason"]
            assert "transport.tls.port" in link.status()["reason"]
            await link.aclose()

    asyncio.run(main())
