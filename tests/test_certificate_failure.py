"""A certificate the client does not trust stops the transport race: it is an attack or a
misconfiguration, not an outage, so the client never falls back to another transport
silently (unless ``transport.fallback_on_certificate_error``)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import yaml
from cli_process import BIN, environment
from cloudbridge_core.client.race import connect
from cloudbridge_core.errors import ExitCode, TlsVerificationFailed
from loopback import free_port
from relaybed import Bed, relay_bed

pytestmark = pytest.mark.timeout(90)


def _mixed(bed: Bed, impostor: Bed) -> dict[str, object]:
    """Settings for ``bed``'s CA and TCP transports, with the QUIC port of ``impostor``
    (another relay, another CA): QUIC presents a certificate the client does not trust."""
    ports = {name: listener.port for name, listener in bed.relay.listeners.items()}
    return {
        "transport.mode": "auto",
        "transport.prefer_protocol": "quic",
        "transport.race_head_start": "10s",  # QUIC alone until it fails
        **{f"transport.{name}.port": port for name, port in ports.items()},
        "transport.quic.port": impostor.relay.listeners["quic"].port,
    }


def test_an_untrusted_quic_certificate_stops_the_race(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            relay_bed(tmp_path / "a") as bed,
            relay_bed(tmp_path / "b") as impostor,
        ):
            token = bed.token()
            mixed = _mixed(bed, impostor)
            with pytest.raises(TlsVerificationFailed) as refused:
                await connect(bed.client_config(token, **mixed), bed.plugins)
            assert refused.value.message.startswith("quic: the certificate of 127.0.0.1:")
            assert "not trusted" in refused.value.message
            assert refused.value.exit_code == ExitCode.AUTH

            allowed = bed.client_config(
                token, **mixed, **{"transport.fallback_on_certificate_error": True}
            )
            fallen_back = await connect(allowed, bed.plugins)
            assert fallen_back.transport != "quic"
            await fallen_back.aclose()

            # both relays serve other clients throughout
            bed.transport = impostor.transport = "quic"
            for relay in (bed, impostor):
                other = await relay.connect()
                assert other.transport == "quic"
                await other.aclose()

    asyncio.run(main())


def test_the_cli_exits_as_for_an_auth_problem_naming_the_transport(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            relay_bed(tmp_path / "a") as bed,
            relay_bed(tmp_path / "b") as impostor,
        ):
            config: dict[str, object] = {
                "relay": {"host": "127.0.0.1", "tls": {"ca_file": str(bed.state_dir / "ca.pem")}},
                "transport": {
                    "mode": "auto",  # tries tls first
                    "race_head_start": "10s",
                    **{
                        name: {"port": listener.port}
                        for name, listener in bed.relay.listeners.items()
                    },
                    "tls": {"port": impostor.relay.listeners["tls"].port},
                },
                "metrics": {"enabled": False},
            }
            path = tmp_path / "client.yaml"
            path.write_text(yaml.safe_dump(config))
            done = await asyncio.to_thread(
                subprocess.run,
                [
                    *(BIN / "cloudbridge", "tunnel", "--config", str(path)),
                    *(
                        "--local-port",
                        str(free_port()),
                        "--remote-host",
                        "127.0.0.1",
                        "--remote-port",
                        "9",
                    ),
                ],
                capture_output=True,
                text=True,
                check=False,
                env=environment(CLOUDBRIDGE_AUTH__TOKEN=bed.token()),
            )
            assert done.returncode == ExitCode.AUTH, done.stderr
            assert "error: tls: the certificate of 127.0.0.1:" in done.stderr
            assert "not trusted" in done.stderr
            assert "(tls_verify_failed)" in done.stderr

    asyncio.run(main())
