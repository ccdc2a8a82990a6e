"""Durations are written one way: parse and format agree, bad text is named."""

from __future__ import annotations

import re

import pytest
from cloudbridge_core.durations import (
    DURATION_PATTERN,
    format_duration,
    invalid_duration,
    parse_duration,
)
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("1m", 60), ("1m30s", 90), ("24h", 86400), ("1.5s", 1.5)],
)
def test_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "5000 ms", "-1s", "1x", "s"])
def test_bad_durations_are_named(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_duration(text)


@pytest.mark.parametrize("value", ["-5s", " -1m", -5])
def test_negative_durations_are_explained(value: object) -> None:
    assert invalid_duration(value) == (
        f"invalid duration {value!r}: write a number with a unit, like 500ms, 30s, 1m30s or 24h;"
        " durations cannot be negative"
    )
    if isinstance(value, str):
        with pytest.raises(ValueError, match="durations cannot be negative"):
            parse_duration(value)


@given(st.integers(min_value=0, max_value=10 * 86400))
def test_format_round_trips_whole_seconds(seconds: int) -> None:
    written = format_duration(seconds)
    assert re.fullmatch(DURATION_PATTERN, written)
    assert parse_duration(written) == seconds


@given(st.integers(min_value=1, max_value=999))
def test_format_round_trips_milliseconds(milliseconds: int) -> None:
    assert parse_duration(format_duration(milliseconds / 1000)) == pytest.approx(
        milliseconds / 1000
    )
