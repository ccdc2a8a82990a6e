"""Issue 18, quiet terminals: a library's info lines (aioice's ICE checks) are debug lines,
shown only when debug is on; its warnings pass as they are."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudbridge_core.log import configure_logging

CHECK = (
    "Connection(0) Check CandidatePair(('10.0.0.1', 1) -> ('10.0.0.2', 2))"
    " State.FROZEN -> State.WAITING"
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    configure_logging()


def _lines(target: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in target.read_text().splitlines()]


def test_ice_checks_are_not_shown_at_info(tmp_path: Path) -> None:
    target = tmp_path / "out.log"
    configure_logging(level="info", fmt="json", output=str(target))
    logging.getLogger("aioice.ice").info(CHECK)
    logging.getLogger("websockets.server").info("server listening on 127.0.0.1:1")
    logging.getLogger("quic").info("[f67d4ba1] ALPN negotiated protocol cloudbridge-peer/1")
    logging.getLogger("http3").info("an HTTP/3 frame")
    logging.getLogger("aioice.ice").warning("a library warning")
    logging.getLogger("cloudbridge.relay").info("listening")
    assert [(line["level"], line["event"]) for line in _lines(target)] == [
        ("warning", "a library warning"),
        ("info", "listening"),
    ]


def test_ice_checks_are_debug_lines_with_debug_on(tmp_path: Path) -> None:
    target = tmp_path / "out.log"
    configure_logging(level="debug", fmt="json", output=str(target))
    logging.getLogger("aioice.ice").info(CHECK)
    assert [(line["level"], line["event"]) for line in _lines(target)] == [("debug", CHECK)]
